"""`load_data`: every data set by one name, the same for `edje fit`, `eval`, `encode`, `index`
and the quickstart.

A name is `"builtin"`, `"emoji"`, `"flickr30k"`, `"coco"`, or a folder of your own images;
names joined by `+` (`"builtin+emoji"`, the quickstart's) give each split of all of them
together (their image ids must not collide):

- one folder with `metadata.jsonl` / `metadata.csv`: the train split;
- or split folders `train/`, `validation/`, `test/`, each with its own metadata. Image ids get
  the split folder's name in front (`test/0000`), so the same file name may appear in several.

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
from collections.abc import Sequence
from pathlib import Path

from datasets import DatasetDict, concatenate_datasets

__all__ = ["DATA_NAMES", "SPLITS", "load_data"]

logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
DATA_NAMES = ("builtin", "emoji", "flickr30k", "coco")
HELD_OUT = 0.1  # share of train held out as validation when no validation split is given


def load_data(
    name: str | Path | DatasetDict,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    builtin: dict[str, int] | None = None,
    splits: Sequence[str] | None = None,
) -> DatasetDict:
    """The splits of a named data set or a folder (see the module docstring); a `DatasetDict`
    in edje's schema is returned as it is. `data_dir` is where Flickr30k / COCO files are;
    `builtin` sizes the built-in set (`make_builtin_dataset`'s `n_*` arguments). `splits`
    keeps only those splits: Flickr30k and COCO then read (or download) no other split's files.
    """
    if splits is None:
        return _load_all(name, data_dir=data_dir, seed=seed, builtin=builtin)
    if name in ("flickr30k", "coco"):
        return _karpathy(name, data_dir, splits)
    loaded = _load_all(name, data_dir=data_dir, seed=seed, builtin=builtin)
    return DatasetDict({s: loaded[s] for s in splits if s in loaded})


def _load_all(name, *, data_dir, seed, builtin) -> DatasetDict:
    from edje import data as edje_data

    if isinstance(name, DatasetDict):
        return name
    if isinstance(name, str) and "+" in name and not Path(name).is_dir():  # "c++/photos" is one
        return _combined(name.split("+"), data_dir=data_dir, seed=seed, builtin=builtin)
    if name == "builtin":
        return edje_data.make_builtin_dataset(seed=seed, **(builtin or {}))
    if name == "emoji":
        return edje_data.load_emoji()
    if name in ("flickr30k", "coco"):
        return _karpathy(name, data_dir, SPLITS)
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(
            f"load_data: expected one of {DATA_NAMES} or a folder of images with metadata, "
            f"got {str(name)!r}"
        )
    return _with_validation(_folder_splits(folder))


def _karpathy(name: str, data_dir: str | None, splits: Sequence[str]) -> DatasetDict:
    from edje import data as edje_data

    load = edje_data.load_flickr30k if name == "flickr30k" else edje_data.load_coco_karpathy
    return DatasetDict({split: load(split, data_dir=data_dir) for split in splits})


def _combined(names: list[str], **options) -> DatasetDict:
    parts = [load_data(name, **options) for name in names]
    splits = [s for s in SPLITS if any(s in part for part in parts)]
    combined = DatasetDict(
        {s: concatenate_datasets([part[s] for part in parts if s in part]) for s in splits}
    )
    ids = [i for split in combined.values() for i in split["image_id"]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"load_data: the image ids of {'+'.join(names)} collide")
    return combined


def _folder_splits(folder: Path) -> DatasetDict:
    from edje.data.folder import load_image_folder

    present = [s for s in SPLITS if (folder / s).is_dir()]
    if not present:
        return DatasetDict({"train": load_image_folder(folder, split="train")})
    return DatasetDict(
        {s: load_image_folder(folder / s, split=s, id_prefix=f"{s}/") for s in present}
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
