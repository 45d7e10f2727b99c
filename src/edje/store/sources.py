"""What `edje.store.encode.encode_store` reads: a folder, a list of paths, a `datasets.Dataset`
or `edje.data.shards.ShardImages`, as ids and image references in a fixed order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edje._utils import IMAGE_SUFFIXES, image_id

__all__ = ["collect", "find_images"]


def find_images(folder: str | Path) -> list[tuple[str, str]]:
    """`(id, path)` of the image files under `folder` (recursive, sorted); id: the path
    relative to `folder` without its suffix (`edje._utils.image_id`), as data folders name
    their images, so a store of the folder serves `edje eval --data` of it."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"encode_images: {root} is not a folder")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    return [(image_id(p.relative_to(root).as_posix()), str(p)) for p in files]


class _DatasetRefs(Sequence):
    """Lazy image column of a `datasets.Dataset` (not decoded: `load_rgb` does it safely)."""

    def __init__(self, dataset: Any, column: str):
        from datasets import Image as ImageFeature

        if isinstance(dataset.features.get(column), ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(i)][self.column]


def collect(source: Any, ids: Sequence[str] | None, id_column: str, image_column: str):
    """`source` -> (ids, image refs), in a fixed order; duplicate ids refused."""
    from edje.data.shards import ShardImages

    if isinstance(source, str | Path) and Path(source).is_dir():
        found = find_images(source)
        out_ids, refs = [i for i, _ in found], [p for _, p in found]
    elif isinstance(source, ShardImages):  # ids: the samples' keys; refs: image bytes
        out_ids, refs = list(source.ids), source
    elif hasattr(source, "features") and hasattr(source, "column_names"):  # datasets.Dataset
        for col in (id_column, image_column):
            if col not in source.column_names:
                raise KeyError(
                    f"encode_images: no column {col!r} in the dataset {source.column_names}"
                )
        out_ids = [image_id(i) for i in source[id_column]]  # "1000092795.jpg" -> "1000092795"
        refs = _DatasetRefs(source, image_column)
    elif isinstance(source, Sequence) and not isinstance(source, str | bytes):
        refs = list(source)
        out_ids = [str(p) for p in refs] if ids is None else [str(i) for i in ids]
    else:
        raise TypeError(
            "encode_images: source must be a folder, a list of image paths, a datasets.Dataset "
            "or ShardImages, "
            f"got {type(source).__name__} {source!r:.80}"
        )
    if ids is not None and len(ids) != len(out_ids):
        raise ValueError(f"encode_images: {len(ids)} ids for {len(out_ids)} images")
    if ids is not None:
        out_ids = [str(i) for i in ids]
    seen, dup = set(), []
    for i in out_ids:
        (dup.append(i) if i in seen else seen.add(i))
    if dup:
        raise ValueError(f"encode_images: duplicate ids refused (nothing written): {dup[:5]}")
    return out_ids, refs
