"""`edje.ranking`: the one logits -> best-first order every door uses."""

import math

import pytest
import torch

from edje.ranking import best_first, rank_logits


def test_ties_keep_the_input_order():
    logits = torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0, -0.0, 0.0])
    assert best_first(logits).tolist() == [1, 3, 0, 2, 4, 5, 6]
    assert rank_logits(logits).order == [1, 3, 0, 2, 4, 5, 6]


def test_rows_rank_independently_and_dtype_and_device_do_not_matter():
    scores = torch.tensor([[0.1, 0.9, 0.5], [2.0, 2.0, -1.0]], dtype=torch.bfloat16)
    assert best_first(scores).tolist() == [[1, 2, 0], [0, 1, 2]]
    assert best_first(scores, top_k=1).tolist() == [[1], [0]]


def test_top_k_keeps_the_best():
    logits = torch.tensor([0.0, 5.0, 2.0, 4.0])
    assert rank_logits(logits, top_k=2).order == [1, 3]
    assert rank_logits(logits, top_k=10).order == [1, 3, 2, 0]
    assert rank_logits(logits, top_k=0).order == []


def test_fusion_orders_by_the_fused_score():
    logits, first = torch.tensor([2.0, 0.0]), [0.1, 0.9]
    ranked = rank_logits(logits, first, (1.0, 10.0))
    assert ranked.fused and ranked.order == [1, 0]
    assert ranked.scores.tolist() == pytest.approx([3.0, 9.0])
    # Without weights, or without first-stage scores, EDJE alone.
    for alone in (rank_logits(logits, first, None), rank_logits(logits, None, (1.0, 10.0))):
        assert not alone.fused and alone.order == [0, 1] and alone.scores is logits
    as_tensor = rank_logits(logits, torch.tensor(first), (1.0, 10.0))
    assert as_tensor.order == [1, 0]


def test_a_first_stage_score_past_float32_is_refused():
    with pytest.raises(ValueError, match="past float32's range"):
        rank_logits(torch.tensor([0.0, 1.0]), [0.5, 1e39], (1.0, 1.0))
    with pytest.raises(ValueError, match="one score per candidate"):
        rank_logits(torch.tensor([0.0, 1.0]), [0.5], (1.0, 1.0))


def test_nan_logits_are_not_refused_here():
    """The service refuses non-finite logits before ranking (a 500 naming them); ranking
    itself keeps torch's order, NaN first."""
    ranked = rank_logits(torch.tensor([1.0, math.nan, 2.0]))
    assert ranked.order == [1, 2, 0]
