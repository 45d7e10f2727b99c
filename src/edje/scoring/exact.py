"""Exact top-n at a fast dtype's speed: score every candidate in bf16, re-score in fp32 only
those that could still change fp32's top n, return fp32's order and fp32's scores.

The rule (`top_rows`, then `rows_to_rescore`). Let `s_i` be candidate i's logit in the fast
dtype, `f_i` its fp32 logit, and suppose `|s_i - f_i| <= eps` for every candidate (eps: the
model's calibrated bound). First the fast top n (any n candidates would do; these are the
likeliest winners) are re-scored in fp32; let `L` be the smallest of their fp32 logits. Then
every other candidate with `s_j >= L - eps` is re-scored too, and the re-scored candidates
ranked by their fp32 logits give fp32's top n, in fp32's order (ties: input order, as fp32's
stable sort) with fp32's scores. Proof: n candidates have `f >= L`, so a candidate with
`f_j < L` is not in fp32's top n (not even by a tie); a skipped candidate has
`s_j < L - eps`, so `f_j <= s_j + eps < L`; and each skipped one keeps `s_j < L` in the
merged logits, below the n re-scored candidates with `f >= L`. The line is never looser than
the one-step rule `s_j >= c - 2 eps` (c: the n-th best fast logit): `L >= c - eps`, as each of
the fast top n has `f >= s - eps >= c - eps`. Ranked by a fused score
`a * logit + b * first_stage` (`edje.fusion`), the same holds on the fused scores with
`|a| eps`.

When it holds: when the bound does. It is measured per model (`calibrate`: each calibration
caption ranks a pool of real candidates in the fast dtype and its top 64 are scored in fp32; the
largest `|s - f|`, times a safety margin, is stored in the model's config as
`score_error_bounds`, with how it was measured) and checked at run time where that is free: the
re-scored candidates give their `|s - f|`; if one exceeds eps, that query is scored in fp32
throughout and a warning is logged (once per `ExactTopN`). Candidates that are not re-scored are
not checked; for them the guarantee rests on the calibration, and only those just below the line
matter (one further down would need an error as large as its distance to the line): the top of
a ranking, which is what `calibrate` measures. Random pairs are a poor stand-in: their logits sit
low, where the bf16 error is not the one at the top (the quickstart model's random-pair bound was
exceeded at run time by re-scored top candidates).

`ExactTopN.plan` is the rule's one home: a generator that asks for fp32 logits of some rows per
query (the fast top n, then the others above the line, then a failed check's every row) and
returns the merged logits; `ExactTopN.logits` drives it with a function, the HTTP service
(`edje.serving.app`) with its batching scheduler, one job per step.

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
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CALIBRATION_TOP",
    "FAST_DTYPE",
    "PRECISIONS",
    "SAFETY_MARGIN",
    "ExactTopN",
    "calibrate",
    "error_bound",
    "rows_to_rescore",
    "top_rows",
    "write_bound",
]

FAST_DTYPE = torch.bfloat16  # what exact mode scores every candidate in
SAFETY_MARGIN = 2.0  # the stored bound = the largest difference measured x this
# calibrate: per caption, its best this many by fast score are scored in fp32; top_n 10 plus the
# candidates near the line (4% of 1,000 at paper size) fit in it
CALIBRATION_TOP = 64
PRECISIONS = ("float32", "bfloat16", "float16", "exact")  # what a reranker scores in
BOUNDS_KEY = "score_error_bounds"  # EDJEConfig field: {dtype name: calibration record}

logger = logging.getLogger(__name__)

# Per query: the rows to score in fp32 (asked), their fp32 logits (sent back).
Plan = Generator[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def top_rows(fast_scores: torch.Tensor, top_n: int) -> torch.Tensor:
    """The rule's first step: the `top_n` best fast scores' indices, best first (ties: input
    order; all of them when `top_n` >= K)."""
    order = torch.sort(fast_scores.double(), descending=True, stable=True).indices
    return order[:top_n]


def rows_to_rescore(
    fast_scores: torch.Tensor, top_n: int, bound: float, exact_top: torch.Tensor
) -> torch.Tensor:
    """The rule's second step: indices (ascending) of the candidates outside
    `top_rows(fast_scores, top_n)` whose exact score could place them in the top `top_n`:
    fast score >= L - `bound`, L the smallest of `exact_top` (the exact scores of those top
    rows, in `top_rows`' order). Empty when `top_n` >= K."""
    scores = fast_scores.double()  # the comparison itself adds no rounding
    top = top_rows(scores, top_n)
    if top.numel() >= scores.numel():
        return top[:0]
    line = float(exact_top.double().min()) - bound
    above = scores >= line
    above[top] = False
    return above.nonzero().flatten()


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
        self.precision = _name(dtype)  # the dtype's name, as `PRECISIONS` spells it
        self.counts = {"queries": 0, "candidates": 0, "rescored": 0, "fallbacks": 0}
        self._warned = False

    def logits(
        self,
        fast: Sequence[torch.Tensor],
        rescore: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
        top_n: int,
        firsts: Sequence[Any] | None = None,
        weights: Sequence[float] | None = None,
    ) -> list[torch.Tensor]:
        """Per query, logits `[K]` whose top `top_n` are fp32's (same candidates, order and
        values); the others keep their fast logits.

        Args:
            fast: per query, the fast-dtype logits of its K candidates.
            rescore: candidate indices per query -> their fp32 logits per query (called once
                per step of `plan`; an empty index tensor for a query asks nothing).
            top_n: how many of each query's best are wanted exactly.
            firsts, weights: per query, first-stage scores, and the fusion weights: candidates
                are then ranked by `edje.fusion.fuse` of the logits and those scores.
        """
        plan = self.plan(fast, top_n, firsts, weights)
        try:
            rows = next(plan)
            while True:
                rows = plan.send(list(rescore(rows)))
        except StopIteration as done:
            return done.value

    def plan(
        self,
        fast: Sequence[torch.Tensor],
        top_n: int,
        firsts: Sequence[Any] | None = None,
        weights: Sequence[float] | None = None,
    ) -> Plan:
        """`logits`' steps as a generator: it yields the rows to score in fp32 per query, is
        sent their fp32 logits per query, and returns the merged logits (StopIteration's
        value). A step that would ask nothing is skipped."""
        rank = _Ranking(fast, firsts, weights)
        merged = [f.float().clone() for f in fast]
        top = [top_rows(rank.fast[q], top_n) for q in range(len(fast))]
        again = self._merged(merged, fast, top, (yield top))
        bound = self.bound * abs(rank.scale)
        more = [
            top[q][:0] if q in again
            else rows_to_rescore(rank.fast[q], top_n, bound, rank.of(q, merged[q][top[q]], top[q]))
            for q in range(len(fast))
        ]  # fmt: skip
        if any(r.numel() for r in more):
            again += self._merged(merged, fast, more, (yield more))
        if again:
            self._warn(again, fast, top, more, merged)
            every = [torch.arange(f.numel() if q in again else 0, device=f.device)
                     for q, f in enumerate(fast)]  # fmt: skip
            full = yield every
            for q in again:
                merged[q] = full[q].float()
        self._count(fast, top, more, again)
        return merged

    def _merged(self, merged, fast, rows, exact) -> list[int]:
        """`exact` (fp32 logits of `rows`) written into `merged`; the queries whose check
        failed (a re-scored logit more than the bound from its fast one)."""
        failed = []
        for q, (f, r, e) in enumerate(zip(fast, rows, exact, strict=True)):
            if not r.numel():
                continue
            merged[q][r] = e.to(merged[q])
            if float((merged[q][r] - f.float()[r]).abs().max()) > self.bound:
                failed.append(q)
        return failed

    def _count(self, fast, top, more, again) -> None:
        self.counts["queries"] += len(fast)
        self.counts["candidates"] += sum(f.numel() for f in fast)
        self.counts["rescored"] += sum(
            t.numel() + m.numel() for t, m in zip(top, more, strict=True)
        )
        self.counts["rescored"] += sum(fast[q].numel() for q in again)
        self.counts["fallbacks"] += len(again)

    def _warn(self, again, fast, top, more, merged) -> None:
        if self._warned:
            return
        self._warned = True
        q = again[0]
        rows = torch.cat([top[q], more[q]])
        worst = float((merged[q][rows] - fast[q].float()[rows]).abs().max())
        logger.warning(
            "exact mode: the %s error bound %.3g was violated (|%s - float32| = %.3g on a "
            "re-scored candidate): falling back to fp32 for %d of %d queries in this call; "
            "recalibrate the model (edje.scoring.exact.calibrate). Logged once.",
            _name(self.dtype), self.bound, _name(self.dtype), worst, len(again), len(fast),
        )  # fmt: skip


class _Ranking:
    """What candidates are ranked by: their logits, or the fused score with first-stage scores
    (`edje.fusion.fuse`, elementwise, so fusing a subset gives the subset of the fused)."""

    def __init__(self, fast, firsts, weights) -> None:
        self.weights = weights if firsts is not None else None
        self.scale = 1.0 if self.weights is None else self.weights[0]  # a logit error's weight
        self.firsts = None
        if self.weights is not None:
            self.firsts = [torch.as_tensor(x, dtype=torch.float32, device=f.device)
                           for f, x in zip(fast, firsts, strict=True)]  # fmt: skip
        self.fast = [self.of(q, f.float(), None) for q, f in enumerate(fast)]

    def of(self, q: int, logits: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Query q's ranking scores of `logits` (of candidates `rows`, or all)."""
        if self.weights is None:
            return logits
        from edje.fusion import fuse

        first = self.firsts[q] if rows is None else self.firsts[q][rows]
        return fuse(logits, first, self.weights)


def error_bound(config: Any, dtype: torch.dtype = FAST_DTYPE) -> float | None:
    """The bound a model's config holds for `dtype` (`score_error_bounds`), or None."""
    record = (getattr(config, BOUNDS_KEY, None) or {}).get(_name(dtype))
    return None if record is None else float(record["bound"])


@torch.inference_mode()
def calibrate(
    model: Any,
    processor: Any,
    captions: Sequence[str],
    candidates: torch.Tensor,
    *,
    top: int | None = CALIBRATION_TOP,
    dtype: torch.dtype = FAST_DTYPE,
    device: str | torch.device | None = None,
    margin: float = SAFETY_MARGIN,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Measure a model's `dtype`-vs-fp32 logit error on the pairs exact mode re-scores, both
    ways by `FastScorer`, and return the record `write_bound` stores.

    With `top` (default): each distinct caption ranks every row of `candidates` (`[K, m, d]`,
    real images' tokens) in `dtype`, as exact mode ranks a query's candidates, and its `top`
    best are scored in fp32: the pairs exact mode re-scores (the fast top n and the candidates
    near the cut) are the top of a ranking, where logits are highest and a pair is least like a
    random one; the quickstart model's random-pair bound (512 pairs) was exceeded there at run
    time. With `top=None`: the given pairs `(captions[i], candidates[i])`, row by row.

    The record: `bound` (the largest `|difference|` x `margin`), `max_abs_diff`,
    `safety_margin`, `pairs` (scored both ways), `captions`, `candidates` (per caption),
    `top`, `method` (in words) and `device`.
    """
    from edje.scoring.fast import FastScorer

    _check_calibration(captions, candidates, top, margin)
    fast = FastScorer(model, processor, dtype=dtype, device=device)
    fp32 = FastScorer(model, processor, dtype=torch.float32, device=device)
    if top is None:
        diff = _pair_differences(fast, fp32, captions, candidates, batch_size)
        method = f"{len(captions)} given (caption, candidate) pairs"
        captions_used, per_caption = len(captions), 1
    else:
        distinct = list(dict.fromkeys(captions))
        diff = _top_differences(fast, fp32, distinct, candidates, top, batch_size)
        captions_used, per_caption = len(distinct), candidates.shape[0]
        method = (
            f"each caption's top {top} of {per_caption} candidates by its {_name(dtype)} "
            "score (the pairs exact mode re-scores)"
        )
    worst = float(diff.max())
    return {
        "bound": worst * margin,
        "max_abs_diff": worst,
        "safety_margin": margin,
        "pairs": diff.numel(),
        "captions": captions_used,
        "candidates": per_caption,
        "top": top,
        "method": method,
        "device": fp32.device.type,
    }


def _check_calibration(captions, candidates, top, margin) -> None:
    if not len(captions) or not candidates.shape[0]:
        raise ValueError(
            f"calibrate: expected captions and candidates, got {len(captions)} captions and "
            f"{candidates.shape[0]} candidate rows."
        )
    if top is None and len(captions) != candidates.shape[0]:
        raise ValueError(
            f"calibrate(top=None): expected one caption per candidate row, got "
            f"{len(captions)} captions and {candidates.shape[0]} rows."
        )
    if top is not None and not (isinstance(top, int) and top >= 1):
        raise ValueError(f"calibrate: top must be a positive int or None, got {top!r}.")
    if not margin >= 1:
        raise ValueError(f"calibrate: margin must be at least 1, got {margin!r}.")


def _pair_differences(fast, fp32, captions, candidates, batch_size) -> torch.Tensor:
    """|fast - fp32| of the pairs `(captions[i], candidates[i])`."""
    diffs = []
    for start in range(0, len(captions), batch_size):
        batch = list(captions[start : start + batch_size])
        tokens = candidates[start : start + batch_size]
        diffs.append(fast.score_pairs(batch, tokens) - fp32.score_pairs(batch, tokens))
    return torch.cat(diffs).abs()


def _top_differences(fast, fp32, captions, candidates, top, batch_size) -> torch.Tensor:
    """|fast - fp32| of each caption's `top` best candidates by its fast score."""
    diffs = []
    for caption in captions:
        scores = torch.cat([fast.score(caption, c) for c in candidates.split(batch_size)])
        best = top_rows(scores, top)
        tokens = candidates[best.to(candidates.device)]
        diffs.append(scores[best] - fp32.score(caption, tokens))
    return torch.cat(diffs).abs()


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
