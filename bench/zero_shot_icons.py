"""Zero-shot on the icon corpus's held-out sets, the paper's Flickr30k protocol offline: the
first stage's top k, EDJE's reranking and the fused score, T2I and I2T R@1, one row per set,
beside the first stage's R@k: the most reranking can reach.

Everything the protocol chooses is chosen on `icons-validation`, never on a held-out set: the
depth k (of `--depths`, the one whose reranked R@1, T2I and I2T averaged, is highest; the
shallower on a tie) and then the fusion weights at that depth. `--depths 10` (the default) is
the paper's fixed depth.

    python bench/zero_shot_icons.py --model outputs/pretrain_icons/model \\
        --first-stage outputs/icons/first_stage --corpus outputs/icons \\
        --depths 10 20 50 100 --out zero_shot.json

Prints a markdown table (percent) and writes every report's numbers to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

HELD_OUT = (
    "icons-heldout-concepts",
    "icons-heldout-noto",
    "icons-heldout-emojione",
    "icons-heldout-style",
    "icons-heldout-set",
)
KEYS = ("image_retrieval_recall@1", "text_retrieval_recall@1")
DIRECTIONS = {key: key.split("_recall")[0] for key in KEYS}  # the report's curve names


def evaluate_set(name, corpus, first_stage, model, processor, weights, depths):
    from edje.data import load_data
    from edje.evaluation import evaluate

    dataset = load_data(name, data_dir=str(corpus), splits=["test"])["test"]
    return evaluate(
        dataset, first_stage, model, processor, k=max(depths), extra_k=depths,
        fusion=weights, dataset_name=name,
    )  # fmt: skip


def choose_depth(validation) -> int:
    """The depth whose reranked R@1 (T2I and I2T averaged) is highest; the shallower on a tie."""
    by_depth = validation.reranked_by_depth
    return max(sorted(by_depth), key=lambda d: (sum(by_depth[d][key] for key in KEYS), -d))


def main() -> None:
    from edje import EDJEModel, EDJEProcessor
    from edje.evaluation import choose_fusion_weights, with_fusion
    from edje.first_stage import load_embedding_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="EDJE model folder")
    parser.add_argument("--first-stage", required=True, help="the corpus's first stage folder")
    parser.add_argument("--corpus", type=Path, required=True, help="edje data build icons --out")
    parser.add_argument(
        "--depths", type=int, nargs="+", default=[10],
        help="candidate depths to choose from on icons-validation (default: 10, the paper's)",
    )  # fmt: skip
    parser.add_argument(
        "--validation-only", action="store_true",
        help="icons-validation alone: for comparing training options, no held-out set is read",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON of every report's metrics")
    args = parser.parse_args()
    model = EDJEModel.from_pretrained(args.model).eval()
    processor = EDJEProcessor.from_pretrained(args.model)
    first_stage = load_embedding_model(args.first_stage)
    validation = evaluate_set(
        "icons-validation", args.corpus, first_stage, model, processor, None, args.depths
    )
    depth = choose_depth(validation)
    validation = dataclasses.replace(
        validation, k=depth, reranked_metrics=validation.reranked_by_depth[depth]
    )
    weights = choose_fusion_weights(validation).weights
    rows = {"icons-validation": with_fusion(validation, weights)}  # where they were chosen
    shallower = [d for d in args.depths if d <= depth]  # free: prefixes of the depth's lists
    for name in () if args.validation_only else HELD_OUT:
        rows[name] = evaluate_set(
            name, args.corpus, first_stage, model, processor, weights, shallower
        )
    print_table(rows, depth, weights, validation)
    if args.out:
        data = {name: report.to_dict() for name, report in rows.items()}
        summary = {"depth": depth, "depths_tried": args.depths, "fusion_weights": weights}
        args.out.write_text(json.dumps({**summary, "sets": data}, indent=1))


def print_table(rows, depth, weights, validation) -> None:
    tried = ", ".join(
        f"{d}: " + " / ".join(f"{100 * validation.reranked_by_depth[d][key]:.1f}" for key in KEYS)
        for d in sorted(validation.reranked_by_depth)
    )
    print(f"icons-validation reranked R@1 T2I / I2T by depth: {tried}")
    print(f"depth chosen on icons-validation: {depth}")
    print(f"fusion weights (EDJE, first stage) chosen on icons-validation: {weights}\n")
    head = f"R@1 first / reranked / fused (first R@{depth})"
    print(f"| set | images | T2I {head} | I2T {head} |")
    print("|---|---:|---|---|")
    for name, report in rows.items():
        cells = []
        for key in KEYS:
            values = [report.first_stage_metrics[key], report.reranked_metrics[key]]
            values.append(report.fused_metrics.get(key, float("nan")))
            ceiling = report.curves["first_stage"][DIRECTIONS[key]][depth - 1]
            cells.append(" / ".join(f"{100 * v:.1f}" for v in values) + f" ({100 * ceiling:.1f})")
        print(f"| `{name}` | {report.dataset['images']} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
