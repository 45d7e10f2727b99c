"""Grow a pretraining run's stored image tokens (the adapter's learned queries), for example 16
-> 32, so that the run goes on at the new size from the step it stands at: the adapter-size try
of docs/icons.md, which compares the two sizes on the same steps and data.

    python bench/grow_image_tokens.py --checkpoint outputs/pretrain_icons/last.ckpt \\
        --model src/edje/checkpoints/quickstart --tokens 32 --out outputs/grown32
    edje fit --config pretrain_icons ... \\
        --model.network.init_args.pretrained outputs/grown32/model \\
        --ckpt_path outputs/grown32/last.ckpt

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
import os
import shutil
import tempfile
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


def grown_checkpoint(checkpoint: dict, tokens: int, seed: int = 0) -> dict:
    """The Lightning checkpoint of a run with its queries (and their AdamW moments) grown."""
    queries = checkpoint["state_dict"].get(QUERIES)
    if queries is None or queries.dim() != 3:
        raise ValueError(f"grow_image_tokens: the checkpoint has no {QUERIES} [1, m, d] weight.")
    if tokens <= queries.shape[1]:
        raise ValueError(
            f"grow_image_tokens: --tokens must exceed the run's {queries.shape[1]}, got {tokens}."
        )
    generator = torch.Generator().manual_seed(seed)
    checkpoint["state_dict"][QUERIES] = grow(queries, tokens, 0.5, generator)
    states = checkpoint["optimizer_states"][0]["state"].values()
    moments = [s for s in states if s.get("exp_avg", torch.empty(0)).shape == queries.shape]
    if len(moments) != 1:
        raise ValueError(
            f"grow_image_tokens: expected one AdamW state shaped like the queries "
            f"{tuple(queries.shape)}, found {len(moments)}."
        )
    for name in ("exp_avg", "exp_avg_sq"):
        moments[0][name] = grow(moments[0][name], tokens, 0.0, generator)
    return checkpoint


def write_grown(checkpoint_path: Path, model_dir: str, tokens: int, out: Path) -> None:
    from edje import EDJEModel, EDJEProcessor

    checkpoint = grown_checkpoint(
        torch.load(checkpoint_path, map_location="cpu", weights_only=True), tokens
    )
    config = EDJEModel.from_pretrained(model_dir).config
    config.num_image_tokens = tokens
    model = EDJEModel(config)
    weights = {
        name[len(PREFIX) :]: tensor
        for name, tensor in checkpoint["state_dict"].items()
        if name.startswith(PREFIX)
    }
    model.load_state_dict(weights, strict=True)  # the checkpoint must be this model's run
    processor = EDJEProcessor.from_pretrained(model_dir)
    processor.num_image_tokens = tokens
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700
    try:
        model.save_pretrained(staging / "model")
        processor.save_pretrained(staging / "model")
        torch.save(checkpoint, staging / "last.ckpt")
        staging.rename(out)  # whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
