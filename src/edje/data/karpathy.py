"""Flickr30k and COCO with Karpathy's splits, from parquet repositories on the Hub.

No loading scripts (`datasets` 4 dropped them): each supported repository is plain parquet,
described by a `HubSource` that maps its columns to the common schema. Karpathy's
splits: Flickr30k 29,000 / 1,014 / 1,000 images (train / validation / test), COCO 113,287
(train + restval) / 5,000 / 5,000; five captions per image (a few COCO images have more:
`max_captions=5` keeps the first five, 25,000 test captions, as retrieval papers do).

Offline, point `data_dir` at a local copy of the repository (its parquet files, named as on
the Hub, e.g. `data/test-00000-of-00001.parquet`) or pass `data_files`; both go through
the same column mapping as the Hub.

COCO's default repository (yerevann/coco-karpathy) holds captions and image URLs, not the
images: pass `images_dir` (the COCO 2014 folder holding `train2014/` and `val2014/`) to
read local files; without it the image column holds the cocodataset.org URLs, which
`datasets` fetches when a row's image is read.

Example (needs the Hub):
    >>> from edje.data.karpathy import load_flickr30k
    >>> test = load_flickr30k("test")  # doctest: +SKIP
    >>> len(test), test[0]["captions"][:1]  # doctest: +SKIP
    (1000, ['Two young guys with shaggy hair look at their hands while hanging out in the yard.'])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

from edje._utils import image_id
from edje.data.columns import assemble

__all__ = [
    "COCO_SOURCES",
    "DEFAULT_COCO",
    "DEFAULT_FLICKR30K",
    "FLICKR30K_SOURCES",
    "HubSource",
    "load_coco_karpathy",
    "load_flickr30k",
    "load_karpathy_source",
]

SPLIT_ALIASES = {"val": "validation", "dev": "validation"}


@dataclass(frozen=True)
class HubSource:
    """How one parquet repository's columns map to the schema.

    Attributes:
        repo_id: the Hub data set id.
        splits: our split (train / validation / test) -> the repository's split name(s),
            concatenated in order.
        caption_column: a list of captions per row.
        id_column: the image id; file names lose their suffix (`"1000092795.jpg"` ->
            `"1000092795"`, `edje._utils.image_id`), as `edje encode` stores them.
        image_column: the column holding images; None when the repository has none.
        url_column: where images can be fetched from when there is no image column.
        file_column / folder_column: where an image lies under `images_dir`
            (`images_dir / folder / file`, or `images_dir / file`).
        file_pattern: the repository's parquet files of one split, so that loading the test
            split downloads only the test files.
    """

    repo_id: str
    splits: dict[str, tuple[str, ...]]
    caption_column: str
    id_column: str
    image_column: str | None = "image"
    url_column: str | None = None
    file_column: str | None = None
    folder_column: str | None = None
    file_pattern: str = "data/{split}-*.parquet"

    @property
    def columns(self) -> list[str]:
        names = [self.caption_column, self.id_column, self.image_column, self.url_column]
        return [n for n in [*names, self.file_column, self.folder_column] if n]


FLICKR30K_SOURCES = {
    # image, caption (list), sentids, split, img_id, filename; train / val / test
    # = 29,000 / 1,014 / 1,000: the Karpathy split, the same columns as nlphuji/flickr30k.
    "umaru97/flickr30k_train_val_test": HubSource(
        repo_id="umaru97/flickr30k_train_val_test",
        splits={"train": ("train",), "validation": ("val",), "test": ("test",)},
        caption_column="caption",
        id_column="filename",
    ),
}
COCO_SOURCES = {
    # filepath, sentids, filename, imgid, split, sentences (list), cocoid, url; splits train /
    # restval / validation / test = 82,783 / 30,504 / 5,000 / 5,000; no image column.
    "yerevann/coco-karpathy": HubSource(
        repo_id="yerevann/coco-karpathy",
        splits={"train": ("train", "restval"), "validation": ("validation",), "test": ("test",)},
        caption_column="sentences",
        id_column="cocoid",
        image_column=None,
        url_column="url",
        file_column="filename",
        folder_column="filepath",
    ),
}
DEFAULT_FLICKR30K = "umaru97/flickr30k_train_val_test"
DEFAULT_COCO = "yerevann/coco-karpathy"


def load_flickr30k(
    split: str = "test",
    repo_id: str = DEFAULT_FLICKR30K,
    *,
    data_dir: str | Path | None = None,
    data_files: str | list | dict | None = None,
    max_captions: int | None = 5,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> datasets.Dataset:
    """Flickr30k (Karpathy split) in the common schema; test = 1,000 images, 5,000 captions.

    `repo_id` must be a key of `FLICKR30K_SOURCES`, or pass your own `HubSource`
    to `load_karpathy_source`. `data_dir` / `data_files` load a local copy.
    """
    source = _source(FLICKR30K_SOURCES, repo_id, "load_flickr30k")
    return load_karpathy_source(
        source, split, data_dir, data_files, None, max_captions, cache_dir, revision
    )


def load_coco_karpathy(
    split: str = "test",
    repo_id: str = DEFAULT_COCO,
    *,
    images_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    data_files: str | list | dict | None = None,
    max_captions: int | None = 5,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> datasets.Dataset:
    """COCO (Karpathy split) in the common schema; test = 5,000 images, 25,000 captions.

    `train` is Karpathy's train + restval (113,287 images). `images_dir`: see the module
    docstring.
    """
    source = _source(COCO_SOURCES, repo_id, "load_coco_karpathy")
    return load_karpathy_source(
        source, split, data_dir, data_files, images_dir, max_captions, cache_dir, revision
    )


def load_karpathy_source(
    source: HubSource,
    split: str = "test",
    data_dir: str | Path | None = None,
    data_files: str | list | dict | None = None,
    images_dir: str | Path | None = None,
    max_captions: int | None = 5,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> datasets.Dataset:
    """Load one split of `source` (Hub, or a local copy) and map it to the schema."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in source.splits:
        raise ValueError(
            f"{source.repo_id}: unknown split {split!r}; expected one of {list(source.splits)}"
        )
    raw = _load_raw(source, source.splits[split], data_dir, data_files, cache_dir, revision)
    missing = [c for c in source.columns if c not in raw.column_names]
    if missing:
        raise ValueError(
            f"{source.repo_id}: column(s) {missing} not found, so this is not the schema the "
            f"mapping expects; available columns: {raw.column_names}"
        )
    ids = [image_id(v) for v in raw[source.id_column]]
    captions = raw[source.caption_column]
    if source.image_column is not None:
        return assemble(
            raw, source.image_column, captions, ids, split, max_captions, source.caption_column
        )
    # No images in the repository: local paths or URLs, read when a row's image is.
    paths = datasets.Dataset.from_dict({"image": _image_paths(raw, source, images_dir)})
    return assemble(paths, "image", captions, ids, split, max_captions, source.caption_column)


def _load_raw(source, repo_splits, data_dir, data_files, cache_dir, revision) -> datasets.Dataset:
    if data_files is None and data_dir is not None:
        data_files = {name: _local_files(Path(data_dir), name) for name in repo_splits}
    if data_files is None:  # the Hub: only this split's files
        parts = [
            datasets.load_dataset(
                source.repo_id,
                data_files={name: source.file_pattern.format(split=name)},
                split=name,
                cache_dir=cache_dir,
                revision=revision,
            )
            for name in repo_splits
        ]
    elif isinstance(data_files, dict):
        absent = [name for name in repo_splits if name not in data_files]
        if absent:
            raise ValueError(
                f"{source.repo_id}: data_files has no entry for split(s) {absent}; "
                f"got keys {list(data_files)}"
            )
        files = {name: data_files[name] for name in repo_splits}
        loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=cache_dir)
        parts = [loaded[name] for name in repo_splits]
    else:  # files of the requested split only
        loaded = datasets.load_dataset("parquet", data_files=data_files, cache_dir=cache_dir)
        parts = [loaded["train"]]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _local_files(data_dir: Path, repo_split: str) -> list[str]:
    """A repository split's parquet files in a local copy, named as on the Hub."""
    patterns = (f"{repo_split}-*.parquet", f"{repo_split}.parquet", f"{repo_split}/*.parquet")
    files = sorted({str(p) for pattern in patterns for p in data_dir.rglob(pattern)})
    if not files:
        raise FileNotFoundError(
            f"no parquet files for split {repo_split!r} under {data_dir}; expected names like "
            f"{repo_split}-00000-of-00001.parquet"
        )
    return files


def _image_paths(raw: datasets.Dataset, source: HubSource, images_dir) -> list[str]:
    if images_dir is None:
        return list(raw[source.url_column])
    images_dir = Path(images_dir)
    folders = raw[source.folder_column] if source.folder_column else [""] * len(raw)
    paths = []
    for folder, file in zip(folders, raw[source.file_column], strict=True):
        path = images_dir / folder / file
        paths.append(str(path if path.is_file() else images_dir / file))
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{source.repo_id}: {len(absent)} image(s) not found under {images_dir}, "
            f"e.g. {absent[:3]}"
        )
    return paths


def _source(sources: dict[str, HubSource], repo_id: str, caller: str) -> HubSource:
    if repo_id not in sources:
        raise ValueError(
            f"{caller}: no column mapping for {repo_id!r}; known repositories: {list(sources)} "
            "(for another one, build a HubSource and call load_karpathy_source)"
        )
    return sources[repo_id]
