"""Small real sets for choosing fine-tuning defaults: slices of the emoji corpus with disjoint
concepts (human-made drawings, human-written CLDR names), written in the custom-data layout.

    python bench/emoji_sets.py --out outputs/emoji-sets --slices 4
    edje fit --config recipes/finetune_custom.yaml --data.data outputs/emoji-sets/slice0 \\
        --data.store outputs/emoji-sets/slice0.raw.store \\
        --data.first_stage outputs/emoji-sets/slice0.first_stage \\
        --trainer.default_root_dir outputs/emoji-sets/slice0.run \\
        --trainer.callbacks.dirpath outputs/emoji-sets/slice0.model

Each slice is a folder with train/, validation/ and test/, each with its images (PNG) and a
metadata.jsonl, the layout `edje fit` and `edje eval` read (`edje.data.load_data`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edje.data import emoji_slices, load_emoji


def write_slice(dataset, folder: Path) -> dict[str, int]:
    sizes = {}
    for split in dataset:
        out = folder / split
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for row in dataset[split]:
            name = f"{row['image_id']}.png"
            row["image"].save(out / name)
            rows.extend({"file_name": name, "caption": c} for c in row["captions"])
        (out / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        sizes[split] = len(dataset[split])
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=4)
    args = parser.parse_args()
    for i, part in enumerate(emoji_slices(load_emoji(), n_slices=args.slices)):
        print(f"slice{i}", write_slice(part, args.out / f"slice{i}"))


if __name__ == "__main__":
    main()
