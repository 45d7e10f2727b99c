"""Any `datasets.Dataset` with an image column and a caption column, mapped to the schema.

Rows that share an id are one image with several captions, so a data set with one row per
caption (COCO style) and one with one row per image (a list of captions) both work.

Example:
    >>> import datasets
    >>> from PIL import Image
    >>> from edje.data.columns import from_dataset
    >>> ds = datasets.Dataset.from_dict({
    ...     "img": [Image.new("RGB", (8, 8))] * 3,
    ...     "text": ["a dog", "a brown dog", "a cat"],
    ...     "photo": ["p1", "p1", "p2"],
    ... })
    >>> out = from_dataset(ds, image_column="img", caption_column="text", id_column="photo")
    >>> list(out["image_id"]), list(out["captions"])
    (['p1', 'p2'], [['a dog', 'a brown dog'], ['a cat']])
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
from datasets.table import ConcatenationTable

from edje.data.schema import SCHEMA

__all__ = ["assemble", "caption_list", "from_dataset"]


def from_dataset(
    ds: datasets.Dataset,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    split: str | None = None,
    max_captions: int | None = None,
) -> datasets.Dataset:
    """Map named columns of `ds` to the schema (image, image_id, captions, split).

    Args:
        ds: any Dataset; the image column may be an `Image` feature or file paths / URLs
            (decoded lazily, when a row is read).
        image_column: the column holding images.
        caption_column: a string or a list of strings per row (dicts with a `"raw"` key, as
            in Karpathy's json, are read too). Empty or whitespace captions raise.
        id_column: rows with the same value are merged into one image (its first row's image,
            all rows' captions). None: each row is one image, id = its row number.
        split: the `split` value; default `ds.split` when set, else `"train"`.
        max_captions: keep at most this many captions per image (e.g. 5 for COCO), in order.
    """
    _require_columns(ds, [image_column, caption_column] + ([id_column] if id_column else []))
    raw_ids = ds[id_column] if id_column else range(len(ds))
    split = split or (str(ds.split) if ds.split is not None else "train")
    captions = ds[caption_column]
    return assemble(ds, image_column, captions, raw_ids, split, max_captions, caption_column)


def assemble(
    ds: datasets.Dataset,
    image_column: str,
    raw_captions: Sequence,
    raw_ids: Sequence,
    split: str,
    max_captions: int | None = None,
    caption_column: str = "captions",
) -> datasets.Dataset:
    """The schema Dataset from `ds`'s image column and per-row captions and ids (merged by
    id: first row's image, all rows' captions). Image data is not copied unless rows merge."""
    first_row: dict[str, int] = {}
    merged: dict[str, list[str]] = {}
    for row, (raw_id, value) in enumerate(zip(raw_ids, raw_captions, strict=True)):
        image_id = str(raw_id)
        first_row.setdefault(image_id, row)
        merged.setdefault(image_id, []).extend(
            caption_list(value, f"row {row}, column {caption_column!r}")
        )
    images = ds.select_columns([image_column])
    if len(first_row) < len(ds):  # only re-index when rows actually merge
        images = images.select(list(first_row.values())).flatten_indices()
    elif _has_side_by_side_blocks(images):
        # datasets (5.2) loses the row count of a column-less block here and then refuses to
        # add columns; a fresh table avoids it.
        images = images.flatten_indices()
    images = images.rename_column(image_column, "image") if image_column != "image" else images
    if not isinstance(images.features["image"], datasets.Image):
        images = images.cast_column("image", datasets.Image())
    ids = list(first_row)
    images = images.add_column("image_id", ids)
    images = images.add_column("captions", [merged[i][:max_captions] for i in ids])
    images = images.add_column("split", [split] * len(ids))
    return images.cast(SCHEMA)


def _has_side_by_side_blocks(ds: datasets.Dataset) -> bool:
    return isinstance(ds.data, ConcatenationTable) and any(len(row) > 1 for row in ds.data.blocks)


def caption_list(value, where: str) -> list[str]:
    """One row's captions as a list of non-empty stripped strings; `where` names the row."""
    items = [value] if isinstance(value, str | dict) else value
    if not isinstance(items, Sequence) or not items:
        raise ValueError(f"{where}: expected a caption string or a non-empty list, got {value!r}")
    out = []
    for item in items:
        text = item.get("raw") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: expected a non-empty caption string, got {item!r}")
        out.append(text.strip())
    return out


def _require_columns(ds: datasets.Dataset, names: list[str]) -> None:
    missing = [n for n in names if n not in ds.column_names]
    if missing:
        raise ValueError(
            f"from_dataset: column(s) {missing} not found; available columns: {ds.column_names}"
        )
