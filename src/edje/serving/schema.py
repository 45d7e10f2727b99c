"""The rerank request and response bodies as pydantic models: what `/openapi.json` shows and
what a request body is validated against (`edje.serving.requests.parse_rerank_request` turns
validation errors into the service's one-line 400 `{"message": ...}`).

The shape is Cohere's and Jina's (`query`, `documents`, `top_n`, `return_documents`;
`{"results": [{"index", "relevance_score", "document"?}]}`), with images as documents. The
optional fields of those APIs (and vLLM's) that mean nothing for images are accepted and named
in the response's `meta.warnings`, so their clients work unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Optional request fields of the major rerank APIs that edje accepts and ignores, with why.
IGNORED_FIELDS = {
    "rank_fields": "documents are images, not records with fields",
    "max_chunks_per_doc": "an image is scored whole, never chunked",
    "max_tokens_per_doc": "an image's tokens are fixed by the model",
    "truncation": "the query is cut at the model's max_caption_length tokens",
    "truncate_prompt_tokens": "the query is cut at the model's max_caption_length tokens",
    "priority": "requests are scored in arrival order, batched together",
}


class _Strict(BaseModel):
    # JSON types as sent: "2" is not a number, true is not 1; a misspelt field is an error.
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageIdDocument(_Strict):
    image_id: str = Field(min_length=1, description="an image id in the served store")


class ImageDocument(_Strict):
    image: str = Field(
        min_length=1,
        description='a base64 image (JPEG, PNG, ...) or a "data:image/...;base64," URL',
    )


Document = str | ImageIdDocument | ImageDocument


class RerankRequest(_Strict):
    """`POST /rerank`, `/v1/rerank`, `/v2/rerank`."""

    query: str = Field(description="the caption to rank the images for")
    documents: list[Document] = Field(
        min_length=1, description="image ids in the store (strings or {image_id}) or {image}"
    )
    model: str | None = Field(None, description="the served model name; may be left out")
    top_n: int | None = Field(None, ge=1, description="keep the best top_n; null: all")
    return_documents: bool = Field(False, description="echo each document as sent")
    first_stage_scores: list[float] | None = Field(
        None, description="one first-stage score per document, fused when the model has weights"
    )
    rank_fields: list[str] | None = Field(None, description="Cohere's; ignored (images)")
    max_chunks_per_doc: int | None = Field(None, description="Cohere's; ignored (images)")
    max_tokens_per_doc: int | None = Field(None, description="Cohere's; ignored (images)")
    truncation: bool | None = Field(None, description="Jina's and Voyage's; ignored")
    truncate_prompt_tokens: int | None = Field(None, description="vLLM's; ignored")
    priority: int | None = Field(None, description="vLLM's; ignored")


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request")
    relevance_score: float = Field(description="sigmoid of EDJE's (or the fused) logit")
    document: dict[str, Any] | None = Field(
        None, description='with return_documents: {"text": id} or the object as sent'
    )


class RerankMeta(BaseModel):
    documents: int
    elapsed_ms: float
    warnings: list[str] | None = Field(None, description="the optional fields ignored, and why")


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult] = Field(description="best first")
    meta: RerankMeta


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer."""

    message: str
    id: str | None = Field(None, description="a 500's request id, in the server's log")


def ignored_field_warnings(request: RerankRequest) -> list[str]:
    """What the response's `meta.warnings` says about the ignored fields the request set."""
    given = request.model_fields_set & set(IGNORED_FIELDS)
    return [f"{name} ignored: {IGNORED_FIELDS[name]}" for name in sorted(given)]
