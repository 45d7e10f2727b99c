"""Your own images: a folder of images plus `metadata.jsonl`, `metadata.csv` or
`metadata.parquet`: the layout of `datasets`' imagefolder, so the same folder also loads
with `load_dataset("imagefolder", ...)`.

Metadata columns: `file_name` (relative to the folder) and the captions: `caption` (one
string) and/or `captions` (a list; in CSV a JSON list such as `["a dog", "a brown dog"]`),
else `text` (the usual column of Hub image-text sets), or the column `caption_column`
names; optionally `image_id` (default: `file_name` without its suffix,
`edje._utils.image_id`, as `edje encode --images` names it). Several rows may name the same
file: their captions are merged. Other columns are ignored.

Images in the folder that no metadata row names are an error by default (so that a typo in
`file_name` cannot silently drop data); `skip_uncaptioned=True` skips them with a warning.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from edje.data.folder import load_image_folder
    >>> folder = Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8), "red").save(folder / "red.png")
    >>> row = {"file_name": "red.png", "captions": ["a red square", "red"]}
    >>> _ = (folder / "metadata.jsonl").write_text(json.dumps(row) + "\\n")
    >>> ds = load_image_folder(folder, split="test")
    >>> ds[0]["image_id"], ds[0]["captions"], ds[0]["split"]
    ('red', ['a red square', 'red'], 'test')
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import datasets

from edje._utils import IMAGE_SUFFIXES
from edje._utils import image_id as file_image_id
from edje.data.columns import caption_list
from edje.data.schema import make_dataset

__all__ = ["load_image_folder", "read_captions"]
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
CAPTION_COLUMNS = ("caption", "captions")  # read together when present
TEXT_COLUMN = "text"  # else this one, as Hub image-text sets name it


def load_image_folder(
    folder: str | Path,
    metadata: str | Path | None = None,
    *,
    split: str | None = None,
    skip_uncaptioned: bool = False,
    id_prefix: str = "",
    caption_column: str | None = None,
) -> datasets.Dataset:
    """Load a folder of captioned images in the common schema.

    Args:
        folder: the image folder (images may sit in sub-folders; `file_name` is relative).
        metadata: the metadata file; default `folder/metadata.jsonl` or `metadata.csv`.
        split: the `split` value; default the folder's name (`data/test` -> `"test"`).
        skip_uncaptioned: skip images no row names, with a warning, instead of raising.
        id_prefix: put before every image id (`"test/"`: ids stay unique across split
            folders that repeat file names).
        caption_column: the metadata column holding the captions (a string or a list a row);
            default `caption` and/or `captions`, else `text`.

    Raises:
        FileNotFoundError: the folder, the metadata file, or a listed image is missing.
        ValueError: wrong metadata columns, an empty caption, uncaptioned images, or two
            files with the same image id.
    """
    folder = Path(folder).resolve()  # the dataset keeps paths: make them cwd-independent
    if not folder.is_dir():
        raise FileNotFoundError(f"load_image_folder: {folder} is not a folder")
    metadata = Path(metadata) if metadata is not None else _find_metadata(folder)
    rows = _read_rows(metadata)
    by_file = _merge_rows(rows, metadata, _caption_columns(rows, caption_column, metadata))
    for file_name in by_file:
        if not (folder / file_name).is_file():
            raise FileNotFoundError(
                f"{metadata}: file_name {file_name!r} is listed but {folder / file_name} "
                "does not exist"
            )
    _check_uncaptioned(folder, set(by_file), skip_uncaptioned)
    ids = _check_unique_ids(by_file, metadata)
    return make_dataset(
        [str(folder / f) for f in by_file],
        [id_prefix + i for i in ids],
        [captions for _, captions in by_file.values()],
        split or folder.name,
    )


def _find_metadata(folder: Path) -> Path:
    found = [folder / name for name in METADATA_NAMES if (folder / name).is_file()]
    if not found:
        raise FileNotFoundError(
            f"load_image_folder: no metadata in {folder}; expected one of {METADATA_NAMES}"
        )
    if len(found) > 1:
        raise ValueError(f"load_image_folder: both {found[0]} and {found[1]} exist; keep one")
    return found[0]


def _read_rows(metadata: Path) -> list[dict]:
    """Rows as dicts; a CSV cell holding a JSON list (`["a dog", "a brown dog"]`) becomes
    that list (a `captions` cell must; in other columns a cell that does not parse stays
    text, such as `[draft] a dog`)."""
    if not metadata.is_file():
        raise FileNotFoundError(f"load_image_folder: metadata file {metadata} does not exist")
    text = "" if metadata.suffix == ".parquet" else metadata.read_text(encoding="utf-8")
    if metadata.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{metadata}, line {line_no}: not valid JSON ({err})") from err
    elif metadata.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        for row_no, row in enumerate(rows, start=1):
            for column, cell in row.items():
                if isinstance(cell, str) and cell.strip().startswith("["):
                    try:
                        row[column] = json.loads(cell)
                    except json.JSONDecodeError as err:
                        if column != "captions":
                            continue
                        raise ValueError(
                            f"{metadata}, row {row_no}: captions {cell!r} is not a JSON list "
                            f"({err})"
                        ) from err
    elif metadata.suffix == ".parquet":
        import pyarrow.parquet

        rows = pyarrow.parquet.read_table(metadata).to_pylist()
    else:
        raise ValueError(
            f"load_image_folder: metadata must be .jsonl, .csv or .parquet, got {metadata}"
        )
    if not rows:
        raise ValueError(f"{metadata}: no rows")
    return rows


def _caption_columns(rows: list[dict], chosen: str | None, metadata: Path) -> tuple[str, ...]:
    """Which columns hold the captions (see the module docstring); refused by name when the
    metadata lacks them."""
    columns = set().union(*(row.keys() for row in rows))
    found = (chosen,) if chosen else tuple(c for c in CAPTION_COLUMNS if c in columns)
    if not chosen and not found and TEXT_COLUMN in columns:
        found = (TEXT_COLUMN,)
    if "file_name" not in columns or not found or not set(found) <= columns:
        wanted = repr(chosen) if chosen else "'caption', 'captions' or 'text'"
        raise ValueError(
            f"{metadata}: expected columns 'file_name' and {wanted} (optionally 'image_id'), "
            f"got {sorted(columns)}; name another caption column with caption_column= "
            "(--caption-column)"
        )
    return found


def _merge_rows(
    rows: list[dict], metadata: Path, caption_columns: tuple[str, ...]
) -> dict[str, tuple[str | None, list[str]]]:
    """file_name -> (image_id or None, captions of all its rows, in order)."""
    by_file: dict[str, tuple[str | None, list[str]]] = {}
    for row_no, row in enumerate(rows, start=1):
        where = f"{metadata}, row {row_no}"
        file_name = row.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise ValueError(f"{where}: expected a file_name, got {file_name!r}")
        captions = []
        for column in caption_columns:
            if row.get(column) not in (None, ""):  # a CSV row may leave one of the two empty
                captions += caption_list(row[column], f"{where} ({file_name}), {column!r}")
        if not captions:
            raise ValueError(f"{where} ({file_name}): empty caption; expected a non-empty string")
        image_id = row.get("image_id")
        if image_id in (None, ""):  # a CSV row may leave it empty: from the file name
            image_id = None
        elif not isinstance(image_id, str) or not image_id.strip():
            raise ValueError(
                f"{where} ({file_name}): expected image_id to be a non-empty string, got "
                f"{image_id!r}"
            )
        old_id, old_captions = by_file.get(file_name, (image_id, []))
        if old_id != image_id and image_id is not None and old_id is not None:
            raise ValueError(
                f"{where} ({file_name}): image_id {image_id!r} differs from {old_id!r} given "
                "in an earlier row for the same file"
            )
        by_file[file_name] = (old_id or image_id, old_captions + captions)
    return by_file


def _check_uncaptioned(folder: Path, listed: set[str], skip: bool) -> None:
    on_disk = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    }
    uncaptioned = sorted(on_disk - {Path(f).as_posix() for f in listed})
    if not uncaptioned:
        return
    message = (
        f"load_image_folder: {len(uncaptioned)} image(s) in {folder} have no caption in the "
        f"metadata, e.g. {uncaptioned[:5]}"
    )
    if not skip:
        raise ValueError(message + "; add rows for them or pass skip_uncaptioned=True")
    warnings.warn(message + "; skipped", stacklevel=3)


def _check_unique_ids(
    by_file: dict[str, tuple[str | None, list[str]]], metadata: Path
) -> list[str]:
    ids, owner = [], {}
    for file_name, (image_id, _) in by_file.items():
        image_id = image_id or file_image_id(file_name)
        if image_id in owner:
            raise ValueError(
                f"{metadata}: image_id {image_id!r} is used by both {owner[image_id]!r} and "
                f"{file_name!r}; ids must be unique (give an image_id column)"
            )
        owner[image_id] = file_name
        ids.append(image_id)
    return ids


def read_captions(path: str | Path) -> list[str]:
    """The captions of a captions file: one per line, or JSONL objects with a "caption" (or
    "text") field, as `edje quickstart` writes them; blank lines are skipped.

    Raises:
        ValueError: a JSON line that does not parse or has neither field, or no captions.
    """
    captions = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            line = line.strip()
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                line = record.get("caption", record.get("text"))
                if not isinstance(line, str):
                    raise ValueError(f'{path}:{number}: expected a "caption" or "text" string')
            if line:
                captions.append(line)
    if not captions:
        raise ValueError(f"{path}: expected captions, one per line or JSONL; found none")
    return captions
