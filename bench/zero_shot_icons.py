"""Zero-shot on the icon corpus's held-out sets, the paper's Flickr30k protocol offline: the
first stage's top k (10, the paper's depth, unless --k), EDJE's reranking and the fused score,
T2I and I2T R@1, one row per set, beside the first stage's R@k: the most reranking can reach.
The fusion weights are chosen on `icons-validation` (never on a held-out set) and applied to
every held-out set.

    python bench/zero_shot_icons.py --model outputs/pretrain_icons/model \\
        --first-stage outputs/icons/first_stage --corpus outputs/icons --out zero_shot.json

Prints a markdown table (percent) and writes every report's numbers to --out.
"""

from __future__ import annotations

import argparse
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


def evaluate_set(name, corpus, first_stage, model, processor, weights, k):
    from edje.data import load_data
    from edje.evaluation import evaluate

    dataset = load_data(name, data_dir=str(corpus), splits=["test"])["test"]
    return evaluate(dataset, first_stage, model, processor, k=k, fusion=weights, dataset_name=name)


def main() -> None:
    from edje import EDJEModel, EDJEProcessor
    from edje.evaluation import choose_fusion_weights
    from edje.first_stage import load_embedding_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="EDJE model folder")
    parser.add_argument("--first-stage", required=True, help="the corpus's first stage folder")
    parser.add_argument("--corpus", type=Path, required=True, help="edje data build icons --out")
    parser.add_argument("--k", type=int, default=10, help="candidates reranked (default 10)")
    parser.add_argument("--out", type=Path, help="JSON of every report's metrics")
    args = parser.parse_args()
    model = EDJEModel.from_pretrained(args.model).eval()
    processor = EDJEProcessor.from_pretrained(args.model)
    first_stage = load_embedding_model(args.first_stage)
    validation = evaluate_set(
        "icons-validation", args.corpus, first_stage, model, processor, None, args.k
    )
    weights = choose_fusion_weights(validation).weights
    rows = {"icons-validation": validation}
    for name in HELD_OUT:
        rows[name] = evaluate_set(name, args.corpus, first_stage, model, processor, weights, args.k)
    print(f"fusion weights (EDJE, first stage) chosen on icons-validation: {weights}\n")
    head = f"R@1 first / reranked / fused (first R@{args.k})"
    print(f"| set | images | T2I {head} | I2T {head} |")
    print("|---|---:|---|---|")
    for name, report in rows.items():
        cells = []
        for key in KEYS:
            values = [report.first_stage_metrics[key], report.reranked_metrics[key]]
            values.append(report.fused_metrics.get(key, float("nan")))
            ceiling = report.curves["first_stage"][DIRECTIONS[key]][args.k - 1]
            cells.append(" / ".join(f"{100 * v:.1f}" for v in values) + f" ({100 * ceiling:.1f})")
        print(f"| `{name}` | {report.dataset['images']} | {cells[0]} | {cells[1]} |")
    if args.out:
        data = {name: report.to_dict() for name, report in rows.items()}
        args.out.write_text(json.dumps({"fusion_weights": weights, "sets": data}, indent=1))


if __name__ == "__main__":
    main()
