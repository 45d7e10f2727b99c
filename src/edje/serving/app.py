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

Example (the tiny model and store as in `tests/test_serve.py`):

    reranker = EDJEReranker(model, store=store, processor=processor)
    app = create_app(RerankerBackend(reranker), model_name="edje-tiny")
    with serve_in_background(app) as url:  # http://127.0.0.1:<free port>
        ...  # POST f"{url}/v1/rerank"
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' `Request` annotations,
# imported inside `create_app` so that `import edje.serving.app` works without the serving extra.
import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from edje.fusion import fuse, fusion_weights
from edje.serving.batching import MicroBatcher
from edje.serving.budget import Budget
from edje.serving.hosts import HostCheck
from edje.serving.requests import (
    NAMED_AT_MOST,
    Document,
    RequestError,
    ServeLimits,
    body_size,
    decode_opened,
    open_documents,
    parse_json,
    parse_rerank_request,
    pixel_count,
    read_body,
    unknown_ids_message,
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
    (`edje.serving.hosts`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from edje.serving.schema import ErrorResponse, RerankResponse

    limits = limits or ServeLimits()
    batcher = MicroBatcher(
        backend.score_pairs,
        max_pairs=limits.max_batch_pairs,
        max_wait_s=limits.max_wait_ms / 1000,
        max_forward_s=limits.max_forward_ms / 1000,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # One device thread: forwards (and image encoding) never run concurrently on the device.
        app.state.device_thread = ThreadPoolExecutor(1, thread_name_prefix="edje-device")
        batcher.start(app.state.device_thread)
        try:
            yield
        finally:
            await batcher.stop()
            app.state.device_thread.shutdown(wait=False, cancel_futures=True)

    pixels_in_flight = Budget(limits.max_pixels_in_flight)
    bodies_in_flight = Budget(limits.max_body_bytes_in_flight, "bytes", give_back_at=16 << 20)
    app = FastAPI(title="edje rerank", lifespan=lifespan)
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.state.batcher, app.state.limits = batcher, limits
    app.state.pixels_in_flight = pixels_in_flight  # thumbnails decode within it too

    @app.exception_handler(RequestError)
    async def client_error(request: Request, error: RequestError):
        return JSONResponse({"message": error.message}, status_code=error.status)

    @app.exception_handler(HTTPException)  # unknown routes, wrong methods: the same JSON shape
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse({"message": str(error.detail)}, status_code=error.status_code)

    @app.get("/health")
    async def health():
        check = getattr(backend, "check", None)
        loop = asyncio.get_running_loop()  # the device thread: never beside a forward
        problem = await loop.run_in_executor(app.state.device_thread, check) if check else None
        body = {
            "status": "ok" if problem is None else "error",
            "model": model_name,
            "store_images": store_size,
            "batching": batcher.stats.as_dict(),
        }
        if getattr(backend, "exact", None) is not None:
            body["exact"] = dict(backend.exact.counts)
        if problem is None:
            return body
        return JSONResponse({**body, "message": problem}, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    async def _score(app, query: str, documents: list[Document], job) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(app.state.device_thread, backend.prepare, documents)
        exact = getattr(backend, "exact", None)
        if exact is None or job.top_n is None or job.top_n >= len(prepared):
            return await batcher.score(query, prepared)
        fusion = getattr(backend, "fusion", None)
        weights = fusion if job.first_stage_scores is not None else None
        return await exact_logits(batcher, exact, query, prepared, job.top_n,
                                  job.first_stage_scores, weights)  # fmt: skip

    async def rerank(request: Request):
        # A body, its JSON and its images are held until answered: all requests together hold
        # at most max_body_bytes_in_flight of bodies, so concurrent large uploads take turns.
        async with bodies_in_flight.reserve(body_size(request, limits)):
            return await _rerank(request)

    async def _rerank(request):
        started, request_id = time.perf_counter(), uuid.uuid4().hex
        body = await read_body(request, limits)
        job = parse_rerank_request(parse_json(body), limits, model_name)
        opened = await run_in_threadpool(open_documents, job.documents, limits)
        unknown = backend.unknown_ids([d for d in opened if isinstance(d, str)])
        if unknown:
            raise RequestError(400, unknown_ids_message(unknown))
        try:
            # Decoded pixels are held until scored: the whole server holds a budget of them.
            async with pixels_in_flight.reserve(pixel_count(opened)):
                documents = await run_in_threadpool(decode_opened, opened)
                del opened  # the undecoded files' pixels: only the RGB ones are needed now
                logits = await _score(request.app, job.query, documents, job)
                documents = [d if isinstance(d, str) else None for d in documents]  # ids kept
        except RequestError:
            raise
        except Exception as error:  # the server's fault, not the client's: 500, and go on
            # The details (which may name server paths) go to the log, under the request's id.
            logger.exception("edje serve: request %s failed", request_id)
            message = (
                f"scoring failed ({type(error).__name__}); the server's log has the details "
                f"under request id {request_id}."
            )
            return JSONResponse({"message": message, "id": request_id}, status_code=500)
        broken = [i for i, v in enumerate(logits.tolist()) if not math.isfinite(v)]
        if broken:  # never a silently dropped document or an unserialisable body
            return JSONResponse({"message": non_finite_message(broken, documents)}, status_code=500)
        weights = getattr(backend, "fusion", None)
        if weights is not None and job.first_stage_scores is not None:
            try:  # scores past float32's range: the client's numbers, a 400
                logits = fuse(logits, torch.tensor(job.first_stage_scores), weights)
            except ValueError as error:
                raise RequestError(400, str(error)) from None
        # Ordered by logit (sigmoids of large logits tie at 1.0); a stable sort: ties by index.
        values = logits.tolist()
        order = sorted(range(len(values)), key=lambda i: -values[i])
        scores = logits.sigmoid().tolist()
        results = []
        for index in order[: job.top_n]:
            result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
            if job.return_documents:  # Cohere's and Jina's shape: {"text": ...} for a string
                sent = job.documents[index]
                result["document"] = sent if isinstance(sent, dict) else {"text": sent}
            results.append(result)
        elapsed_ms = round(1000 * (time.perf_counter() - started), 3)
        meta = {"documents": len(documents), "elapsed_ms": elapsed_ms}
        if job.warnings:
            meta["warnings"] = job.warnings
        return {"id": request_id, "model": model_name, "results": results, "meta": meta}

    for path in RERANK_ROUTES:  # vLLM's, Cohere v1/Jina's and Cohere v2's paths: one handler
        app.add_api_route(
            path,
            rerank,
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


async def exact_logits(
    batcher: MicroBatcher, exact, query: str, documents: Sequence[Any], top_n: int,
    first_stage_scores: list[float] | None, weights: tuple[float, float] | None,
) -> torch.Tensor:  # fmt: skip
    """One request's logits in exact mode: `exact.plan`'s steps (edje.scoring.exact) run as
    jobs of the batching scheduler, bf16 first, then fp32 for the rows each step asks, so
    other requests' forwards go between them. The top `top_n` are fp32's."""
    fast = await batcher.score(query, documents, precision=exact.precision)
    firsts = None if weights is None else [first_stage_scores]
    plan = exact.plan([fast], top_n, firsts, weights)
    sent = None
    while True:
        try:  # the plan's own work is fusing the client's first-stage scores: its errors are 400s
            rows = plan.send(sent)[0]
        except StopIteration as done:
            return done.value[0]
        except ValueError as error:
            raise RequestError(400, str(error)) from None
        sent = [await batcher.score(query, _rows_of(documents, rows), precision="float32")]


def _rows_of(documents: Sequence[Any], rows: torch.Tensor) -> Sequence[Any]:
    if isinstance(documents, torch.Tensor):
        return documents[rows.to(documents.device)]
    return [documents[i] for i in rows.tolist()]


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


def non_finite_message(broken: list[int], documents: Sequence[Document]) -> str:
    """What a 500 says when the model scored some documents NaN or infinite."""
    named = [
        f"{i} ({documents[i]!r})" if isinstance(documents[i], str) else str(i)
        for i in broken[:NAMED_AT_MOST]
    ]
    return (
        f"scoring gave non-finite scores for documents {', '.join(named)}: their stored tokens "
        "or the model's weights are corrupt (TokenStore.verify() checks a store)."
    )


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
