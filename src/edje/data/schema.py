"""The one schema every edje data set has: image, image_id, captions, split.

Example:
    >>> from PIL import Image
    >>> from edje.data.schema import flatten_captions, make_dataset
    >>> black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "white")
    >>> ds = make_dataset([black, white], ["b", "w"], [["black", "dark"], ["white"]], "test")
    >>> ds.column_names
    ['image', 'image_id', 'captions', 'split']
    >>> flatten_captions(ds)  # the texts and text_to_image that edje.evaluation.metrics expects
    (['black', 'dark', 'white'], tensor([0, 0, 1]))
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch

__all__ = [
    "SCHEMA",
    "SPLIT_FOLDERS",
    "check_schema",
    "check_unique_ids",
    "flatten_captions",
    "make_dataset",
]

SCHEMA = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "captions": datasets.Sequence(datasets.Value("string")),
        "split": datasets.Value("string"),
    }
)


def make_dataset(
    images: Sequence, image_ids: Sequence[str], captions: Sequence[Sequence[str]], split: str
) -> datasets.Dataset:
    """Build a schema Dataset from parallel lists (images: PIL images, paths or bytes dicts)."""
    return datasets.Dataset.from_dict(
        {
            "image": list(images),
            "image_id": list(image_ids),
            "captions": [list(c) for c in captions],
            "split": [split] * len(image_ids),
        },
        features=SCHEMA,
    )


def check_schema(ds: datasets.Dataset, source: str = "data set") -> datasets.Dataset:
    """Raise ValueError unless `ds` has the schema's columns; return it with SCHEMA's order."""
    missing = [name for name in SCHEMA if name not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; expected {list(SCHEMA)}, got {ds.column_names}"
        )
    return ds.select_columns(list(SCHEMA))


def flatten_captions(ds: datasets.Dataset) -> tuple[list[str], torch.Tensor]:
    """All captions in row order, and for each the row index of its image (no image decoded)."""
    per_image = list(ds["captions"])
    texts = [caption for captions in per_image for caption in captions]
    counts = torch.tensor([len(captions) for captions in per_image], dtype=torch.long)
    return texts, torch.repeat_interleave(torch.arange(len(per_image)), counts)


# The folder names of each split, as datasets' imagefolder reads them (its SPLIT_KEYWORDS).
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}


def check_unique_ids(splits: datasets.DatasetDict, name: str) -> datasets.DatasetDict:
    """`splits` when no image id is in two rows of them (a token store keeps one image per id);
    raises ValueError naming one that is."""
    seen: set[str] = set()
    for split, dataset in splits.items():
        for image_id in dataset["image_id"]:
            if image_id in seen:
                raise ValueError(
                    f"load_data: the image ids of {name} collide ({image_id!r} is in two rows; "
                    f"the second in {split}); expected each image once"
                )
            seen.add(image_id)
    return splits
