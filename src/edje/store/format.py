"""On-disk format of a token store: shard files (safetensors) and the manifest (JSON).

A store is a folder:

```text
STORE/
  manifest.json                   index of everything below (written last, atomically)
  shards/r000-000000.safetensors  one file per flush of one writer (rank 0, sequence 0)
  shards/r001-000000.safetensors  ...
```

Each shard is a plain safetensors file (`safetensors.safe_open` reads it) holding

- `row_crc32`: `[rows]` `U32`, the CRC-32 of each row's token bytes followed by its
  scale bytes (format version 2 on): checked on every read, so a flipped byte is an error
  naming the shard and the id instead of a silently different score;
- `scales`: `[rows, m]` `F32`, only for int8 stores (token = int8 row x its scale),
  stored before the tokens so every tensor stays aligned;
- `tokens`: `[rows, m, d]` in the store dtype (`F16`, `BF16` or `I8`);

and, in the header's `__metadata__` (all strings): `format`, `dtype` (the store dtype),
`ids` (JSON list, row order),
`failures` (JSON object id -> reason, for the images of this shard that could not be
encoded), `fingerprint` (JSON) and `data_sha256` (sha256 of the bytes after the header).
Every shard describes itself, so the manifest can be rebuilt from the shard headers alone
(which is how an interrupted run resumes and how ranks' shards are merged).

The manifest holds `format`, `format_version`, `dtype`, `token_shape` `[m, d]`,
`count`, `fingerprint`, `failures` and `shards`: a list of `{"file", "rows", "bytes",
"data_sha256", "ids"}`; the row of an id is its position in its shard's `ids`.

Files are written as `NAME.tmp-<pid>` and renamed, so a reader never sees half a file.

Integrity checks, from cheap to thorough: opening a store stats every shard (missing or
truncated files: the size must equal the manifest's `bytes`); the first read of a shard parses
its header and checks its size, row count and `data_sha256` field against the manifest; every
read checks each row it returns against `row_crc32` (a version 1 shard, which has none, is
re-hashed whole on its first read instead); `TokenStore.verify()` (or `open(verify=True)`)
re-hashes every shard's data and checks every token is finite, reading it all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edje._utils import TMP_MARK, atomic_write, open_regular

FORMAT = "edje-token-store"
FORMAT_VERSION = 2  # 2: per-row CRC-32s (`row_crc32`)
READABLE_VERSIONS = (1, 2)
ROW_CHECKSUMS = "row_crc32"
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".safetensors"
SHARD_NAME = re.compile(r"r\d{3}-\d{6,}\.safetensors")  # rank, sequence: what edje writes

# store dtype -> (safetensors dtype tag, numpy dtype used to memory-map the bytes)
STORE_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "float16": ("F16", np.dtype(np.float16)),
    "bfloat16": ("BF16", np.dtype(np.uint16)),  # numpy has no bf16: read bits, view in torch
    "int8": ("I8", np.dtype(np.int8)),
}
SCALE_DTYPE = ("F32", np.dtype(np.float32))
CHECKSUM_DTYPE = ("U32", np.dtype("<u4"))


class StoreCorruptError(ValueError):
    """A shard or manifest is truncated, unreadable or does not match its checksum."""


def check_dtype(dtype: str) -> str:
    """Return `dtype` if it is a store dtype, else raise a ValueError naming the choices."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"TokenStore: dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    return dtype


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a shard lies in its file, for memory-mapping."""

    dtype: str  # safetensors tag, e.g. "F16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one shard file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int  # expected size: header + data

    @property
    def ids(self) -> list[str]:
        return json.loads(self.metadata.get("ids", "[]"))

    @property
    def failures(self) -> dict[str, str]:
        return json.loads(self.metadata.get("failures", "{}"))

    @property
    def fingerprint(self) -> dict:
        return json.loads(self.metadata.get("fingerprint", "{}"))

    @property
    def data_sha256(self) -> str:
        return self.metadata.get("data_sha256", "")


def _tag_itemsize(tag: str) -> int:
    return {"F16": 2, "BF16": 2, "I8": 1, "F32": 4, "U32": 4}[tag]


def row_checksum(tokens: np.ndarray, scales: np.ndarray | None) -> int:
    """CRC-32 of one row's token bytes, then its scale bytes (int8 stores)."""
    crc = zlib.crc32(np.ascontiguousarray(tokens))
    return crc if scales is None else zlib.crc32(np.ascontiguousarray(scales), crc)


def row_checksums(tokens: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """`[rows]` `row_checksum` of each row."""
    sums = [row_checksum(t, None if scales is None else scales[n]) for n, t in enumerate(tokens)]
    return np.asarray(sums, dtype=CHECKSUM_DTYPE[1])


def write_shard(
    path: Path,
    tensors: Mapping[str, tuple[str, tuple[int, ...], bytes | memoryview]],
    metadata: Mapping[str, str],
) -> int:
    """Write a safetensors file atomically (temp name, fsync, rename); return its size.

    `tensors` maps name -> (safetensors dtype tag, shape, raw little-endian bytes). The
    sha256 of the data section is added to the metadata as `data_sha256`.
    """
    digest = hashlib.sha256()
    header: dict[str, object] = {}
    start = 0
    for name, (tag, shape, data) in tensors.items():
        nbytes = len(memoryview(data).cast("B"))
        expected = int(np.prod(shape, dtype=np.int64)) * _tag_itemsize(tag)
        if nbytes != expected:
            raise ValueError(
                f"write_shard: {name} has {nbytes} bytes, shape {shape} needs {expected}"
            )
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [start, start + nbytes]}
        digest.update(data)
        start += nbytes
    header["__metadata__"] = {**metadata, "data_sha256": digest.hexdigest()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes

    def write(temp: str) -> None:
        with open(temp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, _, data in tensors.values():
                f.write(data)

    atomic_write(path, write)
    return 8 + len(raw) + start


def read_shard_header(path: Path) -> ShardHeader:
    """Parse a shard's header and check the file is as long as the header says.

    Reads only the first `8 + header` bytes. Raises `StoreCorruptError` naming the file if
    the header is unreadable or the file is truncated.
    """
    try:
        with open_regular(path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreCorruptError(f"shard {path} is truncated: {len(head)} bytes, no header")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100_000_000:
                raise StoreCorruptError(
                    f"shard {path} is truncated or corrupt: header of {n} bytes"
                )
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"shard {path} has a corrupt header: {e}") from None
    except FileNotFoundError:
        raise StoreCorruptError(f"shard {path} is missing") from None
    metadata = header.pop("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StoreCorruptError(f"shard {path} has a corrupt header: not a safetensors header")
    if metadata.get("format") != FORMAT:
        raise StoreCorruptError(f"{path} is not an edje token-store shard (no format={FORMAT!r})")
    tensors = {}
    end = 0
    try:
        for name, info in header.items():
            begin, stop = info["data_offsets"]
            tensors[name] = TensorInfo(
                info["dtype"], tuple(info["shape"]), 8 + n + begin, stop - begin
            )
            end = max(end, stop)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreCorruptError(f"shard {path} has a corrupt header: {e!r}") from None
    expected = 8 + n + end
    if size != expected:
        raise StoreCorruptError(
            f"shard {path} is truncated or corrupt: {size} bytes on disk, header says {expected}"
        )
    return ShardHeader(Path(path), tensors, metadata, expected)


def data_sha256(path: Path, header: ShardHeader, chunk: int = 1 << 22) -> str:
    """sha256 of a shard's data section (everything after the header)."""
    start = min((t.offset for t in header.tensors.values()), default=header.file_size)
    digest = hashlib.sha256()
    with open_regular(path) as f:
        f.seek(start)
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON atomically: readers see the old or the new file."""
    text = json.dumps(obj, separators=(",", ":"))
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def list_shards(root: Path) -> list[Path]:
    """Completed shard files of a store, sorted by name (temporary files excluded)."""
    folder = Path(root) / SHARD_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIX))


def foreign_files(root: Path) -> list[Path]:
    """What a store folder holds that edje did not write: anything in `shards/` not named as
    edje names shards or temporaries, and a manifest that is not a store's."""
    root = Path(root)
    folder = root / SHARD_DIR
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    foreign = [
        p
        for p in entries
        if not p.is_file() or not (SHARD_NAME.fullmatch(p.name) or TMP_MARK in p.name)
    ]
    manifest = root / MANIFEST_NAME
    if os.path.lexists(manifest):
        try:
            with open_regular(manifest) as file:  # a FIFO: not ours, and never waited on
                ours = json.loads(file.read().decode("utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            foreign.append(manifest)
    return foreign


def remove_store(root: Path) -> None:
    """Delete the store at `root`: its manifest, shards and half-written files, and nothing
    else (the folder and any other file in it stay). Refuses, deleting nothing, when the store's
    folders hold files edje did not write."""
    root = Path(root)
    refuse_foreign_files(root, "replace")
    folder = root / SHARD_DIR
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        p.unlink()
    (root / MANIFEST_NAME).unlink(missing_ok=True)


def refuse_foreign_files(root: Path, action: str) -> None:
    """Raise `FileExistsError` naming the files edje did not write in the store at `root`."""
    foreign = foreign_files(root)
    if foreign:
        names = ", ".join(str(p) for p in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"TokenStore: will not {action} {root}: it holds {len(foreign)} files edje did not "
            f"write ({names}); choose another folder for the store."
        )


def remove_temporaries(root: Path) -> list[Path]:
    """Delete files left half-written by a killed writer; return what was removed."""
    removed = []
    for folder in (Path(root), Path(root) / SHARD_DIR):
        if folder.is_dir():
            for p in folder.iterdir():
                if TMP_MARK in p.name and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def build_manifest(
    root: Path,
    headers: Iterable[ShardHeader],
    *,
    dtype: str,
    token_shape: tuple[int, int],
    fingerprint: Mapping,
) -> dict:
    """Merge shard headers into a manifest; refuse duplicate ids and foreign shards. An id that
    failed in one shard and was encoded in a later one (a retry) counts as encoded."""
    root = Path(root)
    shards, failures, seen = [], {}, set()
    for h in headers:
        check_shard_matches(h, dtype, token_shape, fingerprint)
        ids = h.ids
        dup = seen.intersection(ids)
        if dup:
            raise StoreCorruptError(
                f"shard {h.path} repeats ids of other shards: {sorted(dup)[:5]}"
            )
        seen.update(ids)
        failures.update(h.failures)
        shards.append(
            {
                "file": h.path.relative_to(root).as_posix(),
                "rows": len(ids),
                "bytes": h.file_size,
                "data_sha256": h.data_sha256,
                "ids": ids,
            }
        )
    failures = {i: reason for i, reason in failures.items() if i not in seen}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "token_shape": list(token_shape),
        "count": sum(s["rows"] for s in shards),
        "fingerprint": dict(fingerprint),
        "failures": failures,
        "shards": shards,
    }


def check_shard_matches(
    h: ShardHeader, dtype: str, token_shape: tuple[int, int], fingerprint: Mapping
) -> None:
    """Raise if shard `h` was written with another dtype, token shape or fingerprint."""
    tokens = h.tensors.get("tokens")
    if tokens is None or len(tokens.shape) != 3 or len(h.ids) != tokens.shape[0]:
        raise StoreCorruptError(f"shard {h.path} has no [rows, m, d] 'tokens' matching its ids")
    got = (h.metadata.get("dtype"), list(tokens.shape[1:]))
    if got != (dtype, list(token_shape)):
        raise StoreCorruptError(
            f"shard {h.path} holds {got[0]} tokens of shape {got[1]}, "
            f"the store expects {dtype} {list(token_shape)}"
        )
    if h.fingerprint != dict(fingerprint):
        raise StoreCorruptError(
            f"shard {h.path} was made with fingerprint {h.fingerprint}, the store expects "
            f"{dict(fingerprint)}"
        )


def quantize_int8(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: `tokens [B, m, d]` -> `(q int8 [B, m, d], scales f32 [B, m])`.

    `q * scale` is within `scale / 2 = max|token| / 254` of each value of its token.
    """
    x = tokens.detach().to(torch.float32)
    scales = x.abs().amax(dim=-1) / 127.0  # [B, m]
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(x / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int8`: `q [B, m, d]`, `scales [B, m]` -> `[B, m, d]` `dtype`."""
    if dtype == torch.bfloat16:  # int8 is exact in bf16; the fast path on CPUs
        return q.to(torch.bfloat16) * scales.to(torch.bfloat16).unsqueeze(-1)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    torch.mul(q, scales.to(torch.float32).unsqueeze(-1), out=out)
    return out if dtype == torch.float32 else out.to(dtype)


def check_manifest(manifest: object, where: Path) -> None:
    """Refuse a manifest that does not describe a store edje wrote, naming the field, before
    anything is read through it: known dtype, a 2-D token shape, shard files named as edje
    names them inside `shards/` (no other path is ever opened), no shard listed twice, rows
    equal to their ids, every id once, strings for ids and failure reasons, and a count that
    adds up."""

    def refuse(what: str) -> None:
        raise StoreCorruptError(f"TokenStore: {where} is not a valid manifest: {what}")

    if not isinstance(manifest, dict):
        refuse(f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("dtype") not in STORE_DTYPES:
        refuse(f"dtype {manifest.get('dtype')!r}, expected one of {sorted(STORE_DTYPES)}")
    shape = manifest.get("token_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_whole(v, 1) for v in shape)):
        refuse(f"token_shape {shape!r}, expected [m, d] of whole numbers >= 1")
    if not isinstance(manifest.get("fingerprint", {}), dict):
        refuse(f"fingerprint must be an object, got {type(manifest['fingerprint']).__name__}")
    shards, failures = manifest.get("shards"), manifest.get("failures", {})
    if not isinstance(shards, list) or not all(isinstance(x, dict) for x in shards):
        refuse("shards must be a list of objects")
    if not isinstance(failures, dict) or not all(isinstance(v, str) for v in failures.values()):
        refuse("failures must map image ids to reasons (strings)")
    files, ids = set(), set(failures)
    for n, shard in enumerate(shards):
        file = shard.get("file")
        name = file[len(SHARD_DIR) + 1 :] if isinstance(file, str) else ""
        if not (file == f"{SHARD_DIR}/{name}" and SHARD_NAME.fullmatch(name)):
            refuse(f"shard {n} names the file {file!r}, not {SHARD_DIR}/rNNN-NNNNNN.safetensors")
        if file in files:
            refuse(f"shard file {file} is listed twice")
        files.add(file)
        shard_ids = shard.get("ids")
        if not isinstance(shard_ids, list) or not all(isinstance(i, str) for i in shard_ids):
            refuse(f"shard {file}: ids must be a list of strings")
        if not _whole(shard.get("rows"), 0) or shard["rows"] != len(shard_ids):
            refuse(f"shard {file}: rows {shard.get('rows')!r} for {len(shard_ids)} ids")
        if not _whole(shard.get("bytes"), 0):
            refuse(f"shard {file}: bytes {shard.get('bytes')!r}")
        if not isinstance(shard.get("data_sha256"), str):
            refuse(f"shard {file}: data_sha256 {shard.get('data_sha256')!r}, expected a string")
        repeated = ids.intersection(shard_ids)
        if repeated or len(set(shard_ids)) != len(shard_ids):
            refuse(f"shard {file} repeats ids: {sorted(repeated)[:5] or 'within the shard'}")
        ids.update(shard_ids)
    count = sum(shard["rows"] for shard in shards)
    if manifest.get("count") != count:
        refuse(f"count {manifest.get('count')!r}, but its shards hold {count} rows")


def _whole(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least
