"""`edje serve`: an HTTP rerank service in the Cohere/Jina shape, on FastAPI + uvicorn.

Endpoints:

- `POST /rerank`, `/v1/rerank`, `/v2/rerank` (vLLM's, Cohere v1's and Jina's, Cohere v2's
  paths): `{"model"?, "query", "documents", "top_n"?, "return_documents"?,
  "first_stage_scores"?}` ->
  `{"id", "model", "results": [{"index", "relevance_score", "document"?}], "meta"}`, best
  first; `relevance_score` is the sigmoid of EDJE's logit, or of the fused score
  (`edje.fusion`) when the request gives one first-stage score per document and the model's
  config holds fusion weights. Documents are image ids in the store
  (plain strings or `{"image_id": ...}`) or base64 images (`{"image": ...}`); see
  `edje.serving.requests` for the checks and `edje.serving.schema` for the pydantic models
  (`/openapi.json`); the other APIs' optional fields are ignored and named in
  `meta.warnings`. Client mistakes get a 4xx `{"message": ...}`; a failure
  while scoring gets a 500 `{"message": ...}` and the server goes on.
- `GET /health`: `{"status": "ok", "model", "store_images", "batching": {...counters}}`, or
  503 with `"status": "error"` and a `message` when one stored image cannot be scored (a missing
  or truncated shard, non-finite tokens or weights).
- `GET /v1/models`: the served model, OpenAI-style.
- With a first stage (`edje serve --first-stage ...` or `--quickstart DIR`): `GET /`, the
  search page, and its `POST /v1/search`, `POST /v1/describe`, `GET /images/{id}`
  (`edje.serving.search_page.add_search_page`).

What one request may ask for, and the connection timeouts, are `ServeLimits`; base64 images
are decoded within one server-wide pixel budget (`edje.serving.budget`), and a connection slow
to send its request head is closed (`edje.serving.connections`).

Exact mode (`edje serve --precision exact`): a request with `top_n` below its documents' count
is scored in bf16, then the candidates that could change its top n again in fp32
(`edje.scoring.exact.ExactTopN.plan`: the bf16 top n, then the others above the line), each
step one job of the batching scheduler; the `top_n` results returned are fp32's (order and
scores), and the documents beyond them, not returned, keep bf16 logits. Without `top_n` (or
with one that keeps every document) every document is scored in fp32. `GET /health` adds the
counts (`exact`: queries, candidates, rescored, fallbacks).

Concurrent requests are scored together (`edje.serving.batching.MicroBatcher`). The scoring
backend is anything with the three methods of `ScoringBackend`; `edje serve` runs
`RerankerBackend` over an `edje.rerank.EDJEReranker` (store lookups, raw stores compressed on
the fly, base64 images through the same decoding as `edje encode`, any `edje.scoring` backend).

Example (the tiny model and store as in `tests/serving/test_serve.py`):

    reranker = EDJEReranker(model, store=store, processor=processor)
    app = create_app(RerankerBackend(reranker), model_name="edje-tiny")
    with serve_in_background(app) as url:  # http://127.0.0.1:<free port>
        ...  # POST f"{url}/v1/rerank"
"""

# FastAPI is imported inside `create_app` (with `edje.serving.routes`, the handlers) so that
# `import edje.serving.app` works without the serving extra.
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from edje.fusion import fusion_weights
from edje.serving.batching import MicroBatcher
from edje.serving.budget import Budget
from edje.serving.hosts import HostCheck
from edje.serving.requests import (
    Document,
    RequestError,
    ServeLimits,
    non_finite_message,
)

logger = logging.getLogger(__name__)

__all__ = [
    "RequestError",
    "RerankerBackend",
    "ScoringBackend",
    "ServeLimits",
    "create_app",
    "run_server",
    "serve_in_background",
]


class ScoringBackend(Protocol):
    """What the service needs from a reranker. `prepare` and `score_pairs` run on one device
    thread; `score_pairs` gets the prepared documents of several requests concatenated."""

    def unknown_ids(self, image_ids: Sequence[str]) -> list[str]:
        """The ids not in the store, in the order given (checked before any work)."""

    def prepare(self, documents: Sequence[Document]) -> Sequence[Any]:
        """Store ids and decoded images -> what `score_pairs` takes (e.g. tokens `[K, m, d]`)."""

    def score_pairs(self, queries: Sequence[str], documents: Sequence[Any]) -> torch.Tensor:
        """Logits `[N]`: `queries[i]` against prepared `documents[i]`. With `exact` set it
        also takes `precision=` ("bfloat16", "float32"), exact mode's two phases."""

    fusion: tuple[float, float] | None  # weights for requests with first_stage_scores
    exact: Any  # optional: an edje.scoring.exact.ExactTopN when serving in exact mode

    def check(self) -> str | None:
        """Optional: what would make reranking fail now, or None (`GET /health` asks)."""


class RerankerBackend:
    """Over an `edje.rerank.EDJEReranker`: its store lookups, image encoding and scoring
    (`predict`, one call per batch of pairs)."""

    def __init__(self, reranker) -> None:
        self.reranker = reranker
        self.fusion = fusion_weights(reranker.model.config)
        self.exact = reranker.exact_top_n  # the reranker's own: one bound, one warning

    def unknown_ids(self, image_ids: Sequence[str]) -> list[str]:
        store = self.reranker.store
        return [i for i in image_ids if store is None or i not in store]

    def prepare(self, documents: Sequence[Document]) -> Sequence[Any]:
        return list(documents)  # the reranker resolves ids and encodes images in `predict`

    def check(self) -> str | None:
        """The store's files all there at their sizes (no read), and one stored image scored
        to a finite logit: what fails every rerank shows here."""
        store = self.reranker.store
        if store is None or len(store) == 0:
            return None
        probe = store.ids[0]
        try:
            store.check_files()
            logit = self.score_pairs(["health check"], [probe])
        except Exception as error:  # reported: the service stays up
            return f"{type(error).__name__}: {error}"
        if not bool(torch.isfinite(logit).all()):
            return non_finite_message([0], [probe])
        return None

    def score_pairs(
        self, queries: Sequence[str], documents: Sequence[Any], precision: str | None = None
    ) -> torch.Tensor:
        return self.reranker.predict(
            list(zip(queries, documents, strict=True)),
            batch_size=max(len(queries), 1),
            activation_fn=torch.nn.Identity(),  # logits: the service applies the sigmoid
            convert_to_tensor=True,
            show_progress_bar=False,
            precision=precision,
        )


def create_app(
    backend: ScoringBackend,
    *,
    model_name: str = "edje",
    limits: ServeLimits | None = None,
    store_size: int | None = None,
    allowed_hosts: Sequence[str] = (),
):
    """The FastAPI app serving `backend`; run it with `run_server` or `serve_in_background`.
    A request's `Host` must be the address it came in on or one of `allowed_hosts`
    (`edje.serving.hosts`). The routes are `edje.serving.routes`' handlers; what they share
    is `app.state.service`."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException

    from edje.serving import routes
    from edje.serving.schema import ErrorResponse, RerankResponse

    limits = limits or ServeLimits()
    batcher = MicroBatcher(
        backend.score_pairs,
        max_pairs=limits.max_batch_pairs,
        max_wait_s=limits.max_wait_ms / 1000,
        max_forward_s=limits.max_forward_ms / 1000,
    )
    service = routes.Service(
        backend=backend,
        batcher=batcher,
        limits=limits,
        model_name=model_name,
        store_size=store_size,
        bodies_in_flight=Budget(limits.max_body_bytes_in_flight, "bytes", give_back_at=16 << 20),
        pixels_in_flight=Budget(limits.max_pixels_in_flight),
    )
    app = FastAPI(title="edje rerank", lifespan=routes.lifespan)
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.state.service, app.state.batcher, app.state.limits = service, batcher, limits
    app.state.pixels_in_flight = service.pixels_in_flight  # thumbnails decode within it too
    app.add_exception_handler(RequestError, routes.client_error)
    app.add_exception_handler(HTTPException, routes.http_error)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    for path in RERANK_ROUTES:  # vLLM's, Cohere v1/Jina's and Cohere v2's paths: one handler
        app.add_api_route(
            path,
            routes.rerank,
            methods=["POST"],
            name=f"rerank ({path})",
            operation_id=f"rerank{path.replace('/', '_')}",
            response_model=RerankResponse,
            response_model_exclude_none=True,
            responses={code: {"model": ErrorResponse} for code in (400, 408, 413, 500)},
            openapi_extra=REQUEST_BODY,  # the body is read by hand (size limits, timeouts)
        )
    _document_request_schema(app)
    return app


RERANK_ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank")
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RerankRequest"}}},
    }
}


def _document_request_schema(app) -> None:
    """`/openapi.json` with the request model's schema among its components: the rerank routes
    read their bodies by hand, so FastAPI would not list it by itself."""
    from edje.serving.schema import RerankRequest

    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            request = RerankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request.pop("$defs", {}))
            components["RerankRequest"] = request
        return app.openapi_schema

    app.openapi = openapi


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` until interrupted (Ctrl-C), with its limits' connection timeouts."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, **_connection_options(app))


@contextlib.contextmanager
def serve_in_background(
    app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
) -> Iterator[str]:
    """Run `app` on a thread (port 0: a free one); yields its base URL, stops it on exit."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", **_connection_options(app)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("serve_in_background: the server did not start.")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def _connection_options(app) -> dict[str, Any]:
    from edje.serving.connections import timed_protocol

    limits = getattr(app.state, "limits", None) or ServeLimits()
    return {
        "http": timed_protocol(limits.header_timeout_s),
        "timeout_keep_alive": limits.idle_timeout_s,
    }
