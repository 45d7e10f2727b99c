"""Parsing and checking rerank bodies (`POST /rerank`, `/v1/rerank`, `/v2/rerank`): every
mistake is a `RequestError` (4xx). The fields and their types are `edje.serving.schema`'s.

A request, in the Cohere/Jina rerank shape:

    {"model": "edje-base",                   # optional; must be the served name if given
     "query": "a dog on a beach",
     "documents": ["img-17",                 # a plain string is an image id in the store
                   {"image_id": "img-42"},   # the same, spelled out
                   {"image": "<base64 JPEG/PNG/...>"}],  # or "data:image/png;base64,..."
     "top_n": 2,                             # optional, null = all
     "return_documents": false,              # optional: echo each document as sent
     "max_tokens_per_doc": 512}              # Cohere's, Jina's and vLLM's optional fields are
                                             # ignored, and named in meta.warnings
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from edje._utils import load_rgb

logger = logging.getLogger(__name__)

Document = str | Image.Image  # an image id in the store, or a decoded image
NAMED_AT_MOST = 10  # unknown ids / bad documents named in one error message


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; larger requests get a 4xx before any work is done."""

    max_documents: int = 1000
    max_body_bytes: int = 32 * 1024 * 1024
    max_batch_pairs: int = 512  # pairs in one forward, across requests
    max_wait_ms: float = 5.0  # how long a forward waits for other requests to join it
    # A forward is sized (from the measured speed) to take about this long: a request that
    # arrives while a large one is scored waits about one forward, then joins the next.
    max_forward_ms: float = 250.0
    max_image_pixels: int = 40_000_000  # a decoded base64 image (decompression bombs)
    # All base64 images of one request together, counted from their headers before any is
    # decoded: a few small files that each decode to tens of millions of pixels are refused.
    max_request_pixels: int = 64_000_000
    # A caption is cut at the model's max_caption_length tokens (a few hundred characters); a
    # longer query is refused rather than tokenized again for every document.
    max_query_chars: int = 4096
    # Base64 images decoded at once across all requests: concurrent requests wait their turn
    # rather than each holding its decoded pixels (4 bytes a pixel in Pillow's RGB, and a copy).
    max_pixels_in_flight: int = 64_000_000
    # Request bodies held at once across requests (a body, its parsed JSON and its decoded
    # base64 stay until the request is answered): concurrent large uploads wait their turn.
    max_body_bytes_in_flight: int = 128 * 1024 * 1024
    # A connection must send its request head this soon after opening (or after the previous
    # response), and its body this soon after the head; idle keep-alive connections close
    # after idle_timeout_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: int = 5

    def __post_init__(self) -> None:
        names = ("max_documents", "max_body_bytes", "max_batch_pairs", "max_image_pixels")
        more = ("max_request_pixels", "max_query_chars", "max_pixels_in_flight", "idle_timeout_s",
                "max_body_bytes_in_flight")  # fmt: skip
        for name in (*names, *more):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeLimits: {name} must be >= 1, got {getattr(self, name)}.")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServeLimits: {name} must be > 0, got {getattr(self, name)}.")
        if self.max_pixels_in_flight < self.max_request_pixels:
            raise ValueError(
                f"ServeLimits: max_pixels_in_flight ({self.max_pixels_in_flight}) must be at "
                f"least max_request_pixels ({self.max_request_pixels}), or a largest request "
                "could never be decoded."
            )
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"ServeLimits: max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be "
                f"at least max_body_bytes ({self.max_body_bytes})."
            )
        if self.max_wait_ms < 0:
            raise ValueError(f"ServeLimits: max_wait_ms must be >= 0, got {self.max_wait_ms}.")
        if not self.max_forward_ms > 0:
            raise ValueError(f"ServeLimits: max_forward_ms must be > 0, got {self.max_forward_ms}.")


class RequestError(Exception):
    """A client mistake: answered with `status` and `{"message": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[Any]  # as sent (echoed with return_documents)
    top_n: int | None
    return_documents: bool
    first_stage_scores: list[float] | None = None  # one per document, for score fusion
    warnings: list[str] = field(default_factory=list)  # the optional fields ignored, and why


async def read_body(request, limits: ServeLimits) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `max_body_bytes` (never
    read whole), and with 408 when it has not all arrived within `body_timeout_s`. A client
    that goes away mid-upload is one log line (and a 499 no one reads), not a traceback."""
    from starlette.requests import ClientDisconnect

    try:
        async with asyncio.timeout(limits.body_timeout_s):
            return await _read_body_within(request, limits.max_body_bytes)
    except TimeoutError:
        raise RequestError(
            408, f"the body did not arrive within {limits.body_timeout_s:g} s."
        ) from None
    except ClientDisconnect:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        logger.warning("edje serve: %s disconnected before its body arrived; dropped", client)
        raise RequestError(499, "the client disconnected before its body arrived.") from None


def body_size(request, limits: ServeLimits) -> int:
    """The bytes a request's body will hold: its Content-Length, or the most taken."""
    declared = request.headers.get("content-length", "")
    return (
        min(int(declared), limits.max_body_bytes) if declared.isdigit() else limits.max_body_bytes
    )


async def _read_body_within(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"invalid Content-Length {declared!r}.")
        if int(declared) > limit:
            raise RequestError(413, f"the body is {declared} bytes; at most {limit} are taken.")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies declare no length: count as they come
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the {limit} bytes taken.")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        payload = json.loads(body)
        # JSON may spell lone surrogates ("\\ud800"), which no text is: refuse them here,
        # once, rather than fail in the tokenizer.
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            400, "the body holds a lone surrogate escape (e.g. \\ud800): not valid Unicode text."
        ) from None
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    return payload


def parse_rerank_request(payload: Any, limits: ServeLimits, model_name: str) -> RerankRequest:
    """The body validated against `edje.serving.schema.RerankRequest`, then against `limits`
    and the served model's name; every mistake is one 400 naming the field and what came."""
    from pydantic import ValidationError

    from edje.serving.schema import RerankRequest as Body
    from edje.serving.schema import ignored_field_warnings

    check_fields(payload, set(Body.model_fields))
    try:
        body = Body.model_validate(payload)
    except ValidationError as error:
        raise RequestError(400, _validation_message(error, payload)) from None
    if body.model is not None and body.model != model_name:
        raise RequestError(
            400,
            f"model {body.model!r} is not served here; it serves {model_name!r} (or omit 'model').",
        )
    query = check_query(body.query, limits)
    documents = payload["documents"]  # as sent: echoed with return_documents
    if len(documents) > limits.max_documents:
        raise RequestError(
            400, f"{len(documents)} documents; this server takes at most {limits.max_documents}."
        )
    first_stage_scores = _first_stage_scores(body.first_stage_scores, len(documents))
    return RerankRequest(query, documents, body.top_n, body.return_documents, first_stage_scores,
                         ignored_field_warnings(body))  # fmt: skip


def _validation_message(error: Any, payload: dict) -> str:
    """pydantic's errors as one line: the bad documents by index, else the first bad field."""
    problems = error.errors()
    locations = [p["loc"] for p in problems]
    documents = sorted({loc[1] for loc in locations if loc[0] == "documents" and len(loc) > 1})
    if documents:
        return (
            f"documents {documents[:NAMED_AT_MOST]} are neither an image id string, "
            '{"image_id": "<id>"} nor {"image": "<base64>"}.'
        )
    first = problems[0]
    field = first["loc"][0] if first["loc"] else "body"
    if first["type"] == "missing":
        return f"{field!r} is required."
    return f"{field!r}: {first['msg'].lower()}, got {_kind(payload.get(field))}."


def check_fields(payload: Any, known: set[str]) -> dict:
    """A JSON object with no field outside `known` (a typo is named, not ignored)."""
    if not isinstance(payload, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_kind(payload)}.")
    unknown = sorted(set(payload) - known)
    if unknown:
        raise RequestError(400, f"unknown fields {unknown}; expected some of {sorted(known)}.")
    return payload


def check_query(query: Any, limits: ServeLimits) -> str:
    """A non-empty caption of at most `max_query_chars` characters."""
    if not isinstance(query, str) or not query.strip():
        raise RequestError(400, f"'query' must be a non-empty string, got {_kind(query)}.")
    if len(query) > limits.max_query_chars:
        raise RequestError(
            400,
            f"'query' has {len(query)} characters; this server takes at most "
            f"{limits.max_query_chars} (the model reads a caption's first "
            "max_caption_length tokens).",
        )
    return query


def open_documents(documents: list[Any], limits: ServeLimits) -> list[str | Image.Image]:
    """Image ids as strings, base64 images opened (header read, no pixel decoded yet): 400
    naming the bad ones; 413 when together they hold more pixels than a request may."""
    out: list[Any] = []
    bad: list[str] = []
    for index, doc in enumerate(documents):
        if isinstance(doc, str):
            out.append(doc)
        elif "image_id" in doc:
            out.append(doc["image_id"])
        else:
            try:
                out.append(_open_image(doc["image"], limits.max_image_pixels))
            except ValueError as error:
                bad.append(f"{index} ({error})")
    if bad:
        raise RequestError(
            400, f"documents {', '.join(bad[:NAMED_AT_MOST])} are not decodable images."
        )
    opened = [doc for doc in out if isinstance(doc, Image.Image)]
    if pixel_count(out) > limits.max_request_pixels:
        raise RequestError(
            413,
            f"the request's {len(opened)} images hold {pixel_count(out)} pixels; at most "
            f"{limits.max_request_pixels} are taken per request.",
        )
    return out


def pixel_count(documents: list[Any]) -> int:
    return sum(d.width * d.height for d in documents if isinstance(d, Image.Image))


def decode_opened(documents: list[Any]) -> list[Document]:
    """The opened images decoded to RGB `PIL.Image`s by `load_rgb`, as every door decodes."""
    return [_decoded(doc, index) if isinstance(doc, Image.Image) else doc
            for index, doc in enumerate(documents)]  # fmt: skip


def unknown_ids_message(unknown: list[str]) -> str:
    named = ", ".join(repr(i) for i in unknown[:NAMED_AT_MOST])
    more = f" and {len(unknown) - NAMED_AT_MOST} more" if len(unknown) > NAMED_AT_MOST else ""
    return f"image ids not in the store: {named}{more}."


def _open_image(text: str, max_pixels: int) -> Image.Image:
    """The image's header read (its size known, no pixel decoded yet)."""
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception as error:  # PIL raises many kinds (UnidentifiedImageError, OSError, ...)
        raise ValueError(f"not an image: {type(error).__name__}") from None
    width, height = image.size
    if width * height > max_pixels:  # checked before decoding the pixels
        raise ValueError(f"{width}x{height} pixels, over the {max_pixels} allowed")
    return image


def _decoded(image: Image.Image, index: int) -> Image.Image:
    try:
        return load_rgb(image)  # as every door decodes: transparency over white
    except Exception as error:
        reason = str(error) if isinstance(error, ValueError) else f"not an image: {error}"
        raise RequestError(400, f"documents {index} ({reason}) are not decodable images.") from None


def _first_stage_scores(scores: Any, count: int) -> list[float] | None:
    """Null, or one finite number per document."""
    if scores is None:
        return None
    numbers = isinstance(scores, list) and all(
        isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) for s in scores
    )
    if not numbers or len(scores) != count:
        raise RequestError(
            400,
            f"'first_stage_scores' must be a list of {count} numbers (one per document) or "
            f"null, got {_kind(scores)}"
            + (f" of {len(scores)}" if isinstance(scores, list) else "")
            + ".",
        )
    return [float(s) for s in scores]


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


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
