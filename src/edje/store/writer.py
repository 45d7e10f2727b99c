"""Writing a token store: buffer token rows, flush whole shards atomically, index at the end."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from edje.store.format import (
    CHECKSUM_DTYPE,
    FORMAT,
    MANIFEST_NAME,
    ROW_CHECKSUMS,
    SCALE_DTYPE,
    SHARD_DIR,
    SHARD_SUFFIX,
    STORE_DTYPES,
    build_manifest,
    check_dtype,
    check_shard_matches,
    list_shards,
    quantize_int8,
    read_shard_header,
    refuse_foreign_files,
    remove_store,
    remove_temporaries,
    row_checksums,
    write_json_atomic,
    write_shard,
)
from edje.store.lock import StoreLock


class TokenStoreWriter:
    """Writes token rows to a store folder; use `TokenStore.create` to make one.

    Rows are buffered and written as one shard file every `shard_size` rows (a shard holds
    whole `add` calls, so a batch is never split across shards). With `resume=True` the
    shards already on disk are kept and their ids are in `done_ids` (failed ones are not: a
    re-run tries them again, and a success replaces the failure); half-written temporary files
    of a killed run are deleted. `rank` names this writer's shards, so several
    processes can write one store at once: give them `write_manifest=False, clean=False,
    lock=False`, hold `store_lock` around them all, and call `finalize` once all have closed.
    Alone (`lock=True`), a writer holds the store's write lock until it closes: a second
    writer of the same store raises `StoreBusyError` at once.

    Example:
        >>> import tempfile, torch
        >>> from edje.store import TokenStore
        >>> path = tempfile.mkdtemp() + "/store"
        >>> with TokenStore.create(path, token_shape=(4, 8), dtype="float16") as w:
        ...     w.add(["a", "b"], torch.randn(2, 4, 8))
        ...     w.add_failures({"c": "cannot identify image file"})
        >>> len(TokenStore.open(path))
        2
    """

    def __init__(
        self,
        path: str | Path,
        *,
        token_shape: Sequence[int],
        dtype: str = "float16",
        fingerprint: Mapping | None = None,
        shard_size: int = 1024,
        resume: bool = False,
        overwrite: bool = False,
        rank: int = 0,
        write_manifest: bool = True,
        clean: bool = True,
        lock: bool = True,
    ) -> None:
        if len(token_shape) != 2 or min(token_shape) < 1:
            raise ValueError(f"TokenStore: token_shape must be (m, d), got {tuple(token_shape)}")
        if shard_size < 1:
            raise ValueError(f"TokenStore: shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        self.token_shape = (int(token_shape[0]), int(token_shape[1]))
        self.dtype = check_dtype(dtype)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint or {}), sort_keys=True))
        self.shard_size = shard_size
        self.rank = rank
        self.write_manifest = write_manifest
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"TokenStore: {self.path} exists and is not a folder")
        # Several processes writing one store hold one lock for all of them (lock=False here).
        self._lock = StoreLock(self.path) if lock else None
        try:
            self._prepare_folder(resume, overwrite, clean)
            self._done = self._scan_done()
        except BaseException:
            self._release()
            raise
        self._seq = self._next_sequence()
        self._ids: list[str] = []
        self._rows: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._failures: dict[str, str] = {}
        self._pending: set[str] = set()
        self.closed = False

    # -- setup -------------------------------------------------------------------------------
    def _prepare_folder(self, resume: bool, overwrite: bool, clean: bool) -> None:
        has_store = (self.path / MANIFEST_NAME).exists() or (self.path / SHARD_DIR).exists()
        if has_store and overwrite:
            remove_store(self.path)  # edje's files only: refuses a folder holding others
        elif has_store and not resume:
            raise FileExistsError(
                f"TokenStore: {self.path} already holds a store; pass resume=True to add to it "
                "(ids already there are skipped) or overwrite=True to replace it"
            )
        elif has_store:
            refuse_foreign_files(self.path, "write to")
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if clean:  # not while other processes may be writing this store
            remove_temporaries(self.path)

    def _scan_done(self) -> set[str]:
        done: set[str] = set()
        for shard in list_shards(self.path):
            header = read_shard_header(shard)
            if header.fingerprint != self.fingerprint:
                raise ValueError(
                    f"TokenStore: cannot resume {self.path}: its tokens were made with fingerprint "
                    f"{json.dumps(header.fingerprint, sort_keys=True)}, this writer's is "
                    f"{json.dumps(self.fingerprint, sort_keys=True)} (overwrite=True replaces it)"
                )
            check_shard_matches(header, self.dtype, self.token_shape, self.fingerprint)
            done.update(header.ids)  # failures are not done: a re-run tries them again
        return done

    def _next_sequence(self) -> int:
        prefix = f"r{self.rank:03d}-"
        seqs = [
            int(p.stem[len(prefix) :]) for p in list_shards(self.path) if p.name.startswith(prefix)
        ]
        return max(seqs, default=-1) + 1

    # -- writing -----------------------------------------------------------------------------
    @property
    def done_ids(self) -> frozenset[str]:
        """Ids encoded in completed shards, and ids (encoded or failed) in this writer's buffer;
        images that failed in an earlier run are not done, so resuming tries them again."""
        return frozenset(self._done | self._pending)

    def add(
        self, ids: Sequence[str], tokens: torch.Tensor, failures: Mapping[str, str] | None = None
    ) -> None:
        """Add token rows `tokens [B, m, d]` for `ids` (B strings), and optional failures.

        Everything is checked before anything is buffered: ids must be new strings, the shape
        must be `[len(ids), m, d]` and all values finite.
        """
        self._check_open()
        ids = list(ids)
        failures = dict(failures or {})
        self._check_ids(ids + list(failures))
        expected = (len(ids), *self.token_shape)
        if tuple(tokens.shape) != expected:
            raise ValueError(
                f"TokenStore: tokens must have shape {list(expected)} ([len(ids), m, d]), "
                f"got {list(tokens.shape)}"
            )
        _refuse_non_finite(ids, tokens, "")
        if ids:
            self._rows.append(self._encode_rows(ids, tokens))
        self._ids.extend(ids)
        self._failures.update({str(k): str(v) for k, v in failures.items()})
        self._pending.update(ids)
        self._pending.update(failures)
        if len(self._ids) + len(self._failures) >= self.shard_size:
            self.flush()

    def add_failures(self, failures: Mapping[str, str]) -> None:
        """Record images that could not be encoded: `{id: reason}`."""
        self.add([], torch.empty(0, *self.token_shape), failures)

    def _check_ids(self, ids: list[str]) -> None:
        bad = [i for i in ids if not isinstance(i, str)]
        if bad:
            raise TypeError(
                f"TokenStore: ids must be strings, got {type(bad[0]).__name__} {bad[0]!r}"
            )
        seen, dup = set(), set()
        for i in ids:
            (dup if i in seen else seen).add(i)
        dup |= seen & (self._done | self._pending)
        if dup:
            raise ValueError(
                f"TokenStore: duplicate ids refused (nothing written): {sorted(dup)[:5]}"
            )

    def _encode_rows(
        self, ids: list[str], tokens: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray | None]:
        x = tokens.detach().cpu()
        if self.dtype == "int8":
            q, scales = quantize_int8(x)
            return q.numpy(), scales.numpy()
        stored = x.to(torch.bfloat16 if self.dtype == "bfloat16" else torch.float16)
        # Finite in float32 yet past the store dtype's range (float16 stops at 65,504): inf.
        _refuse_non_finite(ids, stored, f"once stored as {self.dtype}")
        if self.dtype == "bfloat16":
            return stored.view(torch.int16).numpy().view(np.uint16), None
        return stored.numpy(), None

    def flush(self) -> Path | None:
        """Write the buffered rows and failures as one shard; return its path (None if empty)."""
        self._check_open()
        if not self._ids and not self._failures:
            return None
        m, d = self.token_shape
        tag, np_dtype = STORE_DTYPES[self.dtype]
        rows = len(self._ids)
        tokens = np.concatenate([t for t, _ in self._rows]) if self._rows else np.empty(0, np_dtype)
        tokens = np.ascontiguousarray(tokens).reshape(rows, m, d)
        scales = None
        if self.dtype == "int8":
            scales = np.concatenate([s for _, s in self._rows]) if self._rows else np.empty(0)
            scales = np.ascontiguousarray(scales, dtype=SCALE_DTYPE[1]).reshape(rows, m)
        # 4-byte checksums and scales before the tokens: every tensor stays aligned.
        checksums = row_checksums(tokens, scales)
        tensors = {ROW_CHECKSUMS: (CHECKSUM_DTYPE[0], (rows,), _raw(checksums))}
        if scales is not None:
            tensors["scales"] = (SCALE_DTYPE[0], (rows, m), _raw(scales))
        tensors["tokens"] = (tag, (rows, m, d), _raw(tokens))
        metadata = {
            "format": FORMAT,
            "dtype": self.dtype,
            "ids": json.dumps(self._ids),
            "failures": json.dumps(self._failures, sort_keys=True),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        path = self.path / SHARD_DIR / f"r{self.rank:03d}-{self._seq:06d}{SHARD_SUFFIX}"
        write_shard(path, tensors, metadata)
        self._seq += 1
        self._done |= self._pending
        self._ids, self._rows, self._failures, self._pending = [], [], {}, set()
        return path

    def close(self) -> dict | None:
        """Flush, then (if `write_manifest`) index all shards into `manifest.json`. Closing
        twice does nothing.

        Returns:
            The manifest written, else None.
        """
        if self.closed:
            return None
        try:
            self.flush()
            self.closed = True
            if not self.write_manifest:
                return None
            return finalize(
                self.path,
                dtype=self.dtype,
                token_shape=self.token_shape,
                fingerprint=self.fingerprint,
            )
        finally:
            if self.closed:
                self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"TokenStore: the writer of {self.path} is closed")

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raw(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1)).cast("B")  # flat: an empty [0, m, d] casts too


def _refuse_non_finite(ids: list[str], tokens: torch.Tensor, when: str) -> None:
    if ids and not bool(torch.isfinite(tokens).all()):
        finite = torch.isfinite(tokens).flatten(1).all(1).tolist()
        bad = [i for i, ok in zip(ids, finite, strict=True) if not ok]
        raise ValueError(f"TokenStore: tokens of {bad[:5]} hold NaN or inf {when}".rstrip())


def finalize(
    path: str | Path,
    *,
    dtype: str | None = None,
    token_shape: Sequence[int] | None = None,
    fingerprint: Mapping | None = None,
) -> dict:
    """Index every completed shard of the store at `path` into `manifest.json`.

    Called by the writer that closes last (rank 0 after a barrier, in a multi-process run).
    Without `dtype`/`token_shape`/`fingerprint` those of the first shard are used; every
    shard must match them.
    """
    path = Path(path)
    headers = [read_shard_header(p) for p in list_shards(path)]
    if headers and dtype is None:
        first = headers[0]
        dtype = first.metadata.get("dtype", "")
        token_shape = tuple(first.tensors["tokens"].shape[1:]) if "tokens" in first.tensors else ()
        fingerprint = first.fingerprint
    if dtype is None or token_shape is None:
        raise FileNotFoundError(f"TokenStore: {path} has no shards to index")
    manifest = build_manifest(
        path, headers, dtype=dtype, token_shape=tuple(token_shape), fingerprint=fingerprint or {}
    )
    write_json_atomic(path / MANIFEST_NAME, manifest)
    return manifest
