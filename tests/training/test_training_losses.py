"""The training objectives as functions: mining, masking, and each loss against its formula."""

from __future__ import annotations

import math

import pytest
import torch

from edje.training import losses


def test_hardest_negative_is_the_most_similar_allowed_candidate():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.85], [0.2, 0.9, 0.7, 0.1]])
    forbidden = torch.tensor([[True, False, False, True], [False, True, False, False]])
    chosen = losses.mine_negatives(sim, forbidden, torch.zeros(2, dtype=torch.long))
    assert chosen.tolist() == [1, 2]


def test_sampled_negatives_are_never_forbidden_and_stay_in_their_pool():
    torch.manual_seed(0)
    sim = torch.randn(64, 40)
    forbidden = torch.rand(64, 40) < 0.3
    forbidden[:, 0] = False  # every row keeps a candidate
    generator = torch.Generator().manual_seed(1)
    for strategy in (0, 1, 2):
        chosen = losses.mine_negatives(
            sim, forbidden, torch.full((64,), strategy), topk=5, generator=generator
        )
        assert not forbidden.gather(1, chosen[:, None]).any()
        if strategy == 1:  # among the 5 most similar allowed candidates
            top5 = sim.masked_fill(forbidden, float("-inf")).topk(5, dim=1).indices
            assert (top5 == chosen[:, None]).any(dim=1).all()


def test_random_negatives_cover_every_allowed_candidate():
    sim = torch.zeros(2000, 4)
    forbidden = torch.tensor([[True, False, False, False]]).expand(2000, 4)
    chosen = losses.mine_negatives(sim, forbidden, torch.full((2000,), 2))
    assert set(chosen.tolist()) == {1, 2, 3}


def test_rows_without_any_negative_are_refused():
    with pytest.raises(ValueError, match="no allowed negative"):
        losses.mine_negatives(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1))


def test_negative_mix_draws_in_proportion_and_validates():
    draws = losses.negative_strategies(30_000, {"hardest": 0.5, "random": 0.5})
    counts = torch.bincount(draws, minlength=3).float() / 30_000
    assert abs(counts[0] - 0.5) < 0.02 and counts[1] == 0 and abs(counts[2] - 0.5) < 0.02
    with pytest.raises(ValueError, match="negative mix must weight"):
        losses.negative_strategies(3, {"easiest": 1.0})


def test_itm_loss_is_two_way_cross_entropy():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(1 / (1 + math.e))) / 2
    assert losses.itm_loss(pos, neg).item() == pytest.approx(expected, rel=1e-6)


def test_masking_touches_only_caption_tokens_and_every_row():
    ids = torch.arange(100, 180).view(4, 20)
    maskable = torch.zeros(4, 20, dtype=torch.bool)
    maskable[:, 1:6] = True
    maskable[3] = False
    maskable[3, 2] = True  # a one-word caption still gets its word predicted
    generator = torch.Generator().manual_seed(0)
    masked, labels = losses.mask_caption_tokens(ids, maskable, 103, 30_000, 0.5, generator)
    predicted = labels != -100
    assert not (predicted & ~maskable).any()
    assert predicted.any(dim=1).all()
    assert torch.equal(labels[predicted], ids[predicted])
    assert torch.equal(masked[~predicted], ids[~predicted])
    assert (masked[predicted] == 103).float().mean() > 0.5  # mostly [MASK]


def test_half_of_the_caption_tokens_are_masked_on_average():
    ids = torch.randint(1000, 2000, (512, 30))
    maskable = torch.ones(512, 30, dtype=torch.bool)
    _, labels = losses.mask_caption_tokens(ids, maskable, 103, 30_000, 0.5)
    assert abs((labels != -100).float().mean().item() - 0.5) < 0.02


def test_text_recovery_is_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert losses.text_recovery_loss(a, b).item() == pytest.approx(0.5)


def test_distillation_targets_the_teachers_probability():
    student, teacher = torch.tensor([0.3, -1.0]), torch.tensor([2.0, -2.0])
    p = torch.sigmoid(teacher)
    expected = -(
        p * torch.log(torch.sigmoid(student)) + (1 - p) * torch.log(1 - torch.sigmoid(student))
    )
    assert losses.distillation_loss(student, teacher).item() == pytest.approx(
        expected.mean().item(), rel=1e-6
    )


def test_ranking_distillation_is_itm_with_the_teachers_two_way_softmax_as_target():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # A teacher sure of the positive gives ITM's loss itself ...
    sure = losses.ranking_distillation_loss(pos, neg, torch.tensor([50.0, 50.0]), torch.zeros(2))
    assert sure.item() == pytest.approx(losses.itm_loss(pos, neg).item(), rel=1e-6)
    # ... and the student is best off at the teacher's own margin (a shift changes nothing).
    teacher_pos, teacher_neg = torch.tensor([1.5, 0.2]), torch.tensor([0.5, 0.7])

    def loss(margin):
        return losses.ranking_distillation_loss(
            margin, torch.zeros(2), teacher_pos + 3, teacher_neg + 3
        )

    best = (teacher_pos - teacher_neg).requires_grad_()
    loss(best).backward()
    assert best.grad.abs().max().item() < 1e-6
    assert loss(best.detach() + 0.5).item() > loss(best.detach()).item()
