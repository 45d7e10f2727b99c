"""Score fusion: EDJE's logit plus a weight times the first stage's similarity.

    fused = edje_weight * logit + first_stage_weight * first_stage_similarity

With `edje_weight = 1` this is the LAVIS-style "ITM + w x ITC" sum; `(1, 0)` is EDJE alone and
`(0, 1)` the first stage alone, so a grid that holds both can never choose worse than either on
the data it is chosen on. The weights are chosen on validation data for one first stage (its
similarity scale is part of the weight) and kept in the model's config
(`fusion_edje_weight`, `fusion_first_stage_weight`); `choose_fusion` does the choosing.

Example:
    >>> import torch
    >>> fuse(torch.tensor([2.0, 0.0]), torch.tensor([0.1, 0.9]), (1.0, 10.0))
    tensor([3., 9.])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["FUSION_GRID", "FusionChoice", "choose_fusion", "fuse", "fusion_weights"]

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
    """`edje_weight * logits + first_stage_weight * first_stage_scores`, elementwise, float32."""
    edje_weight, first_stage_weight = weights
    scores = torch.as_tensor(first_stage_scores, dtype=torch.float32, device=logits.device)
    if scores.shape != logits.shape:
        raise ValueError(
            f"fuse: first-stage scores of shape {list(scores.shape)} for logits of shape "
            f"{list(logits.shape)}; expected one score per candidate."
        )
    return edje_weight * logits.float() + first_stage_weight * scores


def fusion_weights(config) -> tuple[float, float] | None:
    """The `(edje_weight, first_stage_weight)` a model's config holds, None when it holds none
    (then candidates are ranked by EDJE alone)."""
    weight = getattr(config, "fusion_first_stage_weight", None)
    if weight is None:
        return None
    return float(getattr(config, "fusion_edje_weight", 1.0)), float(weight)


@dataclass
class FusionChoice:
    """The weights `choose_fusion` picked and the validation score of every grid point."""

    weights: tuple[float, float]
    score: float
    table: list[dict] = field(default_factory=list)


def choose_fusion(
    evaluate_weights, grid: Sequence[tuple[float, float]] = FUSION_GRID
) -> FusionChoice:
    """The grid point with the best `evaluate_weights(weights) -> float` (higher is better);
    ties go to the earlier point, so EDJE alone wins a tie and then the first stage alone."""
    table = [{"weights": tuple(w), "score": float(evaluate_weights(tuple(w)))} for w in grid]
    best = max(table, key=lambda row: row["score"])  # max keeps the first of equal scores
    return FusionChoice(weights=best["weights"], score=best["score"], table=table)
