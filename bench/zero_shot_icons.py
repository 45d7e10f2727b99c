"""Zero-shot on the icon corpus's held-out sets (`edje.evaluation.zero_shot`): the first
stage's top k, EDJE's reranking and the fused score, T2I and I2T R@1, one row per set, with
the depth and fusion weights chosen on `icons-validation` only. `--depths 10` (the default) is
the paper's fixed depth.

    python bench/zero_shot_icons.py --model outputs/pretrain_icons/model \\
        --first-stage outputs/icons/first_stage --corpus outputs/icons \\
        --depths 10 20 50 100 --out zero_shot.json

Prints a markdown table (percent) and writes every report's numbers to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from edje import EDJEModel, EDJEProcessor
    from edje._utils import atomic_write
    from edje.evaluation.zero_shot import zero_shot_icons
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
    if args.out:  # before the work: a missing folder must not cost an evaluation of minutes
        args.out.parent.mkdir(parents=True, exist_ok=True)
    table = zero_shot_icons(
        EDJEModel.from_pretrained(args.model).eval(),
        EDJEProcessor.from_pretrained(args.model),
        load_embedding_model(args.first_stage),
        args.corpus,
        depths=args.depths,
        validation_only=args.validation_only,
    )
    print(table.to_markdown())
    if args.out:
        text = json.dumps(table.to_dict(), indent=1)
        atomic_write(args.out, lambda temp: Path(temp).write_text(text))


if __name__ == "__main__":
    main()
