"""The rerank service's routes, as module-level handlers over the app's state (`Service`, in
`app.state.service`); `edje.serving.app.create_app` mounts them.

This module imports FastAPI at the top (the handlers' `Request` annotations must resolve), so
only `create_app` imports it: `import edje.serving.app` works without the serving extra.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' `Request` annotations.
import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from edje.ranking import rank_logits
from edje.serving.batching import MicroBatcher
from edje.serving.budget import Budget
from edje.serving.requests import (
    Document,
    RequestError,
    ServeLimits,
    body_size,
    decode_opened,
    non_finite_message,
    open_documents,
    parse_json,
    parse_rerank_request,
    pixel_count,
    read_body,
    unknown_ids_message,
)

# The service logs under one name (edje.serving.app), whichever module a line comes from.
logger = logging.getLogger("edje.serving.app")


@dataclass
class Service:
    """What the routes share: the scoring backend and its scheduler, the limits and budgets.

    Args:
        backend: the `ScoringBackend`.
        batcher: the scheduler every request's forwards go through.
        limits: what one request may ask for.
        model_name: the name answered in responses and `/v1/models`.
        store_size: reported by `/health`.
        bodies_in_flight: the server-wide budget of request bodies held.
        pixels_in_flight: the server-wide budget of decoded pixels held.
    """

    backend: Any
    batcher: MicroBatcher
    limits: ServeLimits
    model_name: str
    store_size: int | None
    bodies_in_flight: Budget
    pixels_in_flight: Budget


@contextlib.asynccontextmanager
async def lifespan(app):
    """One device thread: forwards (and image encoding) never run concurrently on the device."""
    app.state.device_thread = ThreadPoolExecutor(1, thread_name_prefix="edje-device")
    app.state.batcher.start(app.state.device_thread)
    try:
        yield
    finally:
        await app.state.batcher.stop()
        app.state.device_thread.shutdown(wait=False, cancel_futures=True)


async def client_error(request: Request, error: RequestError):
    return JSONResponse({"message": error.message}, status_code=error.status)


async def http_error(request: Request, error: HTTPException):
    """Unknown routes, wrong methods: the same JSON shape as the service's own errors."""
    return JSONResponse({"message": str(error.detail)}, status_code=error.status_code)


async def health(request: Request):
    service: Service = request.app.state.service
    backend, check = service.backend, getattr(service.backend, "check", None)
    loop = asyncio.get_running_loop()  # the device thread: never beside a forward
    device = request.app.state.device_thread
    problem = await loop.run_in_executor(device, check) if check else None
    body = {
        "status": "ok" if problem is None else "error",
        "model": service.model_name,
        "store_images": service.store_size,
        "batching": service.batcher.stats.as_dict(),
    }
    if getattr(backend, "exact", None) is not None:
        body["exact"] = dict(backend.exact.counts)
    if problem is None:
        return body
    return JSONResponse({**body, "message": problem}, status_code=503)


async def models(request: Request):
    name = request.app.state.service.model_name
    return {"object": "list", "data": [{"id": name, "object": "model"}]}


async def rerank(request: Request):
    # A body, its JSON and its images are held until answered: all requests together hold
    # at most max_body_bytes_in_flight of bodies, so concurrent large uploads take turns.
    service: Service = request.app.state.service
    async with service.bodies_in_flight.reserve(body_size(request, service.limits)):
        return await _rerank(request, service)


async def _rerank(request: Request, service: Service):
    started, request_id = time.perf_counter(), uuid.uuid4().hex
    body = await read_body(request, service.limits)
    job = parse_rerank_request(parse_json(body), service.limits, service.model_name)
    opened = await run_in_threadpool(open_documents, job.documents, service.limits)
    unknown = service.backend.unknown_ids([d for d in opened if isinstance(d, str)])
    if unknown:
        raise RequestError(400, unknown_ids_message(unknown))
    try:
        # Decoded pixels are held until scored: the whole server holds a budget of them.
        async with service.pixels_in_flight.reserve(pixel_count(opened)):
            documents = await run_in_threadpool(decode_opened, opened)
            del opened  # the undecoded files' pixels: only the RGB ones are needed now
            logits = await _score(request.app, service, documents, job)
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
    results = _results(logits, job, getattr(service.backend, "fusion", None))
    elapsed_ms = round(1000 * (time.perf_counter() - started), 3)
    meta = {"documents": len(documents), "elapsed_ms": elapsed_ms}
    if job.warnings:
        meta["warnings"] = job.warnings
    return {"id": request_id, "model": service.model_name, "results": results, "meta": meta}


async def _score(app, service: Service, documents: list[Document], job) -> torch.Tensor:
    """One request's logits: one scheduler job, or exact mode's steps when it pays."""
    backend, loop = service.backend, asyncio.get_running_loop()
    prepared = await loop.run_in_executor(app.state.device_thread, backend.prepare, documents)
    exact = getattr(backend, "exact", None)
    if exact is None or job.top_n is None or job.top_n >= len(prepared):
        return await service.batcher.score(job.query, prepared)
    fusion = getattr(backend, "fusion", None)
    weights = fusion if job.first_stage_scores is not None else None
    return await exact_logits(service.batcher, exact, job.query, prepared, job.top_n,
                              job.first_stage_scores, weights)  # fmt: skip


def _results(logits: torch.Tensor, job, weights) -> list[dict[str, Any]]:
    """The response's results, best first (`edje.ranking`): fused with the request's
    first-stage scores when the backend has fusion weights; the best `top_n` kept."""
    try:  # scores past float32's range: the client's numbers, a 400
        ranked = rank_logits(logits, job.first_stage_scores, weights, job.top_n)
    except ValueError as error:
        raise RequestError(400, str(error)) from None
    # Ordered by logit, not by sigmoid: sigmoids of large logits tie at 1.0.
    scores = ranked.scores.sigmoid().tolist()
    results = []
    for index in ranked.order:
        result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
        if job.return_documents:  # Cohere's and Jina's shape: {"text": ...} for a string
            sent = job.documents[index]
            result["document"] = sent if isinstance(sent, dict) else {"text": sent}
        results.append(result)
    return results


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
