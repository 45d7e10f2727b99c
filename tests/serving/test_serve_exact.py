"""`edje serve` in exact mode, over real HTTP on loopback: a `/v1/rerank` request with `top_n`
on candidates built so that bf16 swaps neighbours gets fp32's top n (order and scores) while
only some documents are scored again in fp32; a violated bound falls back to fp32 and is logged
once; the batching scheduler never mixes precisions in one forward, nor starves one."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch

from edje.rerank import EDJEReranker
from edje.scoring.exact import calibrate
from edje.serving.app import RerankerBackend, ServeLimits, create_app, serve_in_background
from edje.serving.batching import MicroBatcher
from edje.store import TokenStore
from tests.helpers.loopback import http_json
from tests.helpers.tiny import crowded_tokens, make_tiny_model, spread_weights_

CAPTION = "a red circle left of a blue square"
TOP_N = 5
SEEDS = (0, 1, 2)
LIMITS = ServeLimits(max_documents=100, max_batch_pairs=64, max_wait_ms=5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_processor, tiny_vision_encoder):
    return spread_weights_(make_tiny_model(tiny_processor, tiny_vision_encoder, seed=3))


@pytest.fixture(scope="module")
def store(model, tiny_processor, tmp_path_factory):
    """Crowded candidates of three seeds, `s{seed}-{i}`, in a store."""
    fp32 = EDJEReranker(model, processor=tiny_processor, device="cpu")
    path = tmp_path_factory.mktemp("exact") / "store"
    with TokenStore.create(path, token_shape=(4, 32), dtype="bfloat16",
                           fingerprint=model.store_fingerprint()) as w:  # fmt: skip
        for seed in SEEDS:
            tokens = crowded_tokens(fp32, CAPTION, seed)
            w.add([f"s{seed}-{i}" for i in range(len(tokens))], tokens)
    return TokenStore.open(path)


def documents(seed: int) -> list[str]:
    return [f"s{seed}-{i}" for i in range(48)]


@pytest.fixture(scope="module")
def bound(model, tiny_processor) -> float:
    """The model's bf16 bound, calibrated on crowded candidates of other seeds."""
    fp32 = EDJEReranker(model, processor=tiny_processor, device="cpu")
    tokens = torch.cat([crowded_tokens(fp32, CAPTION, seed) for seed in (10, 11, 12)])
    return calibrate(model, tiny_processor, [CAPTION], tokens)["bound"]


def serve(model, processor, store, **precision):
    """(URL context, reranker): the service over a reranker with these options."""
    reranker = EDJEReranker(model, store, device="cpu", processor=processor, **precision)
    app = create_app(RerankerBackend(reranker), model_name="tiny", limits=LIMITS)
    return serve_in_background(app), reranker


def health(url: str) -> dict:
    status, body = http_json(f"{url}/health")
    assert status == 200, body
    return body


def top_n_of(url: str, seed: int, **extra) -> list[tuple[int, float]]:
    payload = {"query": CAPTION, "documents": documents(seed), "top_n": TOP_N, **extra}
    status, body = http_json(f"{url}/v1/rerank", payload)
    assert status == 200, body
    return [(r["index"], r["relevance_score"]) for r in body["results"]]


def reranked(reranker, seed: int, precision: str, first=None) -> list[tuple[int, float]]:
    hits = reranker.rank(CAPTION, documents(seed), top_k=TOP_N, precision=precision,
                         first_stage_scores=first)  # fmt: skip
    return [(h["corpus_id"], h["score"]) for h in hits]


def assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_v1_rerank_with_top_n_returns_fp32s_top_n_rescoring_only_some(
    model, tiny_processor, store, bound, monkeypatch, fused
):
    first = torch.linspace(0, 0.01, 48).tolist() if fused else None
    if fused:  # ranked by logit + 0.5 x first-stage score
        monkeypatch.setattr(model.config, "fusion_first_stage_weight", 0.5)
    served, reranker = serve(model, tiny_processor, store, precision="exact", error_bound=bound)
    extra = {"first_stage_scores": first} if fused else {}
    with served as url:
        before = health(url)
        for seed in SEEDS:
            want = reranked(reranker, seed, "float32", first)
            bf16 = reranked(reranker, seed, "bfloat16", first)
            assert [i for i, _ in bf16] != [i for i, _ in want], f"seed {seed}: bf16 kept fp32's"
            assert_same(top_n_of(url, seed, **extra), want)
        after = health(url)
    counts = {k: after["exact"][k] - before["exact"][k] for k in after["exact"]}
    assert counts["queries"] == len(SEEDS) and counts["candidates"] == 48 * len(SEEDS)
    assert counts["fallbacks"] == 0
    assert TOP_N * len(SEEDS) <= counts["rescored"] < counts["candidates"] / 2
    # bf16 for all, then fp32 for the rows asked: more than one forward per request.
    forwards = after["batching"]["forward_calls"] - before["batching"]["forward_calls"]
    assert forwards >= 2 * len(SEEDS)


def test_without_top_n_exact_mode_serves_every_document_in_fp32(
    model, tiny_processor, store, bound
):
    served, reranker = serve(model, tiny_processor, store, precision="exact", error_bound=bound)
    with served as url:
        status, body = http_json(f"{url}/v1/rerank", {"query": CAPTION, "documents": documents(0)})
        assert status == 200, body
        got = [(r["index"], r["relevance_score"]) for r in body["results"]]
        assert health(url)["exact"]["queries"] == 0  # no bf16 phase: nothing was left out
    hits = reranker.rank(CAPTION, documents(0), precision="float32")
    assert_same(got, [(h["corpus_id"], h["score"]) for h in hits])


def test_a_bound_violated_in_the_service_falls_back_to_fp32_and_is_logged_once(
    model, tiny_processor, store, caplog
):
    served, reranker = serve(model, tiny_processor, store, precision="exact", error_bound=1e-9)
    with caplog.at_level(logging.WARNING, logger="edje.scoring.exact"), served as url:
        for seed in SEEDS[:2]:
            assert_same(top_n_of(url, seed), reranked(reranker, seed, "float32"))
        assert health(url)["exact"]["fallbacks"] == 2
    warnings = [r.getMessage() for r in caplog.records if "falling back to fp32" in r.getMessage()]
    assert len(warnings) == 1 and "bound 1e-09 was violated" in warnings[0]


def test_concurrent_exact_and_fp32_requests_get_their_own_answers(
    model, tiny_processor, store, bound
):
    served, reranker = serve(model, tiny_processor, store, precision="exact", error_bound=bound)
    answers, barrier = {}, threading.Barrier(4)

    def client(name: str, seed: int, top_n: int | None) -> None:
        barrier.wait(timeout=20)
        payload = {"query": CAPTION, "documents": documents(seed), "top_n": top_n}
        answers[name] = http_json(f"{url}/v1/rerank", payload)

    cases = {"a": (0, TOP_N), "b": (1, TOP_N), "c": (2, None), "d": (0, 2)}
    with served as url:
        threads = [threading.Thread(target=client, args=(n, *c)) for n, c in cases.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    for name, (seed, top_n) in cases.items():
        status, body = answers[name]
        assert status == 200, body
        hits = reranker.rank(CAPTION, documents(seed), top_k=top_n, precision="float32")
        got = [(r["index"], r["relevance_score"]) for r in body["results"]]
        assert_same(got, [(h["corpus_id"], h["score"]) for h in hits])


def test_the_batcher_keeps_one_precision_per_forward_and_alternates_when_both_wait():
    forwards: list[tuple[str | None, int]] = []

    def score_pairs(queries, documents, precision=None):
        forwards.append((precision, len(queries)))
        return torch.zeros(len(queries))

    async def run() -> list[int]:
        batcher = MicroBatcher(score_pairs, max_pairs=8, max_wait_s=0.001, chunk_pairs=4)
        batcher.start(None)  # the loop's default executor
        try:
            big = asyncio.ensure_future(batcher.score("q", list(range(64)), "bfloat16"))
            await asyncio.sleep(0)  # the bf16 request is queued first
            small = batcher.score("q", list(range(4)), "float32")
            plain = batcher.score("q", list(range(4)))
            return [len(x) for x in await asyncio.gather(big, small, plain)]
        finally:
            await batcher.stop()

    assert asyncio.run(run()) == [64, 4, 4]
    precisions = [p for p, _ in forwards]
    assert sorted(set(precisions), key=str) == [None, "bfloat16", "float32"]
    # fp32's and the plain request's single forwards came long before bf16's 64 pairs were done
    assert max(precisions.index("float32"), precisions.index(None)) < 4
    assert sum(n for p, n in forwards if p == "bfloat16") == 64
