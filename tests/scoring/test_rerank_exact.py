"""Exact mode (`precision="exact"`, edje.scoring.exact): on candidates built so that bf16 swaps
neighbours, it returns fp32's top n (order and scores) while plain bf16 does not; a bound that
fails at run time falls back to fp32 and says so once; the bound travels with a saved model."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from edje.rerank import EDJEReranker
from edje.scoring.exact import (
    ExactTopN,
    calibrate,
    error_bound,
    rows_to_rescore,
    top_rows,
    write_bound,
)
from edje.store import TokenStore
from tests.helpers.tiny import crowded_tokens, make_tiny_model, spread_weights_

CAPTION = "a red circle left of a blue square"
TOP_N = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_processor, tiny_vision_encoder):
    return spread_weights_(make_tiny_model(tiny_processor, tiny_vision_encoder, seed=3))


@pytest.fixture(scope="module")
def fp32(model, tiny_processor):
    return EDJEReranker(model, processor=tiny_processor, device="cpu")


def crowded(fp32, seed: int) -> torch.Tensor:
    return crowded_tokens(fp32, CAPTION, seed)


def ranked(hits) -> list[tuple[int, float]]:
    return [(h["corpus_id"], h["score"]) for h in hits]


@pytest.fixture(scope="module")
def bound(model, tiny_processor, fp32) -> float:
    """The model's bf16 bound, calibrated on crowded candidates of other seeds."""
    tokens = torch.cat([crowded(fp32, seed) for seed in (10, 11, 12)])
    return calibrate(model, tiny_processor, [CAPTION], tokens)["bound"]


def test_rows_to_rescore_keep_fp32s_top_n_whenever_the_bound_holds():
    """Brute force on seeded data: exact scores anywhere within the bound of the fast ones
    (crowded, with ties) -> the merged logits (the fast top n re-scored, then the rows above the
    line) rank exactly as the exact scores in the top n; and the two-step rule never re-scores
    more than the one-step rule (fast >= the n-th best fast - 2 eps) would."""
    g = torch.Generator().manual_seed(0)
    tighter = 0
    for trial in range(300):
        k, n, eps = 40, int(torch.randint(1, 12, (1,), generator=g)), 0.05
        fast = (torch.randn(k, generator=g) * 0.1 * (1 + trial % 3)).bfloat16().float()
        exact = fast + (torch.rand(k, generator=g) * 2 - 1) * eps
        if trial % 5 == 0:  # exact ties too: the stable sort's input order must be kept
            exact = exact.bfloat16().float()
        top = top_rows(fast, n)
        rows = torch.cat([top, rows_to_rescore(fast, n, eps, exact[top])])
        assert rows.unique().numel() == rows.numel() >= n
        merged = fast.clone()
        merged[rows] = exact[rows]
        want = torch.sort(exact, descending=True, stable=True).indices[:n]
        got = torch.sort(merged, descending=True, stable=True).indices[:n]
        assert got.tolist() == want.tolist(), trial
        assert torch.equal(merged[got], exact[want])
        one_step = int((fast >= fast.sort(descending=True).values[n - 1] - 2 * eps).sum())
        assert rows.numel() <= one_step, trial
        tighter += rows.numel() < one_step
    assert tighter > 100  # and usually fewer


def test_exact_rank_returns_fp32s_top_n_where_bf16_swaps_neighbours(
    model, tiny_processor, fp32, bound
):
    exact = EDJEReranker(
        model, processor=tiny_processor, device="cpu", precision="exact", error_bound=bound
    )
    for seed in range(3):
        tokens = crowded(fp32, seed)
        want = ranked(fp32.rank(CAPTION, tokens, top_k=TOP_N))
        bf16 = ranked(exact.rank(CAPTION, tokens, top_k=TOP_N, precision="bfloat16"))
        got = ranked(exact.rank(CAPTION, tokens, top_k=TOP_N))
        assert [i for i, _ in bf16] != [i for i, _ in want], f"seed {seed}: bf16 kept fp32's order"
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)
    counts = exact.exact_counts
    assert counts["fallbacks"] == 0
    assert counts["rescored"] < counts["candidates"] / 2  # only the crowd near the cut


@pytest.mark.parametrize("fused", [False, True])
def test_exact_rank_many_equals_fp32_on_a_store(
    model, tiny_processor, fp32, bound, tmp_path, monkeypatch, fused
):
    tokens = torch.stack([crowded(fp32, seed) for seed in (20, 21)])  # [2, 48, 4, 32]
    ids = [[f"q{q}-{i}" for i in range(tokens.shape[1])] for q in range(2)]
    with TokenStore.create(tmp_path / "s", token_shape=(4, 32), dtype="bfloat16",
                           fingerprint=model.store_fingerprint()) as w:  # fmt: skip
        w.add([i for row in ids for i in row], tokens.flatten(0, 1))
    store = TokenStore.open(tmp_path / "s")
    first = torch.linspace(0, 0.01, tokens.shape[1]).expand(2, -1)
    if fused:  # ranked by logit + 0.5 x first-stage score
        monkeypatch.setattr(model.config, "fusion_first_stage_weight", 0.5)
    reranker = EDJEReranker(
        model, store=store, processor=tiny_processor, device="cpu", error_bound=bound
    )
    args = dict(first_stage_scores=first, top_k=TOP_N, batch_size=200)
    want = reranker.rank_many([CAPTION] * 2, ids, **args)
    got = reranker.rank_many([CAPTION] * 2, ids, precision="exact", **args)
    bf16 = reranker.rank_many([CAPTION] * 2, ids, precision="bfloat16", **args)
    ids_of = lambda hits: [[h["image_id"] for h in row] for row in hits]  # noqa: E731
    assert ids_of(got) == ids_of(want) != ids_of(bf16)
    for got_row, want_row in zip(got, want, strict=True):
        for g, w in zip(got_row, want_row, strict=True):
            assert g == pytest.approx(w, abs=1e-6)


def test_a_bound_violated_at_run_time_falls_back_to_fp32_and_says_so_once(
    model, tiny_processor, fp32, caplog
):
    tiny = EDJEReranker(
        model, processor=tiny_processor, device="cpu", precision="exact", error_bound=1e-9
    )
    with caplog.at_level(logging.WARNING, logger="edje.scoring.exact"):
        for seed in range(2):
            tokens = crowded(fp32, seed)
            want = ranked(fp32.rank(CAPTION, tokens, top_k=TOP_N))
            got = ranked(tiny.rank(CAPTION, tokens, top_k=TOP_N))
            assert [i for i, _ in got] == [i for i, _ in want]
            assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)
    assert tiny.exact_counts["fallbacks"] == 2
    warnings = [r.getMessage() for r in caplog.records if "falling back to fp32" in r.getMessage()]
    assert len(warnings) == 1 and "bound 1e-09 was violated" in warnings[0]


def test_the_bound_is_stored_with_the_saved_model_and_read_back(
    model, tiny_processor, fp32, tmp_path
):
    model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds no bfloat16 error bound.*edje calibrate"):
        EDJEReranker(str(tmp_path), device="cpu", precision="exact")
    tokens = crowded(fp32, 30)
    record = calibrate(model, tiny_processor, [CAPTION], tokens, margin=3.0)
    assert record["bound"] == pytest.approx(3 * record["max_abs_diff"]) and record["pairs"] == 48
    assert record["method"].startswith("each caption's top 64 of 48 candidates by its bfloat16")
    write_bound(tmp_path, record)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["score_error_bounds"]["bfloat16"] == record
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = EDJEReranker(str(tmp_path), device="cpu", precision="exact")
    assert error_bound(loaded.model.config) == record["bound"] == loaded._exact.bound
    want = ranked(fp32.rank(CAPTION, tokens, top_k=TOP_N))
    assert [i for i, _ in ranked(loaded.rank(CAPTION, tokens, top_k=TOP_N))] == [i for i, _ in want]


def test_calibration_measures_each_captions_top_candidates_the_pairs_exact_mode_rescores(
    model, tiny_processor, fp32
):
    """`calibrate` scores in fp32 each caption's top `top` candidates by bf16 score (not random
    pairs): its record is the largest |bf16 - fp32| over exactly those pairs, says so, and
    covers every candidate exact mode re-scores when ranking those captions' candidates."""
    from edje.scoring.fast import FastScorer

    tokens = torch.cat([crowded(fp32, seed) for seed in (40, 41)])  # 96 candidates
    captions = [CAPTION, "a blue square", CAPTION]  # a repeated caption is ranked once
    record = calibrate(model, tiny_processor, captions, tokens, top=16, margin=1.0)
    bf16 = FastScorer(model, tiny_processor, dtype=torch.bfloat16)
    f32 = FastScorer(model, tiny_processor, dtype=torch.float32)
    worst = 0.0
    for caption in (CAPTION, "a blue square"):
        fast = bf16.score(caption, tokens)
        best = top_rows(fast, 16)
        worst = max(worst, float((fast[best] - f32.score(caption, tokens[best])).abs().max()))
    assert record["max_abs_diff"] == worst == record["bound"]
    assert (record["pairs"], record["captions"], record["candidates"], record["top"]) == (
        32, 2, 96, 16)  # fmt: skip
    assert record["method"] == (
        "each caption's top 16 of 96 candidates by its bfloat16 score (the pairs exact mode "
        "re-scores)"
    )
    exact = EDJEReranker(model, processor=tiny_processor, device="cpu", precision="exact",
                         error_bound=record["bound"])  # fmt: skip
    for caption in (CAPTION, "a blue square"):
        want = ranked(fp32.rank(caption, tokens, top_k=TOP_N))
        got = ranked(exact.rank(caption, tokens, top_k=TOP_N))
        assert [i for i, _ in got] == [i for i, _ in want]
    counts = exact.exact_counts
    assert counts["fallbacks"] == 0 and 0 < counts["rescored"] <= 2 * 16
    pairs = calibrate(model, tiny_processor, [CAPTION] * 8, tokens[:8], top=None)
    assert pairs["pairs"] == 8 and pairs["method"] == "8 given (caption, candidate) pairs"
    with pytest.raises(ValueError, match="one caption per candidate row"):
        calibrate(model, tiny_processor, [CAPTION], tokens, top=None)


def test_exact_mode_misuse_gets_clear_errors(model, tiny_processor):
    with pytest.raises(ValueError, match="needs backend='fast'"):
        EDJEReranker(model, processor=tiny_processor, device="cpu", backend="torch",
                     precision="exact", error_bound=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="disagree"):
        EDJEReranker(model, processor=tiny_processor, device="cpu", dtype=torch.bfloat16,
                     precision="exact")  # fmt: skip
    with pytest.raises(ValueError, match="precision must be one of"):
        EDJEReranker(model, processor=tiny_processor, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="bound must be a positive number"):
        ExactTopN(bound=0)
