"""Small data sets on disk, laid out as users and the Hub lay them out: an imagefolder (images
and metadata.jsonl, as `datasets`' imagefolder reads them) and Flickr30k Karpathy parquet files
(umaru97/flickr30k_train_val_test's columns)."""

from __future__ import annotations

import json

import datasets
from PIL import Image


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (40 * i, 0, 0)).save(folder / name)
    return folder


def write_jsonl(folder, rows):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (folder / "metadata.jsonl").write_text(text, encoding="utf-8")


def write_parquet(path, columns: dict, features: dict | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(features) if features else None
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def flickr_rows(split: str, first: int, n: int) -> dict:
    """Rows with umaru97/flickr30k_train_val_test's columns (those of nlphuji/flickr30k)."""
    names = [f"{1000000 + first + i}.jpg" for i in range(n)]
    return {
        "image": [Image.new("RGB", (5, 4), (first + i, 0, 0)) for i in range(n)],
        "caption": [[f"caption {j} of {name}" for j in range(5)] for name in names],
        "sentids": [[str(5 * (first + i) + j) for j in range(5)] for i in range(n)],
        "split": [split] * n,
        "img_id": [str(first + i) for i in range(n)],
        "filename": names,
    }


FLICKR_FEATURES = {
    "image": datasets.Image(),
    "caption": datasets.Sequence(datasets.Value("string")),
    "sentids": datasets.Sequence(datasets.Value("string")),
    "split": datasets.Value("string"),
    "img_id": datasets.Value("string"),
    "filename": datasets.Value("string"),
}
