"""Grow a pretraining run's stored image tokens (the adapter's learned queries), for example 16
-> 32, so that the run goes on at the new size from the step it stands at: the adapter-size try
of docs/icons.md, which compares the two sizes on the same steps and data.

    python bench/grow_image_tokens.py --checkpoint outputs/pretrain_icons/last.ckpt \\
        --model src/edje/checkpoints/quickstart --tokens 32 --out outputs/grown32
    edje fit --config pretrain_icons --model.network.init_args.pretrained outputs/grown32/model \\
        --model.network.init_args.vision null --model.network.init_args.text null \\
        --model.network.init_args.vision_image_size null \\
        --model.network.init_args.config null --ckpt_path outputs/grown32/last.ckpt

(in the run's folder, so it goes on writing `outputs/pretrain_icons`; a try runs it in its own.)

`--model` is the saved model the run was built from (its `pretrained`): it gives the config,
tokenizer and image processing. Writes `OUT/model` (the run's weights at the new size: the
network the resumed run builds) and `OUT/last.ckpt` (the checkpoint with the grown queries and
their AdamW moments). The new queries start as copies of the trained ones (in order, again
from the first past m) plus seeded noise of half their spread, so the grown model starts next
to the old one; their moments start as the copied queries'. Nothing is written when the
checkpoint does not match the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

QUERIES = "network.edje.adapter.queries"
PREFIX = "network.edje."


def grow(queries: torch.Tensor, tokens: int, noise: float, generator) -> torch.Tensor:
    """`[1, m, d]` -> `[1, tokens, d]`: the rows again in order (cycling past m) for the
    `tokens - m` new ones, plus `noise` x their spread of Gaussian noise."""
    m = queries.shape[1]
    extra = queries[:, torch.arange(tokens - m) % m].clone()
    if noise:
        extra += torch.randn(extra.shape, generator=generator) * queries.std() * noise
    return torch.cat([queries, extra], 1)


def grown_checkpoint(checkpoint: dict, tokens: int) -> dict:
    """The Lightning checkpoint of a run with its queries and their optimizer state (AdamW's
    moments: every state tensor shaped like the queries) grown; checked whole before a change."""
    queries = checkpoint.get("state_dict", {}).get(QUERIES)
    if queries is None or queries.dim() != 3:
        raise ValueError(f"grow_image_tokens: the checkpoint has no {QUERIES} [1, m, d] weight.")
    if tokens <= queries.shape[1]:
        raise ValueError(
            f"grow_image_tokens: --tokens must exceed the run's {queries.shape[1]}, got {tokens}."
        )
    optimizers = checkpoint.get("optimizer_states") or [{}]
    states = [
        state
        for state in optimizers[0].get("state", {}).values()
        if state.get("exp_avg", torch.empty(0)).shape == queries.shape
    ]
    if len(optimizers) != 1 or len(states) != 1:
        raise ValueError(
            "grow_image_tokens: expected one optimizer with one AdamW state shaped like the "
            f"queries {tuple(queries.shape)}; the checkpoint has {len(optimizers)} optimizer(s) "
            f"and {len(states)} such state(s) (a weights-only checkpoint cannot resume)."
        )
    generator = torch.Generator().manual_seed(0)
    checkpoint["state_dict"][QUERIES] = grow(queries, tokens, 0.5, generator)
    for name, value in states[0].items():
        if isinstance(value, torch.Tensor) and value.shape == queries.shape:
            states[0][name] = grow(value, tokens, 0.0, generator)
    return checkpoint


def write_grown(checkpoint_path: Path, model_dir: str, tokens: int, out: Path) -> None:
    from edje import EDJEModel, EDJEProcessor
    from edje._utils import atomic_folder

    checkpoint = grown_checkpoint(
        torch.load(checkpoint_path, map_location="cpu", weights_only=True), tokens
    )
    config = EDJEModel.from_pretrained(model_dir).config
    config.num_image_tokens = tokens
    config.score_error_bounds = None  # measured on other weights: exact mode would trust it
    model = EDJEModel(config)
    weights = {
        name[len(PREFIX) :]: tensor
        for name, tensor in checkpoint["state_dict"].items()
        if name.startswith(PREFIX)
    }
    model.load_state_dict(weights, strict=True)  # the checkpoint must be this model's run
    processor = EDJEProcessor.from_pretrained(model_dir)
    processor.num_image_tokens = tokens
    with atomic_folder(out) as staging:
        model.save_pretrained(staging / "model")
        processor.save_pretrained(staging / "model")
        torch.save(checkpoint, staging / "last.ckpt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the run's last.ckpt")
    parser.add_argument("--model", required=True, help="the saved model the run was built from")
    parser.add_argument("--tokens", type=int, required=True, help="stored tokens after growing")
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out} exists: give a new folder.")
    write_grown(args.checkpoint, args.model, args.tokens, args.out)
    print(f"wrote {args.out}/model and {args.out}/last.ckpt ({args.tokens} stored tokens)")


if __name__ == "__main__":
    main()
