"""`edje serve` over real HTTP on loopback: rankings equal EDJEModel's scores, every client mistake
is a 4xx with a message, a scoring failure is a 500 the server survives, and concurrent requests
are batched into fewer forwards with the same answers."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from edje import EDJEModel
from edje.rerank import EDJEReranker
from edje.serving.app import (
    RerankerBackend,
    ServeLimits,
    create_app,
    serve_in_background,
)
from edje.store import TokenStore
from tests.helpers.loopback import http_json
from tests.helpers.tiny import make_tiny_config

# The `serving` extra (fastapi, uvicorn) is part of the test environment: no skipping here.

IDS = [f"img{i}" for i in range(12)]
LIMITS = ServeLimits(max_documents=20, max_body_bytes=200_000, max_batch_pairs=64, max_wait_ms=20)
TIMEOUT = 20  # seconds, per HTTP call


@dataclass
class Served:
    url: str
    model: EDJEModel
    processor: object
    store: TokenStore


class Exploding:
    """A backend whose forward fails for any batch holding the query "explode"."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.unknown_ids, self.prepare = backend.unknown_ids, backend.prepare

    def score_pairs(self, queries, documents):
        if "explode" in queries:
            raise RuntimeError("boom on purpose reading /srv/secret/shards/00000.bin")
        logits = self.backend.score_pairs(queries, documents)
        if "corrupt" in queries:  # as NaN tokens in a store would score
            logits = logits.masked_fill(torch.tensor(["corrupt" in q for q in queries]), math.nan)
        return logits


@pytest.fixture(scope="module", params=["fast", "torch"])
def served(request, tiny_processor, tiny_vision_encoder, tmp_path_factory):
    """The service on loopback, over a reranker with each of two scoring backends."""
    torch.manual_seed(0)
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    model = EDJEModel(config, vision_encoder=tiny_vision_encoder).eval()
    path = tmp_path_factory.mktemp("serve") / "store"
    fingerprint = model.store_fingerprint()
    with TokenStore.create(
        path, token_shape=config.image_token_shape, fingerprint=fingerprint
    ) as w:
        w.add(IDS, torch.randn(len(IDS), *config.image_token_shape))
    store = TokenStore.open(path)
    reranker = EDJEReranker(
        model, store, device="cpu", processor=tiny_processor, backend=request.param
    )
    backend = RerankerBackend(reranker)
    app = create_app(
        Exploding(backend), model_name="edje-tiny", limits=LIMITS, store_size=len(store)
    )
    with serve_in_background(app) as url:
        yield Served(url, model, tiny_processor, store)


# ---- helpers ------------------------------------------------------------------------------------


def call(url: str, payload=None, *, body: bytes | None = None, method: str | None = None):
    return http_json(url, payload, body=body, method=method, timeout=TIMEOUT)


def rerank(served: Served, payload=None, **kwargs):
    return call(f"{served.url}/v1/rerank", payload, **kwargs)


def stats(served: Served) -> dict:
    status, body = call(f"{served.url}/health")
    assert status == 200
    return body["batching"]


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))


def as_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def model_scores(served: Served, query: str, tokens: torch.Tensor) -> list[float]:
    """The reference: EDJEModel.forward on the same pairs, sigmoid of the logits."""
    with torch.no_grad():
        inputs = served.processor(text=[query] * len(tokens), image_tokens=tokens)
        return served.model(**inputs).logits.sigmoid().tolist()


def assert_ranking(results: list[dict], expected: list[float], top_n: int | None = None) -> None:
    order = sorted(range(len(expected)), key=lambda i: -expected[i])[:top_n]
    assert [r["index"] for r in results] == order
    got = [r["relevance_score"] for r in results]
    np.testing.assert_allclose(got, [expected[i] for i in order], rtol=0, atol=1e-5)


# ---- answers ------------------------------------------------------------------------------------


def test_ranks_store_ids_as_edje_model_scores_them(served):
    documents = ["img3", {"image_id": "img0"}, "img7", "img11", "img5"]
    status, body = rerank(
        served, {"model": "edje-tiny", "query": "a red car", "documents": documents}
    )
    assert status == 200, body
    assert body["model"] == "edje-tiny"
    assert body["meta"]["documents"] == 5
    tokens = served.store.gather(["img3", "img0", "img7", "img11", "img5"], dtype=torch.float32)
    assert_ranking(body["results"], model_scores(served, "a red car", tokens))
    assert all("document" not in r for r in body["results"])


def test_top_n_and_return_documents(served):
    documents = ["img1", "img2", {"image_id": "img3"}, "img4"]
    payload = {"query": "two dogs", "documents": documents, "top_n": 2, "return_documents": True}
    status, body = rerank(served, payload)
    assert status == 200, body
    tokens = served.store.gather(["img1", "img2", "img3", "img4"], dtype=torch.float32)
    assert_ranking(body["results"], model_scores(served, "two dogs", tokens), top_n=2)
    assert [r["document"] for r in body["results"]] == [  # Cohere's shape for strings
        d if isinstance(d := documents[r["index"]], dict) else {"text": d} for r in body["results"]
    ]
    status, body = rerank(served, dict(payload, top_n=50))  # more than given: all of them
    assert status == 200 and len(body["results"]) == 4


# Requests as Cohere's (v1 and v2), Jina's and vLLM's clients send them, optional fields and all.
CLIENT_REQUESTS = {
    "cohere v2": {"model": "edje-tiny", "query": "a red car", "documents": ["img3", "img0"],
                  "top_n": 2, "max_tokens_per_doc": 4096},
    "cohere v1": {"model": "edje-tiny", "query": "a red car", "documents": ["img3", "img0"],
                  "top_n": 2, "return_documents": True, "rank_fields": ["text"],
                  "max_chunks_per_doc": 10},
    "jina": {"model": "edje-tiny", "query": "a red car", "documents": ["img3", "img0"],
             "top_n": 2, "return_documents": False, "truncation": True},
    "vllm": {"model": "edje-tiny", "query": "a red car", "documents": ["img3", "img0"],
             "truncate_prompt_tokens": -1, "priority": 0},
}  # fmt: skip


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_cohere_jina_and_vllm_requests_are_answered_on_every_rerank_route(served, path):
    tokens = served.store.gather(["img3", "img0"], dtype=torch.float32)
    expected = model_scores(served, "a red car", tokens)
    for client, payload in CLIENT_REQUESTS.items():
        status, body = call(f"{served.url}{path}", payload)
        assert status == 200, (client, body)
        assert_ranking(body["results"], expected)
        ignored = sorted(set(payload) - {"model", "query", "documents", "top_n",
                                         "return_documents"})  # fmt: skip
        warnings = body["meta"].get("warnings", [])
        assert [w.split()[0] for w in warnings] == ignored, client  # each named, and why
    status, body = call(f"{served.url}{path}", GOOD)
    assert status == 200 and "warnings" not in body["meta"]


def test_the_openapi_schema_lists_the_request_and_response_fields(served):
    status, schema = call(f"{served.url}/openapi.json", method="GET")
    assert status == 200
    components = schema["components"]["schemas"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        post = schema["paths"][path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/RerankRequest"}
        response = post["responses"]["200"]["content"]["application/json"]["schema"]
        assert response == {"$ref": "#/components/schemas/RerankResponse"}
        assert post["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    request = components["RerankRequest"]
    fields = {"query", "documents", "model", "top_n", "return_documents", "first_stage_scores",
              "rank_fields", "max_tokens_per_doc", "max_chunks_per_doc"}  # fmt: skip
    assert fields <= set(request["properties"])
    assert set(request["required"]) == {"query", "documents"}
    documents = request["properties"]["documents"]["items"]["anyOf"]
    assert {"$ref": "#/components/schemas/ImageDocument"} in documents  # refs resolve
    assert {"ImageDocument", "ImageIdDocument", "RerankResult"} <= set(components)
    assert set(components["RerankResponse"]["properties"]) == {"id", "model", "results", "meta"}


def test_base64_images_mixed_with_store_ids(served):
    images = [photo(1), photo(2)]
    documents = [{"image": as_base64(images[0])}, "img9", {"image": as_base64(images[1])}]
    documents[2]["image"] = "data:image/png;base64," + documents[2]["image"]  # data URLs too
    status, body = rerank(served, {"query": "noise", "documents": documents})
    assert status == 200, body
    with torch.no_grad():
        pixels = served.processor.image_processor(images=images, return_tensors="pt")
        encoded = served.model.compress(served.model.encode_images(pixels["pixel_values"]))
    stored = served.store.gather(["img9"], dtype=torch.float32)
    tokens = torch.cat([encoded[:1], stored, encoded[1:]])
    assert_ranking(body["results"], model_scores(served, "noise", tokens))


def test_health_and_models(served):
    status, body = call(f"{served.url}/health")
    assert status == 200 and body["status"] == "ok" and body["store_images"] == len(IDS)
    status, body = call(f"{served.url}/v1/models")
    assert status == 200 and body["data"][0]["id"] == "edje-tiny"


# ---- client mistakes: 4xx with a message --------------------------------------------------------

GOOD = {"query": "a cat", "documents": ["img0", "img1"]}
NOT_AN_IMAGE = base64.b64encode(b"certainly not a PNG").decode()

BAD_REQUESTS = {
    "malformed JSON": (b'{"query": "a cat", "documents": [', 400, "not valid JSON"),
    "invalid UTF-8": (b"\xff\xfe\x00", 400, "not valid JSON"),
    "deeply nested": (b"[" * 100_000, 400, "not valid JSON"),
    "not an object": (["a cat"], 400, "JSON object"),
    "unknown field": (dict(GOOD, temperature=1), 400, "unknown fields"),
    "other model": (dict(GOOD, model="gpt"), 400, "edje-tiny"),
    "no query": ({"documents": ["img0"]}, 400, "'query'"),
    "empty query": (dict(GOOD, query="   "), 400, "'query'"),
    "query not a string": (dict(GOOD, query=5), 400, "'query'"),
    "documents not a list": (dict(GOOD, documents="img0"), 400, "'documents'"),
    "no documents": (dict(GOOD, documents=[]), 400, "'documents'"),
    "document of a wrong type": (dict(GOOD, documents=["img0", 7]), 400, "documents [1]"),
    "text document": (dict(GOOD, documents=[{"text": "a"}]), 400, "documents [0]"),
    "unknown ids": (dict(GOOD, documents=["img0", "nope-1", "nope-2"]), 400, "'nope-1', 'nope-2'"),
    "invalid base64": (dict(GOOD, documents=[{"image": "!!!"}]), 400, "invalid base64"),
    "not an image": (dict(GOOD, documents=["img0", {"image": NOT_AN_IMAGE}]), 400, "documents 1"),
    "too many documents": (dict(GOOD, documents=["img0"] * 21), 400, "at most 20"),
    "top_n zero": (dict(GOOD, top_n=0), 400, "'top_n'"),
    "top_n negative": (dict(GOOD, top_n=-3), 400, "'top_n'"),
    "top_n a string": (dict(GOOD, top_n="2"), 400, "'top_n'"),
    "top_n a bool": (dict(GOOD, top_n=True), 400, "'top_n'"),
    "top_n a float": (dict(GOOD, top_n=1.5), 400, "'top_n'"),
    "return_documents not a bool": (dict(GOOD, return_documents="yes"), 400, "return_documents"),
    "body over the limit": (dict(GOOD, query="x" * 250_000), 413, "at most 200000"),
    "query over the limit": (dict(GOOD, query="x" * 5000), 400, "at most 4096"),
    "lone surrogate": (b'{"query": "a \\ud800 cat", "documents": ["img0"]}', 400, "surrogate"),
    "lone surrogate in an id": (
        b'{"query": "a cat", "documents": ["img\\udfff"]}',
        400,
        "surrogate",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_client_mistakes_are_4xx_with_a_message(served, case):
    request, expected_status, expected_text = BAD_REQUESTS[case]
    if isinstance(request, bytes):
        status, body = rerank(served, body=request)
    else:
        status, body = rerank(served, request)
    assert status == expected_status, body
    assert expected_text in body["message"]


def test_wrong_routes_and_methods_are_4xx_json(served):
    assert call(f"{served.url}/v1/rerank", method="GET")[0] == 405
    status, body = call(f"{served.url}/v2/nothing", method="GET")
    assert status == 404 and "message" in body


def raw_connection(served: Served) -> http.client.HTTPConnection:
    parts = urlsplit(served.url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)


def get_with_host(served: Served, path: str, host: str) -> tuple[int, dict]:
    connection = raw_connection(served)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_request_naming_another_host_is_refused_as_dns_rebinding_would_send_it(served):
    port = urlsplit(served.url).port
    for path in ("/health", "/v1/models", "/images/a.jpg"):
        status, body = get_with_host(served, path, f"attacker.example:{port}")
        assert status == 400 and "'attacker.example'" in body["message"], (path, body)
        assert "--allowed-host" in body["message"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST"):
        assert get_with_host(served, "/health", host)[0] == 200, host


def test_allowed_hosts_widen_the_check_and_a_host_is_read_without_its_port():
    from edje.serving.hosts import HostCheck, host_name

    assert host_name("[::1]:8000") == "::1" and host_name("Example.ORG.:80") == "example.org"
    check = HostCheck(app=None, allowed=["search.lan"])
    assert check.accepts("search.lan", ("10.0.0.5", 8000))
    assert check.accepts("10.0.0.5", ("10.0.0.5", 8000))
    assert check.accepts("::1", ("::1", 8000)) and check.accepts("localhost", ("::1", 8000))
    assert not check.accepts("localhost", ("10.0.0.5", 8000))  # not loopback: not localhost
    assert not check.accepts("attacker.example", ("127.0.0.1", 8000))
    assert HostCheck(app=None, allowed=["*"]).accepts("anything", ("127.0.0.1", 8000))


def test_oversized_body_is_refused_before_it_is_sent(served):
    connection = raw_connection(served)
    try:  # declare 1 GB, send none of it: the answer comes from the headers alone
        connection.putrequest("POST", "/v1/rerank")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(1 << 30))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert "at most 200000" in json.loads(response.read())["message"]
    finally:
        connection.close()
    assert rerank(served, GOOD)[0] == 200  # and the server is fine


def test_oversized_chunked_body_is_cut_off(served):
    connection = raw_connection(served)
    try:  # no Content-Length: the body is counted as it streams in
        chunks = (b'{"query": "' + b"x" * 10_000 for _ in range(30))
        connection.request("POST", "/v1/rerank", body=chunks, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
        assert "200000" in json.loads(response.read())["message"]
    finally:
        connection.close()
    assert rerank(served, GOOD)[0] == 200


# ---- server failures ----------------------------------------------------------------------------


def test_a_scoring_failure_is_a_500_without_server_paths_and_the_server_goes_on(served, caplog):
    status, body = rerank(served, {"query": "explode", "documents": ["img0", "img1"]})
    assert status == 500
    assert "RuntimeError" in body["message"] and body["id"] in body["message"]
    assert "/srv/secret" not in body["message"]  # the details go to the server's log
    assert "/srv/secret" in caplog.text and body["id"] in caplog.text
    status, body = rerank(served, GOOD)
    assert status == 200 and len(body["results"]) == 2


def test_a_non_finite_score_is_a_json_500_naming_the_documents(served):
    status, body = rerank(served, {"query": "corrupt", "documents": ["img0", "img1"], "top_n": 1})
    assert status == 500
    assert "non-finite scores for documents 0 ('img0'), 1 ('img1')" in body["message"]
    assert rerank(served, GOOD)[0] == 200


def test_a_failing_request_batched_with_others_fails_alone(served):
    barrier, answers = threading.Barrier(4), {}

    def client(query: str) -> None:
        barrier.wait(timeout=TIMEOUT)
        answers[query] = rerank(served, {"query": query, "documents": ["img2", "img3"]})[0]

    threads = [threading.Thread(target=client, args=(q,)) for q in ("explode", "a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert answers == {"explode": 500, "a": 200, "b": 200, "c": 200}


# ---- concurrency --------------------------------------------------------------------------------


def test_concurrent_clients_are_batched_with_identical_answers(served):
    queries = ["a red car", "two dogs", "a beach at dawn", "snow", "a plate of pasta"]

    def payload(client: int, round_: int) -> dict:
        start = (client + 3 * round_) % len(IDS)
        documents = [IDS[(start + k) % len(IDS)] for k in range(3 + client % 4)]
        return {"query": queries[(client + round_) % len(queries)], "documents": documents}

    clients, rounds = 8, 5
    alone = {}  # the single-request answers, one request at a time
    for client in range(clients):
        for round_ in range(rounds):
            key = json.dumps(payload(client, round_))
            if key not in alone:
                status, body = rerank(served, payload(client, round_))
                assert status == 200, body
                alone[key] = body["results"]

    before = stats(served)
    barrier, answers, errors = threading.Barrier(clients), {}, []

    def client_loop(client: int) -> None:
        try:
            barrier.wait(timeout=TIMEOUT)
            for round_ in range(rounds):
                answers[client, round_] = rerank(served, payload(client, round_))
        except Exception as error:  # surfaced by the main thread's assert
            errors.append(error)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * TIMEOUT)
    assert not errors and len(answers) == clients * rounds

    after = stats(served)
    for (client, round_), (status, body) in answers.items():
        assert status == 200, body
        expected = alone[json.dumps(payload(client, round_))]
        assert [r["index"] for r in body["results"]] == [r["index"] for r in expected]
        np.testing.assert_allclose(
            [r["relevance_score"] for r in body["results"]],
            [r["relevance_score"] for r in expected],
            rtol=0,
            atol=1e-5,
        )
    forwards = after["forward_calls"] - before["forward_calls"]
    assert after["jobs"] - before["jobs"] == clients * rounds
    assert forwards < clients * rounds, f"{forwards} forwards for {clients * rounds} requests"
    assert after["largest_forward_pairs"] > 6  # a forward held pairs of several requests


# ---- the command line ---------------------------------------------------------------------------


def test_serve_help_has_an_example(capsys):
    from edje.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "/v1/rerank" in out and "--max-batch-pairs" in out


def test_serve_command_serves_a_saved_model_and_store(
    tiny_processor, tiny_vision_encoder, tmp_path, monkeypatch
):
    import edje.serving.app
    from edje.cli import main

    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    torch.manual_seed(1)
    EDJEModel(config, vision_encoder=tiny_vision_encoder).save_pretrained(
        tmp_path / "model", save_vision_encoder=True
    )
    tiny_processor.save_pretrained(tmp_path / "model")
    loaded = EDJEModel.from_pretrained(tmp_path / "model").eval()
    fingerprint = loaded.store_fingerprint()
    with TokenStore.create(
        tmp_path / "store", token_shape=config.image_token_shape, fingerprint=fingerprint
    ) as writer:
        writer.add(["a", "b", "c"], torch.randn(3, *config.image_token_shape))

    image, answers = photo(3), []
    documents = ["c", {"image": as_base64(image)}, "a"]

    def run_briefly(app, host, port, **kwargs):  # instead of serving until Ctrl-C
        assert (host, port) == ("127.0.0.1", 8123)
        with serve_in_background(app) as url:
            answers.append(call(f"{url}/v1/rerank", {"query": "x y", "documents": documents}))

    monkeypatch.setattr(edje.serving.app, "run_server", run_briefly)
    argv = ["serve", "--model", str(tmp_path / "model"), "--store", str(tmp_path / "store")]
    assert main([*argv, "--port", "8123", "--served-model-name", "tiny", "--device", "cpu"]) == 0
    # By default the folder's own name: a client can send it, and no server path leaks.
    assert main([*argv, "--port", "8123", "--dtype", "float32", "--backend", "torch"]) == 0
    [(status, body), (default_status, default_body)] = answers
    assert status == 200 and body["model"] == "tiny"
    assert default_status == 200 and default_body["model"] == "model"
    assert str(tmp_path) not in json.dumps(default_body)
    assert [r["index"] for r in default_body["results"]] == [r["index"] for r in body["results"]]
    with torch.no_grad():  # the command serves EDJEReranker's scores: EDJEModel's, again
        pixels = tiny_processor.image_processor(images=[image], return_tensors="pt")
        encoded = loaded.compress(loaded.encode_images(pixels["pixel_values"]))
        stored = TokenStore.open(tmp_path / "store").gather(["c", "a"], dtype=torch.float32)
    reference = Served("", loaded, tiny_processor, None)
    tokens = torch.cat([stored[:1], encoded, stored[1:]])
    assert_ranking(body["results"], model_scores(reference, "x y", tokens))


def _one_bit_png(side: int) -> str:
    """A blank 1-bit PNG: a few KB that decode to side x side pixels."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_request_whose_images_together_hold_too_many_pixels_is_a_413_before_decoding(
    served, monkeypatch
):
    """Eight 6000 x 6000 1-bit PNGs (a few KB each, 36M pixels each) pass the per-image cap but
    not the per-request budget, which is counted from the headers: no image is decoded."""
    from edje.serving import requests as serving_requests

    image = _one_bit_png(6000)
    assert len(image) < 20_000
    decoded = []
    real_load_rgb = serving_requests.load_rgb
    monkeypatch.setattr(
        serving_requests, "load_rgb", lambda im: decoded.append(im.size) or real_load_rgb(im)
    )
    limits = ServeLimits()
    assert 6000 * 6000 <= limits.max_image_pixels < 8 * 6000 * 6000
    documents = [{"image": image}] * 8
    status, body = rerank(served, {"query": "a cat", "documents": documents})
    assert status == 413, body
    assert "8 images hold 288000000 pixels" in body["message"], body["message"]
    assert decoded == []
    status, _ = rerank(served, {"query": "a cat", "documents": [{"image": _one_bit_png(64)}]})
    assert status == 200 and decoded == [(64, 64)]
