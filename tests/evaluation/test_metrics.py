"""Recall@k against a brute-force pure-Python reference on seeded scores with many ties."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate

from edje.evaluation.metrics import recall_at_k, reranked_recall_at_k

KS = (1, 2, 5, 10)


# ---- brute-force reference: sort each query's gallery, read off the first correct item ----


def worst_hit(scored: list[tuple[float, bool]], k: int) -> float:
    """Sort best first, correct items after wrong ones on a tie; hit if one is in the top k."""
    order = sorted(scored, key=lambda item: (-item[0], item[1]))
    return float(any(is_right for _, is_right in order[:k]))


def expected_hit(scored: list[tuple[float, bool]], k: int) -> float:
    """Random tie-break, in closed form with math.comb (independent of the code's product)."""
    if not any(is_right for _, is_right in scored):
        return 0.0
    best = max(score for score, is_right in scored if is_right)
    above = sum(1 for score, _ in scored if score > best)
    wrong = sum(1 for score, is_right in scored if score == best and not is_right)
    right = sum(1 for score, is_right in scored if score == best and is_right)
    free = k - above
    if free <= 0:
        return 0.0
    if free > wrong:
        return 1.0
    return 1.0 - math.comb(wrong, free) / math.comb(wrong + right, free)


def reference(scores, text_to_image, n_images, ks, hit) -> dict[str, float]:
    out = {}
    n_texts = len(scores)
    for k in ks:
        t2i = [
            hit([(scores[t][i], i == text_to_image[t]) for i in range(n_images)], k)
            for t in range(n_texts)
        ]
        queries = sorted(set(text_to_image))  # images with at least one caption
        i2t = [
            hit([(scores[t][i], text_to_image[t] == i) for t in range(n_texts)], k) for i in queries
        ]
        out[f"image_retrieval_recall@{k}"] = sum(t2i) / len(t2i)  # clip_benchmark's 0-1 scale
        out[f"text_retrieval_recall@{k}"] = sum(i2t) / len(i2t)
    return out


def random_problem(seed: int, n_images: int = 12, score_range: int = 4):
    """Integer scores from a small range (many ties); 0-4 captions per image."""
    rng = random.Random(seed)
    text_to_image = [i for i in range(n_images) for _ in range(rng.randint(0, 4))]
    if not text_to_image:
        text_to_image = [0]
    rng.shuffle(text_to_image)
    scores = [[float(rng.randint(0, score_range)) for _ in range(n_images)] for _ in text_to_image]
    return scores, text_to_image


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("ties, hit", [("worst", worst_hit), ("expected", expected_hit)])
@pytest.mark.parametrize("seed", range(12))
def test_full_matrix_matches_brute_force_with_ties(seed, ties, hit):
    scores, text_to_image = random_problem(seed)
    got = recall_at_k(torch.tensor(scores), torch.tensor(text_to_image), ks=KS, ties=ties)
    assert_close(got, reference(scores, text_to_image, len(scores[0]), KS, hit))


def test_expected_hit_reference_matches_enumerating_every_tie_order():
    """Check the closed-form reference itself on one small tied block by enumeration."""
    scored = [(2.0, False), (1.0, False), (1.0, True), (1.0, False), (1.0, True), (0.0, False)]
    for k in range(1, 7):
        orders = list(itertools.permutations(scored))  # every tie-break, equally likely
        hits = [any(r for _, r in sorted(o, key=lambda x: -x[0])[:k]) for o in orders]
        assert expected_hit(scored, k) == pytest.approx(sum(hits) / len(hits))


@pytest.mark.parametrize("n_images, captions_per_image", [(7, 1), (10, 3), (50, 5)])
def test_constant_scores_get_chance_not_100(n_images, captions_per_image):
    n_texts = n_images * captions_per_image
    text_to_image = torch.arange(n_images).repeat_interleave(captions_per_image)
    scores = torch.zeros(n_texts, n_images)
    ks = (1, 5)
    expected = recall_at_k(scores, text_to_image, ks=ks, ties="expected")
    worst = recall_at_k(scores, text_to_image, ks=ks)
    for k in ks:
        chance_t2i = min(k, n_images) / n_images
        # Image -> text: P(at least one of c captions among k of n_texts drawn at random).
        miss = math.comb(n_texts - captions_per_image, k) / math.comb(n_texts, k)
        assert expected[f"image_retrieval_recall@{k}"] == pytest.approx(chance_t2i)
        assert expected[f"text_retrieval_recall@{k}"] == pytest.approx(1 - miss)
        # The worst-position rule is a lower bound: the collapsed model scores nothing.
        assert worst[f"image_retrieval_recall@{k}"] == (1.0 if k >= n_images else 0.0)
        assert worst[f"text_retrieval_recall@{k}"] == (1.0 if k >= n_texts else 0.0)


def test_perfect_scores_get_1():
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    scores = torch.nn.functional.one_hot(text_to_image, 4).float()
    for ties in ("worst", "expected"):
        assert set(recall_at_k(scores, text_to_image, ks=(1, 5), ties=ties).values()) == {1.0}


def test_images_without_captions_are_distractors_not_queries():
    scores = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])  # image 2 has no caption
    got = recall_at_k(scores, torch.tensor([0, 1]), ks=(1,))
    assert got == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


def test_torchmetrics_hit_rate_agrees_on_tie_free_scores():
    """torchmetrics' RetrievalHitRate(top_k) is 1 when any relevant item is in the top k: the
    same quantity for both directions. It orders by torch.argsort, which breaks ties
    arbitrarily, so the comparison uses continuous random scores (no ties), where every tie
    rule agrees. Scores are flattened with one ``indexes`` group per query."""
    gen = torch.Generator().manual_seed(0)
    n_images = 30
    text_to_image = torch.randint(0, n_images, (90,), generator=gen)
    text_to_image[:n_images] = torch.arange(n_images)  # every image has a caption
    scores = torch.randn(len(text_to_image), n_images, generator=gen)
    ours = recall_at_k(scores, text_to_image, ks=KS)
    target = text_to_image[:, None] == torch.arange(n_images)[None, :]  # (n_texts, n_images)
    for k in KS:
        t2i = RetrievalHitRate(top_k=k)
        query = torch.arange(len(text_to_image))[:, None].expand_as(scores)
        t2i.update(scores.flatten(), target.flatten(), indexes=query.flatten())
        i2t = RetrievalHitRate(top_k=k)
        query = torch.arange(n_images)[:, None].expand_as(scores.T)
        i2t.update(scores.T.flatten(), target.T.flatten(), indexes=query.flatten())
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(t2i.compute().item())
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(i2t.compute().item())


# ---- reranked candidate lists ----


def reference_reranked(candidates, cand_scores, is_right, k, hit) -> float:
    rows = [
        hit([(s, is_right(q, c)) for c, s in zip(cands, row, strict=True)], k)
        for q, (cands, row) in enumerate(zip(candidates, cand_scores, strict=True))
    ]
    return sum(rows) / len(rows)


@pytest.mark.parametrize("ties, hit", [("worst", worst_hit), ("expected", expected_hit)])
@pytest.mark.parametrize("seed", range(8))
def test_reranked_matches_brute_force(seed, ties, hit):
    rng = random.Random(100 + seed)
    n_images, n_texts, top = 15, 40, 8
    text_to_image = [i % n_images for i in range(n_texts)]  # every image has a caption
    t2i_c = [rng.sample(range(n_images), top) for _ in range(n_texts)]
    i2t_c = [rng.sample(range(n_texts), top) for _ in range(n_images)]
    t2i_s = [[float(rng.randint(0, 3)) for _ in range(top)] for _ in range(n_texts)]
    i2t_s = [[float(rng.randint(0, 3)) for _ in range(top)] for _ in range(n_images)]
    ks = (1, 3, top)
    got = reranked_recall_at_k(
        torch.tensor(text_to_image),
        t2i_candidates=torch.tensor(t2i_c),
        t2i_scores=torch.tensor(t2i_s),
        i2t_candidates=torch.tensor(i2t_c),
        i2t_scores=torch.tensor(i2t_s),
        ks=ks,
        ties=ties,
    )
    for k in ks:
        want_t2i = reference_reranked(t2i_c, t2i_s, lambda q, c: text_to_image[q] == c, k, hit)
        want_i2t = reference_reranked(i2t_c, i2t_s, lambda q, c: text_to_image[c] == q, k, hit)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(want_t2i)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(want_i2t)


def test_reranking_the_first_stage_scores_reproduces_full_matrix_recall():
    gen = torch.Generator().manual_seed(1)
    text_to_image = torch.arange(20).repeat(3)
    scores = torch.randn(60, 20, generator=gen)
    top = 10
    t2i_scores, t2i_cands = scores.topk(top, dim=1)
    i2t_scores, i2t_cands = scores.T.topk(top, dim=1)
    ks = (1, 5, 10)
    got = reranked_recall_at_k(
        text_to_image,
        t2i_candidates=t2i_cands,
        t2i_scores=t2i_scores,
        i2t_candidates=i2t_cands,
        i2t_scores=i2t_scores,
        ks=ks,
    )
    assert_close(got, recall_at_k(scores, text_to_image, ks=ks))


def test_reranked_one_direction_only_and_k_above_candidates_rejected():
    t2i = torch.tensor([0, 1])
    cands, scores = torch.tensor([[0, 1], [0, 1]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = reranked_recall_at_k(t2i, t2i_candidates=cands, t2i_scores=scores, ks=(1,))
    assert got == {"image_retrieval_recall@1": 1.0}
    with pytest.raises(ValueError, match="k=5 exceeds the 2 candidates"):
        reranked_recall_at_k(t2i, t2i_candidates=cands, t2i_scores=scores, ks=(5,))
    with pytest.raises(ValueError, match="give both i2t_candidates and i2t_scores"):
        reranked_recall_at_k(t2i, i2t_candidates=cands)


@pytest.mark.parametrize(
    "scores, text_to_image, message",
    [
        (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), "NaN"),
        (torch.zeros(2, 3), torch.tensor([0]), r"shape \(2,\), got \(1,\)"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), r"in \[0, 3\), got min 0 max 3"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), "floating point"),
        (torch.zeros(3), torch.tensor([0, 1, 2]), "2-D tensor"),
    ],
)
def test_bad_inputs_raise_with_expected_and_given(scores, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(scores, text_to_image)


def test_bad_ks_and_tie_rule_raise():
    with pytest.raises(ValueError, match="positive integers"):
        recall_at_k(torch.zeros(1, 1), torch.tensor([0]), ks=(0,))
    with pytest.raises(ValueError, match="ties must be one of"):
        recall_at_k(torch.zeros(1, 1), torch.tensor([0]), ties="best")


def test_low_precision_scores_rank_like_float32():
    scores, text_to_image = random_problem(seed=5)
    want = recall_at_k(torch.tensor(scores), torch.tensor(text_to_image), ks=KS)
    for dtype in (torch.float16, torch.bfloat16):  # small integers are exact in both
        got = recall_at_k(torch.tensor(scores, dtype=dtype), torch.tensor(text_to_image), ks=KS)
        assert_close(got, want)


@pytest.mark.gpu
def test_cuda_scores_give_the_cpu_result():
    scores, text_to_image = random_problem(seed=6)
    scores, text_to_image = torch.tensor(scores), torch.tensor(text_to_image)
    for ties in ("worst", "expected"):
        want = recall_at_k(scores, text_to_image, ks=KS, ties=ties)
        assert_close(recall_at_k(scores.cuda(), text_to_image, ks=KS, ties=ties), want)
    top_scores, top_images = scores.topk(5, dim=1)
    kwargs = dict(t2i_candidates=top_images, t2i_scores=top_scores, ks=(1, 5))
    want = reranked_recall_at_k(text_to_image, **kwargs)
    cuda = {key: value.cuda() if torch.is_tensor(value) else value for key, value in kwargs.items()}
    assert_close(reranked_recall_at_k(text_to_image, **cuda), want)
