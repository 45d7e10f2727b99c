"""TokenStore: image tokens kept on disk once, read back by id at memory speed.

The on-disk format is described in `edje.store.format`; writing is `edje.store.writer`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from edje._utils import open_regular
from edje.store.fingerprint import RAW_ADAPTER, fingerprint_diff
from edje.store.format import (
    CHECKSUM_DTYPE,
    FORMAT,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    ROW_CHECKSUMS,
    SCALE_DTYPE,
    STORE_DTYPES,
    StoreCorruptError,
    check_manifest,
    data_sha256,
    dequantize_int8,
    read_shard_header,
    row_checksum,
)
from edje.store.writer import TokenStoreWriter

__all__ = ["StoreCorruptError", "TokenStore", "TokenStoreWriter"]


class MappedShard(NamedTuple):
    """One shard's memory maps: tokens, int8 scales (or None), row CRC-32s (None: version 1)."""

    tokens: np.ndarray
    scales: np.ndarray | None
    sums: np.ndarray | None


class TokenStore:
    """Read-only view of a token store: `len`, `ids`, `in`, `get`, `gather`.

    Opening reads only `manifest.json` (and stats the shard files to catch truncation); a
    shard's header is parsed and its tokens memory-mapped on first access. `gather` returns
    `[B, m, d]` in the store dtype (float16 / bfloat16); int8 stores are dequantised with
    their per-token scales to `float16`. `to(device)` loads the whole store onto a device.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/store"
        >>> with TokenStore.create(path, token_shape=(64, 384), fingerprint={"a": 1}) as w:
        ...     w.add(["cat.jpg", "dog.jpg"], torch.randn(2, 64, 384))
        >>> store = TokenStore.open(path)
        >>> store.gather(["dog.jpg", "cat.jpg"]).shape
        torch.Size([2, 64, 384])
        >>> "cat.jpg" in store, len(store), store.dtype
        (True, 2, 'float16')
    """

    def __init__(self, path: str | Path, manifest: Mapping) -> None:
        self.path = Path(path)
        self.manifest = dict(manifest)
        self.dtype: str = manifest["dtype"]
        self.token_shape: tuple[int, int] = tuple(manifest["token_shape"])
        self._shard_meta: list[dict] = list(manifest["shards"])
        rows = [s["rows"] for s in self._shard_meta]
        self._starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])  # [S + 1]
        self._index: dict[str, int] | None = None
        self._mapped: list[MappedShard | None] = [None] * len(rows)
        self._resident: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> TokenStore:
        """Open the store at `path` reading only its manifest (`verify=True`: hash all)."""
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        try:
            with open_regular(manifest_path) as file:  # a FIFO there would hang the read
                manifest = json.loads(file.read().decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"TokenStore: no {MANIFEST_NAME} in {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreCorruptError(f"TokenStore: {manifest_path} is corrupt: {e}") from None
        if not isinstance(manifest, dict):
            raise StoreCorruptError(
                f"TokenStore: {manifest_path} holds a JSON {type(manifest).__name__}, not a "
                f"{FORMAT} manifest (an object)"
            )
        version = manifest.get("format_version")
        if manifest.get("format") != FORMAT or version not in READABLE_VERSIONS:
            raise StoreCorruptError(
                f"TokenStore: {manifest_path} is not a {FORMAT} manifest this edje reads "
                f"(versions {', '.join(map(str, READABLE_VERSIONS))}; "
                f"format={manifest.get('format')!r}, version={version!r})"
            )
        check_manifest(manifest, manifest_path)
        store = cls(path, manifest)
        store.check_files()
        if verify:
            store.verify()
        return store

    @staticmethod
    def create(path: str | Path, **kwargs) -> TokenStoreWriter:
        """Start writing a store: `TokenStore.create(path, token_shape=(m, d), dtype=...,
        fingerprint=..., shard_size=1024, resume=False, overwrite=False)`; see
        `TokenStoreWriter`."""
        return TokenStoreWriter(path, **kwargs)

    # -- description -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._starts[-1])

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._id_index()

    def __repr__(self) -> str:
        return (
            f"TokenStore({str(self.path)!r}, count={len(self)}, dtype={self.dtype}, "
            f"token_shape={list(self.token_shape)}, shards={len(self._shard_meta)})"
        )

    @property
    def ids(self) -> list[str]:
        """All ids in row order."""
        return [i for s in self._shard_meta for i in s["ids"]]

    @property
    def fingerprint(self) -> dict:
        """What made these tokens (vision encoder, preprocessing, adapter, edje version)."""
        return dict(self.manifest["fingerprint"])

    @property
    def failures(self) -> dict[str, str]:
        """Images that could not be encoded: `{id: reason}`."""
        return dict(self.manifest["failures"])

    @property
    def token_dtype(self) -> torch.dtype:
        """dtype `gather` returns by default (float16 for int8 stores)."""
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float16

    @property
    def bytes_per_image(self) -> int:
        """Stored bytes of one image's tokens (with its int8 scales)."""
        m, d = self.token_shape
        itemsize = STORE_DTYPES[self.dtype][1].itemsize
        scales = m * SCALE_DTYPE[1].itemsize if self.dtype == "int8" else 0
        return m * d * itemsize + scales

    @property
    def device(self) -> torch.device | None:
        """Device holding the whole store after `to`, else None (memory-mapped from disk)."""
        return self._resident[0].device if self._resident is not None else None

    @property
    def is_raw(self) -> bool:
        """True for raw vision-encoder tokens (a model's adapter compresses them when read),
        False for compressed tokens that a joint encoder reads as they are."""
        return self.fingerprint.get("adapter_sha256") == RAW_ADAPTER

    # -- reading -----------------------------------------------------------------------------
    def _id_index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {i: n for n, i in enumerate(self.ids)}
        return self._index

    def index(self, ids: Iterable[str]) -> np.ndarray:
        """Row numbers `[B]` (int64) of `ids`; KeyError naming the missing ones."""
        table = self._id_index()
        try:
            return np.fromiter((table[i] for i in ids), dtype=np.int64)
        except KeyError as e:
            failed = (
                f" (it failed to encode: {self.failures[e.args[0]]})"
                if e.args[0] in self.failures
                else ""
            )
            raise KeyError(f"TokenStore: id {e.args[0]!r} is not in {self.path}{failed}") from None

    def get(self, image_id: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tokens `[m, d]` of one image."""
        return self.gather([image_id], dtype)[0]

    def gather(self, ids: Sequence[str], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tokens `[B, m, d]` of `ids`, in the order given (repeats allowed).

        `dtype` (default `token_dtype`) is the dtype returned; int8 stores dequantise to it.
        """
        return self.gather_rows(self.index(ids), dtype)

    def gather_rows(
        self, rows: np.ndarray | torch.Tensor | Sequence[int], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Tokens `[B, m, d]` of row numbers (see `index`)."""
        dtype = dtype or self.token_dtype
        if self._resident is not None:
            tokens, scales = self._resident
            if torch.is_tensor(rows):
                idx = rows.to(tokens.device, torch.int64)
            else:
                idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=tokens.device)
            out = tokens.index_select(0, idx)
            if scales is None:
                return out.to(dtype)
            return dequantize_int8(out, scales.index_select(0, idx), dtype)
        rows = rows.cpu().numpy() if torch.is_tensor(rows) else rows
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(
                f"TokenStore: rows must be in [0, {len(self)}), got {rows.min()}..{rows.max()}"
            )
        tokens, scales = self._gather_numpy(rows)
        out = torch.from_numpy(tokens)
        if self.dtype == "int8":
            return dequantize_int8(out, torch.from_numpy(scales), dtype)
        return (out.view(torch.bfloat16) if self.dtype == "bfloat16" else out).to(dtype)

    def _gather_numpy(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # rows [B] -> tokens [B, m, d] (store numpy dtype), scales [B, m] or None; each row
        # checked against its shard's CRC-32 after the copy (what is returned is what was hashed)
        shard = np.searchsorted(self._starts, rows, side="right") - 1  # [B]
        local = rows - self._starts[shard]
        np_dtype = STORE_DTYPES[self.dtype][1]
        out = np.empty((len(rows), *self.token_shape), dtype=np_dtype)
        out_s = (
            np.empty((len(rows), self.token_shape[0]), np.float32) if self.dtype == "int8" else None
        )
        for s in np.unique(shard):
            tok, sc, sums = self._map(int(s))
            pos = np.flatnonzero(shard == s)
            if len(pos) == len(rows):  # all from one shard: one vectorised copy
                np.take(tok, local, axis=0, out=out)
                if out_s is not None:
                    np.take(sc, local, axis=0, out=out_s)
            elif len(pos) == 1:
                out[pos[0]] = tok[local[pos[0]]]
                if out_s is not None:
                    out_s[pos[0]] = sc[local[pos[0]]]
            else:
                out[pos] = tok[local[pos]]
                if out_s is not None:
                    out_s[pos] = sc[local[pos]]
            if sums is not None:
                self._check_rows(int(s), local[pos], pos, sums, out, out_s)
        return out, out_s

    def _check_rows(self, s, local, positions, sums, tokens, scales) -> None:
        """Rows `tokens[positions]` (and `scales`) against shard `s`'s CRC-32s."""
        for row, p in zip(local.tolist(), positions.tolist(), strict=True):
            if row_checksum(tokens[p], None if scales is None else scales[p]) != int(sums[row]):
                meta = self._shard_meta[s]
                raise StoreCorruptError(
                    f"shard {self.path / meta['file']} is corrupt: the tokens of "
                    f"{meta['ids'][row]!r} (row {row}) do not match their checksum "
                    "(`edje verify` checks the whole store)"
                )

    def _map(self, s: int) -> MappedShard:
        """Memory-map shard `s` (header parsed and checked on first access)."""
        mapped = self._mapped[s]
        if mapped is None:
            meta = self._shard_meta[s]
            file = self.path / meta["file"]
            header = read_shard_header(file)
            # The shard must be the one the manifest lists: its size, hash, ids in order (swapped
            # ids would serve another image's tokens) and the store's fingerprint.
            if (header.file_size, header.data_sha256, header.ids, header.fingerprint) != (
                meta["bytes"],
                meta["data_sha256"],
                meta["ids"],
                self.fingerprint,
            ):
                raise StoreCorruptError(
                    f"shard {file} does not match {self.path / MANIFEST_NAME} (size, hash, ids "
                    "or fingerprint): it belongs to another store or was changed."
                )
            tokens = self._memmap(file, header.tensors["tokens"], STORE_DTYPES[self.dtype])
            scales = None
            if self.dtype == "int8":
                scales = self._memmap(file, header.tensors["scales"], SCALE_DTYPE)
            sums = None
            if ROW_CHECKSUMS in header.tensors:
                sums = self._memmap(file, header.tensors[ROW_CHECKSUMS], CHECKSUM_DTYPE)
            elif data_sha256(file, header) != meta["data_sha256"]:  # a version 1 shard
                raise StoreCorruptError(f"shard {file} is corrupt: its sha256 does not match")
            mapped = MappedShard(tokens, scales, sums)
            self._mapped[s] = mapped
        return mapped

    def _memmap(self, file: Path, info, dtype: tuple[str, np.dtype]) -> np.ndarray:
        if info.dtype != dtype[0]:
            raise StoreCorruptError(f"shard {file}: tensor dtype {info.dtype}, expected {dtype[0]}")
        if info.shape[0] == 0:
            return np.empty(info.shape, dtype[1])
        return np.memmap(file, dtype=dtype[1], mode="r", offset=info.offset, shape=info.shape)

    # -- whole-store operations --------------------------------------------------------------
    def to(self, device: str | torch.device) -> TokenStore:
        """Hold every token on `device` (int8 stays int8 there); returns self."""
        everything = np.arange(len(self), dtype=np.int64)
        tokens, scales = self._gather_numpy(everything) if len(self) else (None, None)
        if tokens is None:
            tokens = np.empty((0, *self.token_shape), STORE_DTYPES[self.dtype][1])
        t = torch.from_numpy(tokens)
        t = t.view(torch.bfloat16) if self.dtype == "bfloat16" else t
        s = torch.from_numpy(scales).to(device) if scales is not None else None
        if self.dtype == "int8" and s is None:
            s = torch.empty(0, self.token_shape[0], device=device)
        self._resident = (t.to(device), s)
        return self

    def check_files(self) -> None:
        """Stat every shard (no read): a missing or truncated one raises, naming the file."""
        for meta in self._shard_meta:
            file = self.path / meta["file"]
            try:
                size = os.stat(file).st_size
            except FileNotFoundError:
                raise StoreCorruptError(f"shard {file} listed in the manifest is missing") from None
            if size != meta["bytes"]:
                raise StoreCorruptError(
                    f"shard {file} is truncated or corrupt: {size} bytes, "
                    f"the manifest says {meta['bytes']}"
                )

    def verify(self, progress: bool = False) -> None:
        """Read every shard whole: its data's sha256 against the manifest, its header against
        its manifest entry, every row against its checksum and every token finite (the writer
        refuses NaN and inf, but a store with consistent hashes can still hold them); raise
        `StoreCorruptError` naming the first bad file. `progress` shows a bar over the shards."""
        from edje._utils import progress as progress_bar

        self.check_files()
        bar = progress_bar(len(self._shard_meta), progress, desc="verify", unit="shard")
        for shard_number, meta in enumerate(self._shard_meta):
            bar.update()
            file = self.path / meta["file"]
            header = read_shard_header(file)
            if data_sha256(file, header) != meta["data_sha256"]:
                raise StoreCorruptError(f"shard {file} is corrupt: its sha256 does not match")
            self._check_finite(shard_number)
        bar.close()

    def _check_finite(self, s: int, chunk: int = 256) -> None:
        """Every row of shard `s` read (checksums, header against the manifest) and finite."""
        meta, start = self._shard_meta[s], int(self._starts[s])
        for first in range(0, meta["rows"], chunk):
            rows = np.arange(start + first, start + min(first + chunk, meta["rows"]))
            finite = torch.isfinite(self.gather_rows(rows, torch.float32)).flatten(1).all(1)
            if not bool(finite.all()):
                bad = meta["ids"][first + int((~finite).nonzero()[0])]
                raise StoreCorruptError(
                    f"shard {self.path / meta['file']} holds NaN or inf tokens (image {bad!r})"
                )

    def check_fingerprint(self, expected: Mapping, *, force: bool = False) -> None:
        """Raise ValueError if this store was not made the way `expected` says.

        Every field of `expected` is compared (nested dicts field by field) except the
        `INFORMATIONAL_FIELDS` (`edje_version`, `vision_name`); fields only the store has
        are ignored. With `force=True` a mismatch is a warning instead.
        """
        diff = fingerprint_diff(self.fingerprint, expected)
        if not diff:
            return
        lines = "\n".join(f"  {k}: store={a!r}, expected={b!r}" for k, (a, b) in diff.items())
        msg = (
            f"TokenStore {self.path} was made by another encoder or adapter than expected:\n"
            f"{lines}\n"
            f"store fingerprint: {json.dumps(self.fingerprint, sort_keys=True)}\n"
            f"expected fingerprint: {json.dumps(dict(expected), sort_keys=True, default=str)}"
        )
        if force:
            warnings.warn(msg + "\n(force=True: using it anyway)", stacklevel=2)
        else:
            raise ValueError(msg + "\nRe-encode the images, or pass force=True / --force.")

    # -- Hub ---------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> object:
        """Upload the store (manifest and shards) as a Hugging Face dataset repository, with a
        dataset card (`viewer: false`: the shards are tensors, not rows), in one commit."""
        import huggingface_hub

        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        files = [MANIFEST_NAME] + [s["file"] for s in self._shard_meta]
        operations = [
            huggingface_hub.CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(self.path / f))
            for f in files
        ]
        card = self.dataset_card(repo_id).encode("utf-8")
        operations.append(
            huggingface_hub.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card)
        )
        return api.create_commit(
            repo_id=repo_id,
            repo_type="dataset",
            operations=operations,
            revision=revision,
            commit_message=commit_message or f"Upload edje token store ({len(self)} images)",
        )

    def dataset_card(self, repo_id: str) -> str:
        """The README.md a pushed store gets: what it holds, what made it, how to load it."""
        from huggingface_hub import DatasetCardData

        data = DatasetCardData(tags=["edje", "token-store"], viewer=False)
        m, d = self.token_shape
        made_by = json.dumps(self.fingerprint, sort_keys=True)
        return (
            f"---\n{data.to_yaml()}\n---\n\n# edje token store: {len(self):,} images\n\n"
            f"Each image is {m} x {d} {self.dtype} tokens ({self.bytes_per_image:,} bytes), "
            f"{'raw vision tokens' if self.is_raw else 'compressed by an EDJE adapter'}, "
            f"in {len(self._shard_meta)} safetensors shards indexed by `manifest.json`.\n\n"
            "```python\nfrom edje.store import TokenStore  # pip install edje\n\n"
            f'store = TokenStore.from_hub("{repo_id}")\n```\n\n'
            f"Made by (its fingerprint, which a model checks before using it):\n\n"
            f"```json\n{made_by}\n```\n"
        )

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        verify: bool = False,
    ) -> TokenStore:
        """Download a store pushed with `push_to_hub` (a dataset repo) and open it."""
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=[MANIFEST_NAME, "shards/*"],
        )
        return cls.open(folder, verify=verify)

    def __getstate__(self) -> dict:
        # memory maps and device copies are not pickled (DataLoader workers re-map lazily)
        state = dict(self.__dict__)
        state["_mapped"] = [None] * len(self._shard_meta)
        state["_resident"] = None
        return state
