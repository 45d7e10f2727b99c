"""Any Hugging Face Hub data set of images and captions, by its id (`owner/name`), in the schema.

`load_hub_dataset("user/my-captions")` loads the repository with `datasets.load_dataset`
(parquet, imagefolder with `metadata.jsonl`, webdataset, ...: whatever `datasets` reads; from its
cache when the Hub is offline) and maps each of its splits to edje's:

- splits: named as `datasets`' imagefolder names split folders (`val` / `dev` / `valid` are the
  validation split, `testing` / `eval` the test split, ...); other splits are left out, and a
  log line names them;
- columns: the image from `image`, `img`, `jpg` or `png` (an `Image` feature, or paths / URLs
  read when a row is); the captions from `caption`, `captions`, `text`, `sentences` or
  `sentence` (a string or a list a row); rows sharing an `image_id`, `filename`, `file_name` or
  `img_id` are one image. Each can be named instead (`image_column=`, ...);
- image ids: the id column's values (file names lose their image suffix, as `edje encode`
  names files), else the repository's split and the row number (`"test/0"`), so the ids of all
  splits can share one token store.

Only names shaped like a repository id go to the Hub: `load_data` tries a local folder first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import datasets

from edje._utils import image_id
from edje.data.columns import assemble
from edje.data.schema import SPLIT_FOLDERS, check_unique_ids

__all__ = ["is_hub_id", "load_hub_dataset"]

logger = logging.getLogger(__name__)
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentence")
# file names first: ids then match a store of the same files (`edje encode --images`)
ID_COLUMNS = ("image_id", "filename", "file_name", "img_id")
# owner/name as the Hub spells repository ids: letters, digits, "-", "_", "." (no leading dot)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(name: object) -> bool:
    """Whether `name` is shaped like a Hub repository id (`owner/name`)."""
    return isinstance(name, str) and _HUB_ID.fullmatch(name) is not None


def load_hub_dataset(
    repo_id: str,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    id_column: str | None = None,
) -> datasets.DatasetDict:
    """The train / validation / test splits of the Hub data set `repo_id` in the schema (see
    the module docstring); columns left as None are found by their usual names.

    Raises:
        FileNotFoundError: no such data set on the Hub, or the Hub is offline and it is not in
            the `datasets` cache.
        ValueError: no split or no column edje can read, naming those the repository has.
    """
    loaded = _load_repository(repo_id)
    out = datasets.DatasetDict()
    for split, names in SPLIT_FOLDERS.items():
        present = [n for n in loaded if n in names]
        if len(present) > 1:
            raise ValueError(f"{repo_id}: splits {present} are all {split}; expected one")
        if present:
            columns = (image_column, caption_column, id_column)
            out[split] = _to_schema(loaded[present[0]], repo_id, present[0], split, *columns)
    skipped = [n for n in loaded if not any(n in names for names in SPLIT_FOLDERS.values())]
    if not out:
        raise ValueError(
            f"{repo_id}: no train, validation or test split; its splits are {list(loaded)}"
        )
    if skipped:
        logger.warning("%s: left out splits %s (not train, validation or test)", repo_id, skipped)
    return check_unique_ids(out, repo_id)


def _load_repository(repo_id: str) -> datasets.DatasetDict:
    """Every split of `repo_id`: `load_dataset` prepares them all whichever `split` it is given,
    so one call lets split aliases be matched against the repository's own names."""
    try:
        loaded = datasets.load_dataset(repo_id)
    except OSError as error:  # not found, gated, unreachable, or offline and not cached
        raise FileNotFoundError(_not_loaded(repo_id, error)) from error
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"{repo_id}: expected a DatasetDict of splits, got {type(loaded)}")
    return loaded


def _not_loaded(repo_id: str, error: OSError) -> str:
    if datasets.config.HF_HUB_OFFLINE and isinstance(error, ConnectionError):
        return (
            f"{repo_id!r} is neither a local folder nor a Hub data set in the datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}), and the Hub is offline (HF_HUB_OFFLINE=1): "
            "load it once with the Hub reachable, or check the name"
        )
    return f"{repo_id!r} is neither a local folder nor a loadable Hub data set: {error}"


def _to_schema(ds, repo_id, repo_split, split, image_column, caption_column, id_column):
    where = f"{repo_id} ({repo_split} split)"
    image_column = _column(ds, image_column, IMAGE_COLUMNS, "image", where)
    caption_column = _column(ds, caption_column, CAPTION_COLUMNS, "caption", where)
    id_column = id_column or next((c for c in ID_COLUMNS if c in ds.column_names), None)
    if id_column is None:
        ids: Sequence[str] = [f"{repo_split}/{row}" for row in range(len(ds))]
    else:
        ids = [image_id(value) for value in ds[_column(ds, id_column, (), "id", where)]]
    captions = ds[caption_column]
    return assemble(ds, image_column, captions, ids, split, caption_column=caption_column)


def _column(ds, chosen: str | None, usual: Sequence[str], what: str, where: str) -> str:
    """The column `chosen` names, else the first usual one present; refused naming the
    columns the data set has."""
    found = chosen if chosen in ds.column_names else None
    if chosen is None:
        found = next((c for c in usual if c in ds.column_names), None)
    if found is None:
        wanted = repr(chosen) if chosen else " or ".join(map(repr, usual))
        raise ValueError(
            f"{where}: no {what} column {wanted}; its columns are {ds.column_names} (name the "
            f"{what} column with {what}_column= / --{what}-column)"
        )
    return found
