"""How `EDJEReranker`'s one scoring loop (`EDJEReranker._logits`) is fed: its inputs cut into
scorer calls (`Batch`), each with the output rows its logits fill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch


class Batch(NamedTuple):
    """One scorer call of `EDJEReranker._logits`: `score(scorer)` gives the logits of the
    output `rows`, with the scorer of `dtype`; `done` is its progress (pairs, documents or
    queries)."""

    rows: list[int] | slice
    score: Callable[[Any], torch.Tensor]
    dtype: torch.dtype
    done: int


def in_batches(
    rows: Sequence[int], size: int, logits_of: Callable, dtype: torch.dtype, in_place: bool = False
) -> Iterator[Batch]:
    """`logits_of(part, scorer)` over `rows` in parts of `size`: each part's logits go to its
    rows of the output (`in_place`), or to its positions in `rows`."""
    rows = list(rows)
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        to = part if in_place else slice(start, start + len(part))
        yield Batch(to, partial(logits_of, part), dtype, len(part))


def chunks_of_equal_length(rows: list[list], batch_size: int) -> list[list[int]]:
    """Consecutive row indices grouped while their lengths are equal, about `batch_size`
    candidates per group (at least one row)."""
    chunks: list[list[int]] = []
    for index, row in enumerate(rows):
        last = chunks[-1] if chunks else None
        if last and len(rows[last[0]]) == len(row) and (len(last) + 1) * len(row) <= batch_size:
            last.append(index)
        else:
            chunks.append([index])
    return chunks
