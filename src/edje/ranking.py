"""Logits to a best-first order: the one ranking every door uses (`EDJEReranker.rank` and
`rank_many`, the service's `/rerank` routes, `edje search`, the evaluation's contact sheet).

The order is a stable descending sort, so candidates with equal scores keep the order they
came in (the first stage's, for reranked candidates). With first-stage scores and fusion
weights, candidates are ordered by the fused score of `edje.fusion.fuse`. Non-finite logits
are not refused here: torch's sort puts NaN first, and the service refuses them (a 500 naming
the documents) before it ranks.

Example:
    >>> import torch
    >>> best_first(torch.tensor([0.5, 2.0, 0.5, -1.0])).tolist()
    [1, 0, 2, 3]
    >>> ranked = rank_logits(torch.tensor([2.0, 0.0]), [0.1, 0.9], (1.0, 10.0), top_k=1)
    >>> ranked.order, ranked.scores.tolist(), ranked.fused
    ([1], [3.0, 9.0], True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edje.fusion import fuse

__all__ = ["Ranking", "best_first", "rank_logits"]


def best_first(scores: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Indices of `scores` by descending score along the last dimension, the best `top_k`
    (all when None); a stable sort, so ties keep the input order.

    Args:
        scores: `[K]` (one query) or `[Q, K]` (one row per query), any float dtype and device.
        top_k: how many to keep per row.

    Returns:
        A LongTensor `[min(top_k, K)]` (or `[Q, min(top_k, K)]`) on the CPU.
    """
    # float32 on the CPU: one sort whatever the device; + 0.0 makes -0.0 tie with 0.0.
    order = torch.sort(scores.float().cpu() + 0.0, dim=-1, descending=True, stable=True).indices
    return order if top_k is None else order[..., :top_k]


@dataclass
class Ranking:
    """One query's candidates ranked.

    Args:
        order: candidate indices, best first (the best `top_k` when one was given).
        scores: what the candidates were ranked by, one per candidate in input order: the
            logits, or their fused score (`fused`), on the logits' device.
        fused: whether `scores` are fused with first-stage scores.
    """

    order: list[int]
    scores: torch.Tensor
    fused: bool


def rank_logits(
    logits: torch.Tensor,
    first_stage_scores: Sequence[float] | torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    top_k: int | None = None,
) -> Ranking:
    """One query's candidates best first: by EDJE's logits, or by their fusion with the first
    stage's scores when both `first_stage_scores` and `weights` are given.

    Args:
        logits: `[K]` EDJE logits, one per candidate.
        first_stage_scores: one per candidate, or None.
        weights: `(edje_weight, first_stage_weight)` (`edje.fusion.fusion_weights`), or None
            (EDJE alone).
        top_k: keep the best `top_k` (all when None).

    Raises:
        ValueError: from `edje.fusion.fuse`: a first-stage score past float32's range, or not
            one per candidate.
    """
    final, fused = logits, weights is not None and first_stage_scores is not None
    if fused:
        given = first_stage_scores
        final = fuse(logits, given if isinstance(given, torch.Tensor) else torch.tensor(given),
                     weights)  # fmt: skip
    return Ranking(order=best_first(final, top_k).tolist(), scores=final, fused=fused)
