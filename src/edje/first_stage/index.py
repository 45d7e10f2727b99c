"""Top-k search by inner product over L2-normalised embeddings, with FAISS.

`VectorIndex` wraps a FAISS index: exact (`IndexFlatIP`) by default, or any
`faiss.index_factory` string (e.g. `"IVF4096,Flat"`, `"HNSW32"`) for millions of
vectors. Results are positions in the order vectors were added; `ids` maps them back.

Ties: FAISS keeps a bounded heap per query and does not document how it orders equal scores
(in practice the earlier-added vector often wins, which can favour the correct item). The
metrics in `edje.evaluation.metrics` count ties against the query, so compute first-stage
recall from the full score matrix where it fits in memory (`edje.evaluation` does) and read FAISS
candidates only beyond that, where a tie at the k-th place cannot be seen.

Example:
    >>> import torch
    >>> from edje.first_stage import VectorIndex
    >>> index = VectorIndex(dim=2)
    >>> index.add(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), ids=["a", "b", "c"])
    >>> scores, positions = index.search(torch.tensor([[0.0, 1.0]]), k=2)
    >>> positions.tolist(), [index.ids[p] for p in positions[0].tolist()]
    ([[1, 2]], ['b', 'c'])
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edje._utils import atomic_write, require

__all__ = ["VectorIndex"]

INDEX_NAME = "index.faiss"
IDS_NAME = "ids.json"


class VectorIndex:
    """Inner-product search over `dim`-wide vectors (exact unless `factory` says otherwise).

    Args:
        dim: vector width.
        factory: a `faiss.index_factory` string; `"Flat"` (default) is exact.
    """

    def __init__(self, dim: int, factory: str = "Flat"):
        faiss = require("faiss", "faiss", "VectorIndex")

        if dim < 1:
            raise ValueError(f"VectorIndex: dim must be a positive integer, got {dim}")
        self.dim, self.factory = int(dim), factory
        try:
            self.index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:  # faiss's message holds its C++ source location: cut it
            reason = str(error).rpartition(": ")[2]
            raise ValueError(
                f"VectorIndex: {factory!r} is not a faiss index_factory string for {dim}-wide "
                f"vectors ({reason}); e.g. 'Flat', 'HNSW32', 'IVF1024,Flat'"
            ) from None
        self.ids: list | None = None  # names of the vectors, when add was given ids
        self.path: Path | None = None  # the folder it was loaded from

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, factory={self.factory!r}, size={len(self)})"

    def _as_array(self, vectors: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
        array = vectors.detach().cpu().float().numpy() if torch.is_tensor(vectors) else vectors
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(
                f"VectorIndex: {name} must have shape [N, {self.dim}], got {array.shape}"
            )
        return array

    def train(self, embeddings: torch.Tensor | np.ndarray) -> None:
        """Train a non-exact index (IVF, PQ) on a sample; exact indexes need no training."""
        self.index.train(self._as_array(embeddings, "embeddings"))

    def add(self, embeddings: torch.Tensor | np.ndarray, ids: Sequence | None = None) -> None:
        """Append vectors; `ids` (any JSON-serialisable values) name them, one per row."""
        array = self._as_array(embeddings, "embeddings")
        if not self.index.is_trained:
            raise ValueError(
                f"VectorIndex: the {self.factory!r} index needs train(embeddings) before add"
            )
        if ids is not None and len(ids) != len(array):
            raise ValueError(f"VectorIndex: got {len(array)} embeddings but {len(ids)} ids")
        if len(self) == 0:
            self.ids = list(ids) if ids is not None else None
        elif (ids is None) != (self.ids is None):
            raise ValueError("VectorIndex.add: give ids with every add or with none")
        elif ids is not None:
            self.ids.extend(ids)
        self.index.add(array)

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best `k` per query, best first: `(scores [Q, k] float32, positions [Q, k] long)`.

        `k` above the index size is cut to it (FAISS would pad with -1).
        """
        array = self._as_array(queries, "queries")
        if k < 1:
            raise ValueError(f"VectorIndex.search: k must be a positive integer, got {k}")
        if len(self) == 0:
            raise ValueError("VectorIndex.search: the index is empty; add embeddings first")
        scores, positions = self.index.search(array, min(k, len(self)))
        return torch.from_numpy(scores), torch.from_numpy(positions).long()

    def vector(self, position: int) -> np.ndarray:
        """The stored vector at `position` (an IVF index gets the direct map this needs)."""
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        return self.index.reconstruct(int(position))

    def save(self, path: str | os.PathLike) -> Path:
        """Write `index.faiss` (`faiss.write_index`) and `ids.json` into folder `path`."""
        faiss = require("faiss", "faiss", "VectorIndex")

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / INDEX_NAME, lambda temp: faiss.write_index(self.index, temp))
        meta = json.dumps({"dim": self.dim, "factory": self.factory, "ids": self.ids})
        atomic_write(folder / IDS_NAME, lambda temp: Path(temp).write_text(meta))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike, *, require_ids: bool = False) -> VectorIndex:
        """Read what `save` wrote; `require_ids`: refuse an index saved without ids (search
        results must name images)."""
        faiss = require("faiss", "faiss", "VectorIndex")

        folder = Path(path)
        if not (folder / INDEX_NAME).is_file():
            raise FileNotFoundError(f"VectorIndex.load: expected {INDEX_NAME} in {folder}")
        meta = json.loads((folder / IDS_NAME).read_text())
        index = cls(meta["dim"], meta["factory"])
        index.index = faiss.read_index(str(folder / INDEX_NAME))
        index.ids, index.path = meta["ids"], folder
        if require_ids and index.ids is None:
            raise ValueError(f"the index {folder} holds no ids; rebuild it with `edje index`")
        return index

    @classmethod
    def from_store(
        cls,
        store,
        first_stage,
        ids: Sequence[str] | None = None,
        *,
        factory: str = "Flat",
        batch_size: int = 256,
    ) -> VectorIndex:
        """An index of the first stage's embeddings of a raw-token store's images (or of
        those in `ids`), embedded from their stored tokens; a compressed store cannot be."""
        hint = (
            "build an index with `edje index --first-stage F --images FOLDER --out INDEX` "
            "(ids: paths relative to FOLDER, as `edje encode --images` names them) and pass it "
            "as --index"
        )
        if not store.is_raw:
            raise ValueError(
                f"{store.path} holds compressed EDJE tokens, which a first stage cannot embed; "
                f"{hint}"
            )
        ids, chunks = list(store.ids if ids is None else ids), []
        try:
            for start in range(0, len(ids), batch_size):
                tokens = store.gather(ids[start : start + batch_size]).float()
                chunks.append(first_stage.encode_vision_tokens(tokens))
        except NotImplementedError as error:
            raise ValueError(f"{error}; {hint}") from None
        embeddings = torch.cat(chunks)
        index = cls(embeddings.shape[1], factory)
        if not index.index.is_trained:
            index.train(embeddings)
        index.add(embeddings, ids=ids)
        return index
