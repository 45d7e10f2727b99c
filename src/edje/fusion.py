"""Score fusion: EDJE's logit plus a weight times the first stage's similarity.

    fused = edje_weight * logit + first_stage_weight * first_stage_similarity

With `edje_weight = 1` this is the LAVIS-style "ITM + w x ITC" sum; `(1, 0)` is EDJE alone and
`(0, 1)` the first stage alone. The weights are chosen on validation data for one first stage
(its similarity scale is part of the weight) and kept in the model's config
(`fusion_edje_weight`, `fusion_first_stage_weight`); `choose_fusion` does the choosing, and
keeps the first stage alone unless other weights beat it by more than chance on the validation
queries, so a weak reranker leaves the first stage's ranking as it was.

Example:
    >>> import torch
    >>> fuse(torch.tensor([2.0, 0.0]), torch.tensor([0.1, 0.9]), (1.0, 10.0))
    tensor([3., 9.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "FIRST_STAGE_ALONE",
    "FUSION_GRID",
    "FusionChoice",
    "choose_fusion",
    "fuse",
    "fusion_weights",
    "sign_test",
]

# (edje_weight, first_stage_weight): EDJE alone, the first stage alone, and sums between. The
# first stage's similarities are cosines (spread ~0.1 between candidates), EDJE's logits spread
# by several units, so the useful first-stage weights are 1 to 100.
FUSION_GRID: tuple[tuple[float, float], ...] = (
    (1.0, 0.0),
    (0.0, 1.0),
    *((1.0, w) for w in (0.5, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 100)),
)


def fuse(
    logits: torch.Tensor, first_stage_scores: torch.Tensor, weights: Sequence[float]
) -> torch.Tensor:
    """`edje_weight * logits + first_stage_weight * first_stage_scores`, elementwise, float32.

    A first-stage score past float32's range (or one the weighted sum overflows with) is a
    ValueError naming the candidate, never a NaN or inf score (`0 x inf` is NaN)."""
    edje_weight, first_stage_weight = weights
    scores = torch.as_tensor(first_stage_scores, dtype=torch.float32, device=logits.device)
    if scores.shape != logits.shape:
        raise ValueError(
            f"fuse: first-stage scores of shape {list(scores.shape)} for logits of shape "
            f"{list(logits.shape)}; expected one score per candidate."
        )
    fused = edje_weight * logits.float() + first_stage_weight * scores
    overflow = ~torch.isfinite(fused) & torch.isfinite(logits)
    if bool(overflow.any()):
        first = int(overflow.flatten().nonzero()[0])
        given = float(torch.as_tensor(first_stage_scores, dtype=torch.float64).flatten()[first])
        product = "" if math.isinf(scores.flatten()[first]) else f" x {first_stage_weight:g}"
        raise ValueError(
            f"fuse: the first-stage score {given:g}{product} (candidate {first}) is past "
            f"float32's range (+-{torch.finfo(torch.float32).max:.3g}); first-stage scores "
            "are similarities, about -1 to 1."
        )
    return fused


def fusion_weights(config) -> tuple[float, float] | None:
    """The `(edje_weight, first_stage_weight)` a model's config holds, None when it holds none
    (then candidates are ranked by EDJE alone)."""
    weight = getattr(config, "fusion_first_stage_weight", None)
    if weight is None:
        return None
    return float(getattr(config, "fusion_edje_weight", 1.0)), float(weight)


@dataclass
class FusionChoice:
    """The weights `choose_fusion` picked, and for every grid point its validation score and
    its sign-test p-value against the first stage alone."""

    weights: tuple[float, float]
    score: float
    table: list[dict] = field(default_factory=list)


FIRST_STAGE_ALONE = (0.0, 1.0)
SIGNIFICANCE = 0.05  # family-wise, over the grid (Bonferroni)


def choose_fusion(
    hits_of, grid: Sequence[tuple[float, float]] = FUSION_GRID, alpha: float = SIGNIFICANCE
) -> FusionChoice:
    """The grid point that ranks validation queries best, if it beats the first stage alone by
    more than chance; else the first stage alone.

    `hits_of(weights)` gives each validation query's hit (1.0 or 0.0) at R@1 when ranking by
    those weights. The best mean wins only if a one-sided sign test over the queries where it
    and the first stage alone differ gives p < alpha / (grid points compared): a small
    validation split lets a weak reranker's lucky weights win by a query or two, and they then
    lose on test. Ties in score go to the earlier grid point.
    """
    grid = [tuple(float(v) for v in w) for w in grid]
    baseline = torch.as_tensor(hits_of(FIRST_STAGE_ALONE), dtype=torch.float64)
    table = []
    for weights in grid:
        hits = torch.as_tensor(hits_of(weights), dtype=torch.float64)
        table.append(
            {
                "weights": weights,
                "score": 100.0 * float(hits.mean()) if len(hits) else 0.0,
                "p_value": sign_test(int((hits > baseline).sum()), int((hits < baseline).sum())),
            }
        )
    best = max(table, key=lambda row: row["score"])  # max keeps the first of equal scores
    compared = max(1, len([w for w in grid if w != FIRST_STAGE_ALONE]))
    if best["weights"] != FIRST_STAGE_ALONE and not best["p_value"] < alpha / compared:
        fallback = 100.0 * float(baseline.mean()) if len(baseline) else 0.0
        return FusionChoice(weights=FIRST_STAGE_ALONE, score=fallback, table=table)
    return FusionChoice(weights=best["weights"], score=best["score"], table=table)


def sign_test(wins: int, losses: int) -> float:
    """One-sided sign-test p-value of `wins` against `losses` (ties dropped): the chance of at
    least that many wins out of `wins + losses` fair coin flips."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n
