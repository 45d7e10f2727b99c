"""What `EDJEReranker` takes, checked and resolved: documents (store ids, pictures, image
tokens) to image tokens, captions, and its methods' arguments. See `edje.rerank` for the kinds
of documents and how a str is read.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edje import image_tokens
from edje._utils import load_rgb
from edje.scoring.exact import scoring_dtype


class Documents:
    """Documents resolved to image tokens: pixels encoded once, store ids read per batch.

    Args:
        reranker: the `EDJEReranker` (its model, processor, store, device and token shape).
        documents: the documents, or their tokens `[K, m, d]`.
        names: what errors call the documents (default `document {i}`).
        pixel_batch: images per vision-encoder forward.
    """

    def __init__(
        self, reranker: Any, documents: Any, names: Sequence[str] = (), pixel_batch: int = 32
    ):
        from PIL import Image

        self.reranker = reranker
        if isinstance(documents, torch.Tensor):
            check_tokens(documents, reranker.token_shape, "documents", "[K, m, d]", 3)
            documents = list(documents)
        documents = as_list(documents)
        store = reranker.store
        self.kinds: list[tuple[str, Any]] = []  # ("id", str) | ("tensor", [m, d]) | ("pixels", j)
        self.image_ids: list[str | None] = []
        self._images: list[Any] = []  # PIL images / paths to encode, in first-seen order
        to_encode: dict[Any, int] = {}  # one encoding per image object or path
        for i, doc in enumerate(documents):
            name = names[i] if i < len(names) else f"document {i}"
            doc = unwrapped(doc, name)
            image_id = None
            if isinstance(doc, str) and store is not None and doc in store:
                kind, image_id = ("id", doc), doc
            elif isinstance(doc, torch.Tensor):
                check_tokens(doc, reranker.token_shape, name, "[m, d]", 2)
                kind = ("tensor", doc)
            elif isinstance(doc, Image.Image) or is_file(doc) or is_encoded(doc):
                key = str(Path(doc).resolve()) if isinstance(doc, str | Path) else id(doc)
                kind = ("pixels", to_encode.setdefault(key, len(to_encode)))
                if len(to_encode) > len(self._images):
                    self._images.append(decoded(doc, name) if is_encoded(doc) else doc)
            else:
                raise not_a_document(doc, name, store)
            self.kinds.append(kind)
            self.image_ids.append(image_id)
        self.pixels = None
        if self._images:
            self.pixels = image_tokens.from_images(
                reranker.model,
                reranker.processor.image_processor,
                self._images,
                batch_size=pixel_batch,
            )

    def __len__(self) -> int:
        return len(self.kinds)

    def tokens(self, rows: Sequence[int]) -> torch.Tensor:
        """Image tokens `[len(rows), m, d]` (float32, on the reranker's device)."""
        device = self.reranker.device
        out = torch.empty(len(rows), *self.reranker.token_shape, device=device)
        id_rows = [n for n, r in enumerate(rows) if self.kinds[r][0] == "id"]
        if id_rows:
            image_ids = [self.kinds[rows[n]][1] for n in id_rows]
            out[id_rows] = self.reranker._from_store(image_ids)
        for n, r in enumerate(rows):
            kind, value = self.kinds[r]
            if kind == "tensor":
                out[n] = value.to(device, torch.float32)
            elif kind == "pixels":
                out[n] = self.pixels[value]
        return out


def one_of(*spellings):
    given = [p for p in spellings if p is not None]
    if len(given) != 1:
        raise ValueError(
            "EDJEReranker.predict: pass the pairs once (pairs, inputs= or sentences=)."
        )
    return given[0]


def check_batch_size(batch_size: Any, method: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"EDJEReranker.{method}: batch_size must be a positive integer, got {batch_size!r}."
        )


# `rank`'s arguments that sentence-transformers 6 still accepts and ignores.
IGNORED_BY_RANK = ("apply_softmax", "convert_to_numpy", "convert_to_tensor")


def warn_ignored(given: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(IGNORED_BY_RANK))
    if unknown:
        raise TypeError(f"EDJEReranker.rank got unexpected keyword arguments {unknown}.")
    if given:
        warnings.warn(
            f"EDJEReranker.rank ignores {sorted(given)}: it returns Python floats, as "
            "sentence-transformers 6's CrossEncoder.rank does.",
            FutureWarning,
            stacklevel=3,
        )


def check_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"EDJEReranker: {where} must be a non-empty caption str, got {caption!r}.")
    return caption


def check_tokens(tokens, shape: tuple, where: str, layout: str, dims: int) -> None:
    if tokens.dim() != dims or tuple(tokens.shape[-2:]) != shape:
        raise ValueError(
            f"EDJEReranker: {where} as image tokens must have shape {layout} with "
            f"[m, d] = {list(shape)}, got {list(tokens.shape)}."
        )


def is_file(doc: Any) -> bool:
    return isinstance(doc, str | Path) and Path(doc).is_file()


def is_encoded(doc: Any) -> bool:
    """Pixels `load_rgb` decodes that are neither a PIL image nor a file: bytes, an array,
    a `datasets` image `{"bytes", "path"}`."""
    return isinstance(doc, bytes | bytearray | np.ndarray | Mapping)


def unwrapped(doc: Any, name: str) -> Any:
    """sentence-transformers' multimodal `{"image": x}` -> `x`; other dicts are kept only
    when they are a `datasets` image (`{"bytes", "path"}`)."""
    if not isinstance(doc, Mapping):
        return doc
    if set(doc) == {"image"}:
        return doc["image"]
    if set(doc) and set(doc) <= {"bytes", "path"}:
        return doc
    raise ValueError(
        f'EDJEReranker: {name} as a dict must be {{"image": ...}} or a datasets image '
        f'{{"bytes", "path"}}; got the keys {sorted(map(str, doc))}.'
    )


def decoded(doc: Any, name: str) -> Any:
    try:
        return load_rgb(doc)
    except ValueError as error:
        raise ValueError(f"EDJEReranker: {name} is not a decodable image: {error}") from None


def not_a_document(doc: Any, name: str, store: Any) -> Exception:
    """The error for a document that is none of the kinds the reranker takes, naming it."""
    if isinstance(doc, str) and doc.partition("://")[0] in ("http", "https", "ftp", "s3", "gs"):
        return ValueError(
            f"EDJEReranker: {name} is a URL ({doc!r}): edje downloads nothing; pass the "
            "downloaded file, its bytes or a PIL image."
        )
    if isinstance(doc, Path):
        return FileNotFoundError(f"EDJEReranker: {name}: no image file at {doc}.")
    if isinstance(doc, str) and store is None:
        return ValueError(
            f"EDJEReranker: {name} is {doc!r}, neither an existing image file nor an image id "
            "(no store was given: EDJEReranker(model, store=...))."
        )
    if isinstance(doc, str):
        return KeyError(
            f"EDJEReranker: {name}: {doc!r} is neither an image id in the store {store.path} "
            "nor an existing image file."
        )
    return ValueError(
        f"EDJEReranker: {name} must be a store id (str), an image file path, a PIL image, "
        'encoded image bytes, a uint8 array, {"image": ...} or image tokens [m, d]; got '
        f"{type(doc).__name__}."
    )


def as_list(items: Any) -> list:
    if isinstance(items, str):
        raise ValueError(f"EDJEReranker: expected a list, got a single str {items!r}.")
    return list(items)


def as_rows(table: Any, count: int, name: str = "first_stage_scores") -> list[list]:
    """`[Q, K]` tensor / array / nested lists -> Q lists of Python values."""
    if isinstance(table, torch.Tensor | np.ndarray):
        table = table.tolist()
    rows = [list(row) for row in as_list(table)]
    if len(rows) != count:
        raise ValueError(
            f"EDJEReranker.rank_many: {name} has {len(rows)} rows for {count} queries."
        )
    return rows


def first_stage_list(scores: Any, count: int) -> list[float] | None:
    """`rank`'s first-stage scores as floats, one per document (None stays None)."""
    if scores is None:
        return None
    first = torch.as_tensor(scores, dtype=torch.float32).flatten().tolist()
    if len(first) != count:
        raise ValueError(
            f"EDJEReranker.rank: expected one first_stage_score per document "
            f"({count}), got {len(first)}."
        )
    return first


def kept_candidates(row: list, id_of: Sequence[str]) -> tuple[list[int], list[str], list[int]]:
    """A `rank_many` candidate row -> (kept columns, their image ids, their corpus ids):
    positions index `id_of`; negative ones (FAISS's "no result") are dropped."""
    positions = bool(row) and isinstance(row[0], int | np.integer)
    keep = [c for c, cand in enumerate(row) if not (positions and cand < 0)]
    if positions and row and max(row) >= len(id_of):
        raise ValueError(
            f"EDJEReranker.rank_many: candidate position {max(row)} is past the "
            f"{len(id_of)} ids it indexes (pass ids=VectorIndex.ids)."
        )
    image_ids = [id_of[row[c]] if positions else str(row[c]) for c in keep]
    return keep, image_ids, [int(row[c]) if positions else c for c in keep]


def reranker_precision(dtype: torch.dtype | None, precision: str | None) -> str:
    """The reranker's precision from its `dtype` and `precision` arguments (one, the other or
    both agreeing; default float32)."""
    named = None if dtype is None else str(dtype).replace("torch.", "")
    if precision is None:
        precision = named or "float32"
    scoring_dtype(precision)  # checks the name
    if named is not None and named != precision:
        raise ValueError(
            f"EDJEReranker: dtype={dtype} and precision={precision!r} disagree; pass one."
        )
    return precision
