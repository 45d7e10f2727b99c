"""`load_data`: every data set by one name, the same for `edje fit`, `eval`, `encode`, `index`
and the quickstart.

A name is `"builtin"`, `"emoji"`, `"flickr30k"`, `"coco"`, one of the icon corpus's evaluation
sets (`"icons-heldout-style"`, ...: `ICON_SETS`, built by `edje data build icons`; `data_dir`
is the corpus folder, by default `<edje cache>/icons`), a folder of your own images, or the id
of a Hub data set of images and captions (`"owner/name"`, `edje.data.hub`: any repository
`datasets.load_dataset` reads, from its cache when offline; a local folder of that name wins);
names joined by `+` (`"builtin+emoji"`, the quickstart's) give each split of all of them
together (their image ids must not collide):

- one folder with `metadata.jsonl`, `.csv` or `.parquet` (`edje.data.folder`): the train split;
- or split folders, each with its own metadata, named as `datasets`' imagefolder names them:
  `train/` (or `training/`), `validation/` (`valid/`, `dev/`, `val/`), `test/` (`testing/`,
  `eval/`, `evaluation/`). Image ids get the split folder's name in front (`test/0000`), so the
  same file name may appear in several.

Without a validation split, a deterministic tenth of train (at least one image, chosen by a
hash of the image id) is held out as validation, and a log line says so: export selection and
fusion weights are chosen on it.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for split in ("train", "test"):
    ...     (root / split).mkdir()
    ...     for i in range(4):
    ...         Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / split / f"{i:04d}.png")
    ...     rows = [{"file_name": f"{i:04d}.png", "caption": f"red {i}"} for i in range(4)]
    ...     _ = (root / split / "metadata.jsonl").write_text("\\n".join(map(json.dumps, rows)))
    >>> splits = load_data(str(root))
    >>> sorted(splits), splits["test"][0]["image_id"]
    (['test', 'train', 'validation'], 'test/0000')
    >>> len(splits["train"]), len(splits["validation"])  # a tenth of train held out
    (3, 1)
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from datasets import DatasetDict, concatenate_datasets

from edje.data.schema import SPLIT_FOLDERS, check_unique_ids

__all__ = ["DATA_NAMES", "SPLITS", "check_unique_ids", "hub_datasets", "load_data"]

logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
ICON_SETS = (
    "icons-heldout-concepts",
    "icons-heldout-noto",
    "icons-heldout-emojione",
    "icons-heldout-style",
    "icons-heldout-set",
    "icons-validation",
)
DATA_NAMES = ("builtin", "emoji", "flickr30k", "coco", *ICON_SETS)
HELD_OUT = 0.1  # share of train held out as validation when no validation split is given


def load_data(
    name: str | Path | DatasetDict,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    builtin: dict[str, int] | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    splits: Sequence[str] | None = None,
) -> DatasetDict:
    """The splits of a named data set, a folder or a Hub id (see the module docstring); a
    `DatasetDict` in edje's schema is returned as it is. `data_dir` is where Flickr30k / COCO
    files or the icon corpus are; `builtin` sizes the built-in set (`make_builtin_dataset`'s
    `n_*` arguments); `caption_column` names a folder's or a Hub data set's caption column
    (`edje.data.folder`), `image_column` and `id_column` a Hub data set's (`edje.data.hub`;
    default: found by their usual names). `splits` keeps only those splits: Flickr30k and COCO
    then read (or download) no other split's files.
    """
    columns = dict(caption_column=caption_column, image_column=image_column, id_column=id_column)
    options = dict(data_dir=data_dir, seed=seed, builtin=builtin, columns=columns)
    if splits is None:
        return _load_all(name, **options)
    if name in ("flickr30k", "coco"):
        _refuse_columns(name, columns, is_folder=False, is_hub=False)
        return _karpathy(name, data_dir, splits)
    loaded = _load_all(name, **options)
    return DatasetDict({s: loaded[s] for s in splits if s in loaded})


def _load_all(name, *, data_dir, seed, builtin, columns) -> DatasetDict:
    from edje.data.builtin import make_builtin_dataset
    from edje.data.emoji import load_emoji
    from edje.data.hub import is_hub_id, load_hub_dataset

    if isinstance(name, DatasetDict):
        return name
    folder = Path(name)
    if isinstance(name, str) and "+" in name and not folder.is_dir():  # "c++/photos" is one
        return _combined(name.split("+"), data_dir=data_dir, seed=seed, builtin=builtin, **columns)
    hub = is_hub_id(name) and not folder.is_dir()
    _refuse_columns(name, columns, folder.is_dir(), hub)
    if hub:
        return _with_validation(load_hub_dataset(name, **columns))
    if name == "builtin":
        return make_builtin_dataset(seed=seed, **(builtin or {}))
    if name == "emoji":
        return load_emoji()
    if name in ICON_SETS:  # built by `edje data build icons` (edje.data.icon_shards)
        return _folder_splits(_icon_set_folder(name, data_dir), None)
    if name in ("flickr30k", "coco"):
        return _karpathy(name, data_dir, SPLITS)
    if not folder.is_dir():
        raise ValueError(
            f"load_data: expected one of {DATA_NAMES}, a folder of images with metadata or a "
            f"Hub data set id (owner/name), got {str(name)!r}"
        )
    return _with_validation(_folder_splits(folder, columns["caption_column"]))


def _refuse_columns(name, columns: dict, is_folder: bool, is_hub: bool) -> None:
    """Column options name columns of a folder's metadata (the caption) or of a Hub data set
    (all three): refused by name for anything else, rather than ignored."""
    given = [option for option, value in columns.items() if value is not None]
    allowed = ["caption_column"] if is_folder else list(columns) if is_hub else []
    refused = [option for option in given if option not in allowed]
    if refused:
        kind = "a folder" if is_folder else "neither"
        raise ValueError(
            f"load_data: {', '.join(refused)}: column options are for a Hub data set (and "
            f"caption_column for a folder's metadata); {str(name)!r} is {kind}"
        )


def hub_datasets(name: str) -> list[str]:
    """The Hub ids of the sets `name` loads from the Hub (a model card's `datasets`): the
    default sources of flickr30k and coco, and Hub ids; built-in, emoji and folders have none."""
    from edje.data.hub import is_hub_id
    from edje.data.karpathy import DEFAULT_COCO, DEFAULT_FLICKR30K

    known = {"flickr30k": DEFAULT_FLICKR30K, "coco": DEFAULT_COCO}
    parts = str(name).split("+")
    return [known.get(p, p) for p in parts if p in known or (is_hub_id(p) and not Path(p).is_dir())]


def _icon_set_folder(name: str, data_dir: str | None) -> Path:
    from edje.backbones import cache_dir

    corpus = Path(data_dir) if data_dir else cache_dir() / "icons"
    if not (corpus / name / "test").is_dir():
        raise ValueError(
            f"load_data: {name} is not built in {corpus}; build it with `edje data build icons"
            f" --out {corpus}` (or pass the corpus folder as data_dir)"
        )
    return corpus / name


def _karpathy(name: str, data_dir: str | None, splits: Sequence[str]) -> DatasetDict:
    from edje.data.karpathy import load_coco_karpathy, load_flickr30k

    load = load_flickr30k if name == "flickr30k" else load_coco_karpathy
    return DatasetDict({split: load(split, data_dir=data_dir) for split in splits})


def _combined(names: list[str], **options) -> DatasetDict:
    parts = [load_data(name, **options) for name in names]
    splits = [s for s in SPLITS if any(s in part for part in parts)]
    combined = DatasetDict(
        {s: concatenate_datasets([part[s] for part in parts if s in part]) for s in splits}
    )
    return check_unique_ids(combined, "+".join(names))


def canonical_split(name: str) -> str:
    """`"validation"` for `"val"`, `"dev"`, ...: the split imagefolder reads from a folder of
    that name; other names stay as they are."""
    return next((s for s, names in SPLIT_FOLDERS.items() if name in names), name)


def split_folders(folder: Path) -> dict[str, Path]:
    """`folder`'s split folders by split (`{"validation": folder / "val", ...}`), named as
    imagefolder names them; two folders of one split are refused, not merged silently."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        present = [folder / n for n in names if (folder / n).is_dir()]
        if len(present) > 1:
            raise ValueError(
                f"load_data: {folder} has {len(present)} {split} folders "
                f"({', '.join(p.name + '/' for p in present)}); keep one"
            )
        if present:
            found[split] = present[0]
    return found


def _folder_splits(folder: Path, caption_column: str | None) -> DatasetDict:
    from edje.data.folder import load_image_folder

    present = split_folders(folder)
    if not present:
        return DatasetDict(
            {"train": load_image_folder(folder, split="train", caption_column=caption_column)}
        )
    _warn_outside(folder, present.values())
    return DatasetDict({
        split: load_image_folder(path, split=split, id_prefix=f"{path.name}/",
                                 caption_column=caption_column)
        for split, path in present.items()
    })  # fmt: skip


def _warn_outside(folder: Path, split_paths) -> None:
    """Images beside the split folders are not read (as imagefolder skips them): say so."""
    from edje._utils import IMAGE_SUFFIXES

    inside = {p.resolve() for p in split_paths}
    skipped = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not inside & {q.resolve() for q in p.parents}
    )
    if skipped:
        warnings.warn(
            f"load_data: {folder} has split folders ({', '.join(p.name for p in split_paths)}); "
            f"{len(skipped)} image(s) outside them are not read, e.g. {skipped[:5]}",
            stacklevel=3,
        )


def _with_validation(splits: DatasetDict) -> DatasetDict:
    if "validation" in splits or "train" not in splits or len(splits["train"]) < 2:
        return splits
    train = splits["train"]
    ids = train["image_id"]
    ranked = sorted(range(len(train)), key=lambda i: _digest(ids[i]))
    held = set(ranked[: max(1, round(HELD_OUT * len(train)))])
    relabel = {"input_columns": ["split"], "desc": "validation split"}
    validation = train.select(sorted(held)).map(lambda _: {"split": "validation"}, **relabel)
    splits["train"] = train.select([i for i in range(len(train)) if i not in held])
    splits["validation"] = validation
    logger.warning(
        "load_data: no validation split given; held out %d of %d train images as validation "
        "(a fixed tenth, by image id)",
        len(validation),
        len(train),
    )
    return splits


def _digest(image_id: str) -> str:
    return hashlib.sha256(image_id.encode()).hexdigest()
