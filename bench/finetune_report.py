"""First stage, reranked and fused R@1/5/10 of a fine-tuned EDJE on a custom-data folder, as
`edje fit`'s export makes them: fusion weights chosen on the validation split, the test split
ranked with them.

    python bench/finetune_report.py --model outputs/emoji-sets/slice0.model \\
        --data outputs/emoji-sets/slice0 --store outputs/emoji-sets/slice0.raw.store \\
        --first-stage outputs/emoji-sets/slice0.first_stage --out outputs/emoji-sets/slice0.eval

(`ExportEDJE` does the same at the end of `edje fit`; this re-runs it on a saved model, e.g.
after the fusion rule changed.) Prints the validation grid, the weights kept and the test table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a folder with train/ validation/ test/")
    parser.add_argument("--store", required=True, help="the raw token store fit made")
    parser.add_argument("--first-stage", required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from edje import EDJEModel, EDJEProcessor
    from edje.data import load_data
    from edje.evaluation import choose_fusion_weights, evaluate
    from edje.first_stage import load_embedding_model
    from edje.store import TokenStore

    splits = load_data(args.data)
    first_stage = load_embedding_model(args.first_stage)
    model = EDJEModel.from_pretrained(args.model).eval()
    processor = EDJEProcessor.from_pretrained(args.model)
    store = TokenStore.open(args.store)
    common = dict(k=args.k, device="cpu", show_progress_bar=False, dataset_name=args.data)
    validation = evaluate(splits["validation"], first_stage, model, processor, store,
                          fusion=None, **common)  # fmt: skip
    choice = choose_fusion_weights(validation)
    test = evaluate(splits["test"], first_stage, model, processor, store,
                    fusion=choice.weights, **common)  # fmt: skip
    out = Path(args.out)
    test.save(out / "test", plot=False)
    validation.save(out / "validation", plot=False)
    (out / "fusion_choice.json").write_text(
        json.dumps({"weights": choice.weights, "score": choice.score, "table": choice.table})
    )
    print("validation:\n" + validation.to_markdown())
    print(f"\nfusion kept: {choice.weights} (validation R@1 over both ways {choice.score:.1f})")
    print("\ntest:\n" + test.to_markdown())


if __name__ == "__main__":
    main()
