"""Small real sets for choosing fine-tuning defaults, written in the custom-data layout.

Three sources of human-made drawings with human-written names:

- `--source noto` (default): slices of the emoji corpus (`edje.data.load_emoji`: Noto Color
  Emoji, CLDR names) with disjoint concepts. The shipped quickstart model trained on its train
  split, so these measure fine-tuning from the scenes-only model only.
- `--source emojione`: EmojiOne 2.2's drawings (another artist, 64 px PNG, CC BY-SA 4.0) with
  EmojiOne's own names ("man with turban tone 3"), from Debian's `ruby-gemojione` package. No
  edje model has seen them. Three sets with disjoint categories: `people` (people, activity:
  skin-tone siblings), `things` (nature, food, travel, objects), `signs` (symbols, flags).
  Each concept (a drawing and its skin-tone variants) goes whole to train, validation or test
  by a hash of its code point: test concepts are never seen in training.

    python bench/emoji_sets.py --out outputs/emoji-sets --slices 4
    python bench/emoji_sets.py --source emojione --out outputs/emojione-sets
    edje fit --config recipes/finetune_custom.yaml --data.data outputs/emoji-sets/slice0 \\
        --data.store outputs/emoji-sets/slice0.raw.store \\
        --data.first_stage outputs/emoji-sets/slice0.first_stage \\
        --trainer.default_root_dir outputs/emoji-sets/slice0.run \\
        --trainer.callbacks.dirpath outputs/emoji-sets/slice0.model

- `--source heldout --corpus DIR`: the held-out style (OpenMoji) and icon set (game-icons) of a
  built icon corpus (`edje data build icons`, docs/icons.md), as sets `style` and `set`: no
  pretraining step saw them. A concept (a drawing and its skin-tone variants) goes whole to
  train, validation or test (70 / 10 / 20) by a hash of its caption without the skin tones.

    python bench/emoji_sets.py --source heldout --corpus outputs/icons --out outputs/heldout-sets

Each set is a folder with train/, validation/ and test/, each with its images (PNG) and a
metadata.jsonl, the layout `edje fit` and `edje eval` read (`edje.data.load_data`).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import re
from pathlib import Path

EMOJIONE_GLOB = "/usr/share/rubygems-integration/all/gems/gemojione-*"
EMOJIONE_SETS = {
    "people": ("people", "activity"),
    "things": ("nature", "food", "travel", "objects"),
    "signs": ("symbols", "flags"),
}
TONES = {"1": "light", "2": "medium-light", "3": "medium", "4": "medium-dark", "5": "dark"}
TONE = re.compile(r"\s*tone\s*([1-5])$")
SKIN = re.compile(r" with [a-z-]+( and [a-z-]+)? skin$")  # the corpus's skin-tone captions
HELDOUT_SETS = {"style": "icons-heldout-style", "set": "icons-heldout-set"}


def write_split(rows, folder: Path) -> int:
    """`rows` of (image id, PIL image, captions) as PNGs and one metadata.jsonl; no folder
    for no rows (without a validation split, `edje fit` holds out a slice of train)."""
    rows = list(rows)
    if not rows:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for image_id, image, captions in rows:
        image.save(folder / f"{image_id}.png")
        lines.extend({"file_name": f"{image_id}.png", "caption": c} for c in captions)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return len(rows)


def write_noto(out: Path, n_slices: int) -> None:
    from edje.data import emoji_slices, load_emoji

    for i, part in enumerate(emoji_slices(load_emoji(), n_slices=n_slices)):
        sizes = {
            split: write_split(
                ((r["image_id"], r["image"], r["captions"]) for r in part[split]),
                out / f"slice{i}" / split,
            )
            for split in part
        }
        print(f"slice{i}", sizes)


def emojione_caption(name: str) -> str:
    """'man with turban tone 3' -> 'man with turban, medium skin tone'."""
    tone = TONE.search(name)
    return TONE.sub("", name) + (f", {TONES[tone.group(1)]} skin tone" if tone else "")


def concept_split(concept: str) -> str:
    """train / validation / test (70 / 10 / 20) by a hash of a concept's key."""
    bucket = int(hashlib.sha256(concept.encode()).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "validation" if bucket < 3 else "train"


def emojione_split(code: str) -> str:
    """The split of a code point's base, so a drawing's skin-tone variants share a split."""
    return concept_split(code.split("-1F3F")[0])  # U+1F3FB..1F3FF: the skin-tone modifiers


def write_emojione(out: Path, root: str | None) -> None:
    from PIL import Image

    found = [root] if root else sorted(glob.glob(EMOJIONE_GLOB))
    if not found or not (Path(found[-1]) / "config" / "index.json").is_file():
        raise SystemExit(
            f"EmojiOne not found (looked in {root or EMOJIONE_GLOB}): apt-get install "
            "ruby-gemojione, or pass --emojione DIR (a gemojione-* folder, e.g. from "
            "apt-get download ruby-gemojione && dpkg -x ruby-gemojione_*.deb x)"
        )
    root = Path(found[-1])
    index = json.loads((root / "config" / "index.json").read_text())
    for name, categories in EMOJIONE_SETS.items():
        splits: dict[str, list] = {"train": [], "validation": [], "test": []}
        for entry in sorted(index.values(), key=lambda e: e["unicode"]):
            if entry["category"] not in categories:
                continue
            code = entry["unicode"].upper()
            image = Image.open(root / "assets" / "png" / f"{code}.png").convert("RGBA")
            white = Image.new("RGBA", image.size, "white")
            image = Image.alpha_composite(white, image).convert("RGB")
            caption = emojione_caption(entry["name"])
            splits[emojione_split(code)].append((code.lower(), image, [caption]))
        sizes = {split: write_split(rows, out / name / split) for split, rows in splits.items()}
        print(name, sizes)


def heldout_split(caption: str) -> str:
    """The split of a held-out drawing's concept: its caption without the skin tones."""
    return concept_split(SKIN.sub("", caption))


def write_heldout(out: Path, corpus: Path | None) -> None:
    from PIL import Image

    if corpus is None:
        raise SystemExit("--source heldout needs --corpus DIR, a built icon corpus")
    for name, heldout in HELDOUT_SETS.items():
        metadata = corpus / heldout / "test" / "metadata.jsonl"
        if not metadata.is_file():
            raise SystemExit(f"{metadata} not found: build the corpus with edje data build icons")
        splits: dict[str, list] = {"train": [], "validation": [], "test": []}
        for line in metadata.read_text().splitlines():
            row = json.loads(line)
            image = Image.open(metadata.parent / row["file_name"]).convert("RGB")
            image_id = Path(row["file_name"]).stem
            splits[heldout_split(row["caption"])].append((image_id, image, [row["caption"]]))
        sizes = {split: write_split(rows, out / name / split) for split, rows in splits.items()}
        print(name, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", choices=["noto", "emojione", "heldout"], default="noto")
    parser.add_argument("--slices", type=int, default=4, help="noto: how many slices")
    parser.add_argument("--emojione", help="emojione: a gemojione-* folder (default: Debian's)")
    parser.add_argument("--corpus", type=Path, help="heldout: a built icon corpus")
    args = parser.parse_args()
    if args.source == "noto":
        write_noto(args.out, args.slices)
    elif args.source == "emojione":
        write_emojione(args.out, args.emojione)
    else:
        write_heldout(args.out, args.corpus)


if __name__ == "__main__":
    main()
