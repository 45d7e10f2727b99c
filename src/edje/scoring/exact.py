"""Exact top-n at a fast dtype's speed: score every candidate in bf16, re-score in fp32 only
those that could still change fp32's top n, return fp32's order and fp32's scores.

The guarantee. Let `s_i` be candidate i's logit in the fast dtype, `f_i` its fp32 logit, and
suppose `|s_i - f_i| <= eps` for every candidate (eps: the model's calibrated bound). Let `c` be
the n-th largest fast logit. A candidate with `s_j < c - 2 eps` has `f_j <= s_j + eps < c - eps`,
while the n candidates with `s >= c` have `f >= c - eps`: j is not in fp32's top n. So
re-scoring in fp32 every candidate with `s_i >= c - 2 eps` and ranking those by their fp32
logits gives fp32's top n, in fp32's order (ties: input order, as fp32's stable sort) with
fp32's scores. Ranked by a fused score `a * logit + b * first_stage` (`edje.fusion`), the same
holds on the fused scores with `|a| eps`.

When it holds: when the bound does. It is measured per model (`calibrate`: the largest
`|s - f|` over N pairs, times a safety margin, stored in the model's config as
`score_error_bounds`) and checked at run time where that is free: the re-scored candidates give
their `|s - f|`; if one exceeds eps, that query is scored in fp32 throughout and a warning is
logged (once per `ExactTopN`). Candidates that are not re-scored are not checked; for them the
guarantee rests on the calibration.

Example (a bound given by hand; `calibrate` measures one):

```python
>>> import torch
>>> from edje.scoring.exact import ExactTopN
>>> exact = ExactTopN(bound=0.05)
>>> fast = [torch.tensor([0.90, 0.10, 0.88, -2.0])]  # bf16 logits of one query's 4 candidates
>>> fp32 = torch.tensor([0.87, 0.11, 0.89, -2.01])
>>> rescore = lambda rows: [fp32[r] for r in rows]  # fp32 logits of the rows asked for
>>> exact.logits(fast, rescore, top_n=1)[0]  # candidates 0 and 2 re-scored: 2 wins, as in fp32
tensor([ 0.8700,  0.1000,  0.8900, -2.0000])

```
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FAST_DTYPE",
    "PRECISIONS",
    "SAFETY_MARGIN",
    "ExactTopN",
    "calibrate",
    "error_bound",
    "rows_to_rescore",
    "write_bound",
]

FAST_DTYPE = torch.bfloat16  # what exact mode scores every candidate in
SAFETY_MARGIN = 2.0  # the stored bound = the largest difference measured x this
PRECISIONS = ("float32", "bfloat16", "float16", "exact")  # what a reranker scores in
BOUNDS_KEY = "score_error_bounds"  # EDJEConfig field: {dtype name: calibration record}

logger = logging.getLogger(__name__)


def rows_to_rescore(fast_scores: torch.Tensor, top_n: int, bound: float) -> torch.Tensor:
    """Indices (ascending) of the candidates whose exact score could place them in the top
    `top_n`: fast score >= the n-th best fast score - 2 `bound` (every one when `top_n` >= K).
    """
    count = fast_scores.numel()
    if top_n >= count:
        return torch.arange(count, device=fast_scores.device)
    scores = fast_scores.double()  # the comparison itself adds no rounding
    cut = scores.topk(top_n).values[-1]
    return (scores >= cut - 2 * bound).nonzero().flatten()


class ExactTopN:
    """Exact mode's one home: fp32's top n from fast-dtype logits and a few fp32 re-scores.

    Args:
        bound: eps, the largest `|fast logit - fp32 logit|` assumed (a model's is
            `error_bound(model.config)`).
        dtype: the fast dtype (default bfloat16).

    `counts` adds up, over calls: queries, candidates, rescored (candidates scored again in
    fp32, fallbacks included) and fallbacks (queries whose check failed, scored in fp32).
    """

    def __init__(self, bound: float, dtype: torch.dtype = FAST_DTYPE):
        if isinstance(bound, bool) or not (isinstance(bound, int | float) and bound > 0):
            raise ValueError(f"ExactTopN: bound must be a positive number, got {bound!r}.")
        if not math.isfinite(bound):
            raise ValueError(f"ExactTopN: bound must be finite, got {bound!r}.")
        self.bound, self.dtype = float(bound), dtype
        self.counts = {"queries": 0, "candidates": 0, "rescored": 0, "fallbacks": 0}
        self._warned = False

    def logits(
        self,
        fast: Sequence[torch.Tensor],
        rescore: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
        top_n: int,
        ranked_by: Sequence[torch.Tensor] | None = None,
        scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """Per query, logits `[K]` whose top `top_n` are fp32's (same candidates, order and
        values); the others keep their fast logits.

        Args:
            fast: per query, the fast-dtype logits of its K candidates.
            rescore: candidate indices per query -> their fp32 logits per query (one call
                for all queries; an empty index tensor for a query asks nothing).
            top_n: how many of each query's best are wanted exactly.
            ranked_by: per query, the fast scores candidates are ranked by, when not the
                logits themselves (fused scores); `scale`: how much a logit's error moves them
                (the fusion's EDJE weight).
        """
        bound = self.bound * abs(scale)
        rows = [rows_to_rescore(s, top_n, bound) for s in (ranked_by or fast)]
        exact = rescore(rows)
        out, again = [], []
        for q, (f, r, e) in enumerate(zip(fast, rows, exact, strict=True)):
            merged = f.float().clone()
            merged[r] = e.to(merged)
            out.append(merged)
            if r.numel() and float((e.to(merged) - f.float()[r]).abs().max()) > self.bound:
                again.append(q)
        if again:
            self._warn(again, fast, rows, exact)
            every = [torch.arange(f.numel() if q in again else 0, device=f.device)
                     for q, f in enumerate(fast)]  # fmt: skip
            full = rescore(every)
            for q in again:
                out[q] = full[q].float()
        self._count(fast, rows, again)
        return out

    def _count(self, fast, rows, again) -> None:
        self.counts["queries"] += len(fast)
        self.counts["candidates"] += sum(f.numel() for f in fast)
        self.counts["rescored"] += sum(r.numel() for r in rows)
        self.counts["rescored"] += sum(fast[q].numel() for q in again)
        self.counts["fallbacks"] += len(again)

    def _warn(self, again, fast, rows, exact) -> None:
        if self._warned:
            return
        self._warned = True
        q = again[0]
        worst = float((exact[q].float() - fast[q].float()[rows[q]]).abs().max())
        logger.warning(
            "exact mode: the %s error bound %.3g was violated (|%s - float32| = %.3g on a "
            "re-scored candidate): falling back to fp32 for %d of %d queries in this call; "
            "recalibrate the model (edje.scoring.exact.calibrate). Logged once.",
            _name(self.dtype), self.bound, _name(self.dtype), worst, len(again), len(fast),
        )  # fmt: skip


def error_bound(config: Any, dtype: torch.dtype = FAST_DTYPE) -> float | None:
    """The bound a model's config holds for `dtype` (`score_error_bounds`), or None."""
    record = (getattr(config, BOUNDS_KEY, None) or {}).get(_name(dtype))
    return None if record is None else float(record["bound"])


@torch.inference_mode()
def calibrate(
    model: Any,
    processor: Any,
    captions: Sequence[str],
    image_tokens: torch.Tensor,
    *,
    dtype: torch.dtype = FAST_DTYPE,
    device: str | torch.device | None = None,
    margin: float = SAFETY_MARGIN,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Measure a model's `dtype`-vs-fp32 logit error on pairs `(captions[i], image_tokens[i])`
    (`[N, m, d]`, as reranking sees them: real captions with real candidates' tokens), scored
    both ways by `FastScorer`. Returns the record `write_bound` stores: `bound` (the largest
    `|difference|` x `margin`), `max_abs_diff`, `safety_margin`, `pairs`, `device`.
    """
    from edje.scoring.fast import FastScorer

    if len(captions) != image_tokens.shape[0] or not len(captions):
        raise ValueError(
            f"calibrate: expected one caption per image-token row and at least one pair, got "
            f"{len(captions)} captions and {image_tokens.shape[0]} rows."
        )
    if not margin >= 1:
        raise ValueError(f"calibrate: margin must be at least 1, got {margin!r}.")
    fast = FastScorer(model, processor, dtype=dtype, device=device)
    fp32 = FastScorer(model, processor, dtype=torch.float32, device=device)
    worst = 0.0
    for start in range(0, len(captions), batch_size):
        batch = list(captions[start : start + batch_size])
        tokens = image_tokens[start : start + batch_size]
        diff = fast.score_pairs(batch, tokens) - fp32.score_pairs(batch, tokens)
        worst = max(worst, float(diff.abs().max()))
    return {
        "bound": worst * margin,
        "max_abs_diff": worst,
        "safety_margin": margin,
        "pairs": len(captions),
        "device": fp32.device.type,
    }


def write_bound(model_folder: str | Path, record: dict[str, Any], dtype=FAST_DTYPE) -> Path:
    """Store a `calibrate` record in a saved model's config.json (`score_error_bounds`),
    leaving every other key as it is."""
    from edje._utils import atomic_write

    path = Path(model_folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[BOUNDS_KEY] = {**(config.get(BOUNDS_KEY) or {}), _name(dtype): record}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return path


def scoring_dtype(precision: str) -> torch.dtype:
    """The dtype a precision scores every pair in when all scores are wanted (exact: fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    return torch.float32 if precision == "exact" else getattr(torch, precision)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
