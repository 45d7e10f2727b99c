"""How deep reranking must look on the icon corpus: the first stage's recall at depths 1 to 100
on each evaluation set, T2I and I2T. At depth k no reranker's R@1 can pass the first stage's
R@k, so this table is the ceiling of every zero-shot reranking table at that depth.

    python bench/first_stage_depths.py --first-stage outputs/icons/first_stage \\
        --corpus outputs/icons

Prints a markdown table (percent).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEPTHS = (1, 10, 20, 50, 100)


def main() -> None:
    from edje.data import load_data
    from edje.data.load import ICON_SETS
    from edje.evaluation import evaluate
    from edje.first_stage import load_embedding_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first-stage", required=True, help="the corpus's first stage folder")
    parser.add_argument("--corpus", type=Path, required=True, help="edje data build icons --out")
    args = parser.parse_args()
    first_stage = load_embedding_model(args.first_stage)
    print("| set | " + " | ".join(f"R@{d}" for d in DEPTHS) + " |")
    print("|---|" + "---|" * len(DEPTHS))
    for name in ICON_SETS:  # the held-out sets, then icons-validation
        dataset = load_data(name, data_dir=str(args.corpus), splits=["test"])["test"]
        report = evaluate(dataset, first_stage, ks=(1, max(DEPTHS)), dataset_name=name)
        curves = report.curves["first_stage"]
        cells = [
            f"{100 * curves['image_retrieval'][d - 1]:.1f} / "
            f"{100 * curves['text_retrieval'][d - 1]:.1f}"
            for d in DEPTHS
        ]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
