"""Image-text shards as web-scale data is held: WebDataset tar files, img2dataset's output
(`key.jpg` / `key.png`, `key.txt`, `key.json` per sample).

Two ways in:

- `ShardImages`: the samples of local tar files, indexed once (member headers only) and read
  lazily by position, for `edje encode --shards` (each process encodes its share of batches;
  a re-run skips what the store holds, so an encode resumes where it stopped).
- `stream_shards`: a `datasets` streaming data set over local paths or URLs, split across
  nodes (`datasets.distributed.split_dataset_by_node`) and DataLoader workers without
  duplicates, for training with the vision encoder in the step (`edje.training.streaming`);
  `stream_dataset` gives Hub data sets (parquet and the rest) streamed in the same rows.

`datasets` streaming is the one library for both: it reads tar shards and Hub / parquet data
with one API and one node split, its order is deterministic (a resumed run can skip exactly
what it trained on), and it is already edje's dependency. litdata would first convert 14M
images into its own format; webdataset reads tar shards only.

Patterns take brace ranges and lists, as WebDataset and img2dataset name shards:

    >>> expand_shards("data/{00000..00002}.tar")
    ['data/00000.tar', 'data/00001.tar', 'data/00002.tar']
    >>> expand_shards(["a/{x,y}.tar", "b.tar"])
    ['a/x.tar', 'a/y.tar', 'b.tar']
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edje._utils import open_regular

__all__ = ["IMAGE_EXTENSIONS", "ShardImages", "expand_shards", "stream_dataset", "stream_shards"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset writes jpg; the first found wins
CAPTION_EXTENSIONS = ("txt", "caption")
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Shard paths or URLs from brace patterns (`{000..123}` keeps the zero padding,
    `{a,b}` lists), in order; nothing else is interpreted (no globbing)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pattern in patterns:
        match = _BRACES.search(pattern)
        if match is None:
            out.append(pattern)
            continue
        head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
        span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if span:
            first, last = span.groups()
            if int(last) < int(first):
                raise ValueError(f"expand_shards: the range {{{body}}} in {pattern!r} is empty.")
            width = len(first)
            choices = [f"{n:0{width}d}" for n in range(int(first), int(last) + 1)]
        else:
            choices = body.split(",")
        out += expand_shards([head + choice + tail for choice in choices])
    return out


class ShardImages(Sequence):
    """The samples of local tar shards: `ids` (the samples' keys), `captions`, and each
    sample's image bytes by position (`self[i]`), read from its tar when asked.

    Keys must be unique across the shards (img2dataset's are): a repeated key is refused,
    naming both shards. A sample without an image is refused, naming it.
    """

    def __init__(self, shards: str | Iterable[str]):
        self.shards = expand_shards(shards)
        self.ids: list[str] = []
        self.captions: list[str | None] = []
        self._where: list[tuple[int, int, int]] = []  # (shard, data offset, size)
        seen: dict[str, str] = {}
        for number, shard in enumerate(self.shards):
            if "://" in shard:
                raise ValueError(
                    f"ShardImages: {shard} is a URL; encoding reads local shards (download them "
                    "first, e.g. with `huggingface-cli download` or `aws s3 sync`)."
                )
            for key, members in _samples(shard):
                if key in seen:
                    raise ValueError(
                        f"ShardImages: sample key {key!r} is in {seen[key]} and in {shard}; "
                        "keys must be unique across shards."
                    )
                seen[key] = shard
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                if image is None:
                    raise ValueError(
                        f"ShardImages: sample {key!r} in {shard} has no image "
                        f"({', '.join(sorted(members))}; expected one of {IMAGE_EXTENSIONS})."
                    )
                self.ids.append(key)
                self._where.append((number, image.offset_data, image.size))
                caption = next((members[e] for e in CAPTION_EXTENSIONS if e in members), None)
                self.captions.append(None if caption is None else _read(shard, caption))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        shard, offset, size = self._where[index]
        with open_regular(self.shards[shard]) as file:
            file.seek(offset)
            return file.read(size)


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key: up to the name's first dot


def _samples(shard: str) -> Iterable[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) per sample, in the shard's order, grouped as WebDataset
    readers (and `stream_shards`, which `edje fit` trains from) group them: consecutive
    members sharing the name up to its first dot, hidden names (`.x`, `__x`) skipped. So a
    shard is indexed as it is streamed, sample for sample; what a stream would read otherwise
    than meant is refused, naming it: a sample's files apart (two samples to a stream), or one
    extension twice (`a.jpg` and `a.JPG`: one would replace the other)."""
    grouped: dict[str, dict[str, tarfile.TarInfo]] = {}
    current = None
    try:
        # Headers only (the data is read by offset); a FIFO or device is refused, not waited on.
        with open_regular(shard) as file, tarfile.open(fileobj=file, mode="r:") as tar:
            for member in tar:
                name = member.name.rpartition("/")[2]
                match = _MEMBER.match(member.name)
                if not member.isreg() or name.startswith((".", "__")) or match is None:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                if key != current and key in grouped:
                    raise ValueError(
                        f"ShardImages: the files of sample {key!r} are not together in {shard} "
                        f"({member.name} comes after other samples); a stream would read two "
                        "samples. Keys must be unique: write each sample's files in a row."
                    )
                members = grouped.setdefault(key, {})
                if extension in members:
                    raise ValueError(
                        f"ShardImages: sample {key!r} in {shard} has {members[extension].name} "
                        f"and {member.name}; one would silently replace the other."
                    )
                members[extension], current = member, key
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"ShardImages: cannot read the shard {shard}: {error}") from None
    return grouped.items()


def _read(shard: str, member: tarfile.TarInfo) -> str:
    with open_regular(shard) as file:
        file.seek(member.offset_data)
        return file.read(member.size).decode("utf-8", errors="replace").strip()


def stream_dataset(
    path: str,
    *,
    data_files: str | list[str] | None = None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Any:
    """A Hub data set (or a builder over local files, e.g. `"parquet"` with `data_files`),
    streamed, in `stream_shards`'s rows and split the same way. Keys come from `id_column`, or
    else from the image's bytes (equal images, equal keys: never each other's negatives)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    stream = datasets.load_dataset(path, data_files=data_files, split=split, streaming=True)
    missing = [c for c in (image_column, caption_column, id_column) if c and c not in
               (stream.features or {})]  # fmt: skip
    if missing:
        raise ValueError(
            f"stream_dataset: {path} has no column {missing[0]!r}; its columns are "
            f"{sorted(stream.features or {})}."
        )
    stream = stream.cast_column(image_column, datasets.Image(decode=False))
    columns = [image_column, caption_column] + ([id_column] if id_column else [])
    stream = stream.select_columns(columns).map(
        lambda row: {
            "__key__": str(row[id_column]) if id_column else _bytes_key(row[image_column]),
            "image": row[image_column],
            "caption": row[caption_column],
        },
        remove_columns=columns,
    )
    return split_dataset_by_node(stream, rank=rank, world_size=world_size)


def _bytes_key(image: dict) -> str:
    import hashlib

    data = image.get("bytes") or Path(image["path"]).read_bytes()
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def stream_shards(shards: str | Iterable[str], *, rank: int = 0, world_size: int = 1) -> Any:
    """A `datasets.IterableDataset` over the shards (local paths or URLs), streamed: rows
    `{"__key__", "image" (undecoded {"bytes", "path"}), "caption"}`, this node's share only.

    Whole shards go to nodes when their number divides evenly, else every `world_size`-th
    sample; DataLoader workers then split this node's shards among themselves.
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    files = expand_shards(shards)
    stream = datasets.load_dataset(
        "webdataset", data_files={"train": files}, split="train", streaming=True
    )
    image = next((e for e in IMAGE_EXTENSIONS if e in stream.features), None)
    caption = next((e for e in CAPTION_EXTENSIONS if e in stream.features), None)
    if image is None or caption is None:
        raise ValueError(
            f"stream_shards: the shards' samples hold {sorted(stream.features)}; expected an "
            f"image ({', '.join(IMAGE_EXTENSIONS)}) and a caption "
            f"({', '.join(CAPTION_EXTENSIONS)})."
        )
    stream = stream.cast_column(image, datasets.Image(decode=False))
    stream = stream.select_columns(["__key__", image, caption])
    stream = stream.rename_columns({image: "image", caption: "caption"})
    return split_dataset_by_node(stream, rank=rank, world_size=world_size)
