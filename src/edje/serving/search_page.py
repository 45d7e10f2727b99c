"""The search page of `edje serve`: type a caption, see the first stage's top k beside EDJE's
reranking of them, with the pictures; click a picture for its captions, both ways.

Routes added to the service's app by `add_search_page`:

- `GET /`: the page (one static file, no external assets: it works offline).
- `POST /v1/search` `{"query", "k"?, "top_n"?, "fusion"?}` -> `{"first_stage": [...],
  "reranked": [...], "timings_ms": {"first_stage", "rerank"}, "fusion_available"}`; each hit
  `{"rank", "image_id", "score"}`, reranked hits also `"first_stage_rank"` (1-based). The first
  stage's top k are reranked and the best `top_n` of them (default: all k) shown; with the
  reranker in exact mode and `top_n` < k, those are fp32's top n (order and scores) at about
  bf16's cost (`edje.scoring.exact`), as `EDJEReranker.rank_many(top_k=...)` gives them.
- `POST /v1/describe` `{"image_id", "k"?, "top_n"?}` -> the same two columns of captions, when
  the collection has captions.
- `GET /images/{image_id}`: a thumbnail of a file inside the image folder (nothing outside it),
  kept in memory and cached by the browser.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' `Request` annotations.
import asyncio
import io
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edje import image_tokens
from edje._utils import IMAGE_SUFFIXES
from edje.fusion import fusion_weights
from edje.serving.requests import RequestError, check_fields, check_query, parse_json, read_body

PAGE = Path(__file__).with_name("search_page.html")
THUMBNAIL_SIDE = 192
THUMBNAILS_KEPT = 2048
MAX_K = 100


@dataclass
class Collection:
    """What the page searches: a reranker with its store, a first stage and its index over the
    store's images, the folder of their files, and (optionally) captions for image -> text."""

    reranker: Any
    first_stage: Any
    index: Any  # edje.first_stage.VectorIndex with ids
    images: str | Path | None = None
    captions: list[str] = field(default_factory=list)
    _caption_embeddings: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.positions = {image_id: i for i, image_id in enumerate(self.index.ids)}
        self._check_index()

    def _check_index(self) -> None:
        """At start, what would make every search or describe fail: an index of images the
        store does not hold (built from another store), of another width than the first
        stage's embeddings, or whose vectors cannot be read back (describe needs them)."""
        where = getattr(self.index, "path", None) or "the index"
        store = self.reranker.store
        missing = [i for i in self.index.ids if i not in store]
        if missing:
            raise ValueError(
                f"{where} names {len(missing)} images the store {store.path} does not hold "
                f"(e.g. {missing[0]!r}): it was built from other images; rebuild it with "
                "`edje index` from this store's images."
            )
        width = self.first_stage.encode_texts(["index check"]).shape[-1]
        if width != self.index.dim:
            raise ValueError(
                f"{where} holds {self.index.dim}-wide vectors, the first stage embeds to {width}: "
                "it was built with another first stage."
            )
        if len(self.index):
            self.index.vector(0)  # raises now, not at the first describe

    def search(self, query: str, k: int, fusion: bool, top_n: int | None = None) -> dict[str, Any]:
        """Runs on the device thread."""
        started = time.perf_counter()
        query = self.reranker.model.config.prepare_captions([query])[0]
        scores, positions = self.index.search(self.first_stage.encode_texts([query]), k=k)
        first_ms = 1000 * (time.perf_counter() - started)
        ids = self.index.ids
        first = [
            {"rank": r, "image_id": ids[p], "score": float(s)}
            for r, (p, s) in enumerate(
                zip(positions[0].tolist(), scores[0].tolist(), strict=True), 1
            )
            if p >= 0
        ]
        started = time.perf_counter()
        hits = self.reranker.rank_many(
            [query], positions, scores if fusion else None, top_k=top_n, ids=ids,
            show_progress_bar=False,
        )[0]  # fmt: skip
        rerank_ms = 1000 * (time.perf_counter() - started)
        reranked = [
            {
                "rank": r,
                "image_id": hit["image_id"],
                "score": hit["score"],
                "first_stage_rank": hit["first_stage_rank"] + 1,
            }
            for r, hit in enumerate(hits, 1)
        ]
        return {
            "first_stage": first,
            "reranked": reranked,
            "timings_ms": {"first_stage": round(first_ms, 1), "rerank": round(rerank_ms, 1)},
        }

    def describe(self, image_id: str, k: int, top_n: int | None = None) -> dict[str, Any]:
        """Image -> captions (device thread): the first stage's top k captions, reranked
        (`EDJEReranker.rank` with the image as the query; its best `top_n` kept)."""
        started = time.perf_counter()
        if self._caption_embeddings is None:
            texts = self.reranker.model.config.prepare_captions(self.captions)
            self._caption_embeddings = self.first_stage.encode_texts(texts)
        image = torch.from_numpy(self.index.vector(self.positions[image_id]))
        first_scores, lines = (self._caption_embeddings @ image).topk(min(k, len(self.captions)))
        first_ms = 1000 * (time.perf_counter() - started)
        started = time.perf_counter()
        tokens = image_tokens.from_store(self.reranker.model, self.reranker.store, [image_id])
        hits = self.reranker.rank(
            tokens[0], [self.captions[i] for i in lines.tolist()], top_k=top_n,
            show_progress_bar=False,
        )  # fmt: skip
        rerank_ms = 1000 * (time.perf_counter() - started)
        first = [
            {"rank": r, "caption": self.captions[i], "score": float(s)}
            for r, (i, s) in enumerate(zip(lines.tolist(), first_scores.tolist(), strict=True), 1)
        ]
        reranked = [
            {**first[hit["corpus_id"]], "rank": r, "score": hit["score"],
             "first_stage_rank": hit["corpus_id"] + 1}
            for r, hit in enumerate(hits, 1)
        ]  # fmt: skip
        return {
            "first_stage": first,
            "reranked": reranked,
            "timings_ms": {"first_stage": round(first_ms, 1), "rerank": round(rerank_ms, 1)},
        }

    def image_file(self, image_id: str) -> Path:
        """The file of `image_id` inside the image folder (its id is its path there, with or
        without the suffix); a 404 for anything else, a path outside the folder included."""
        if self.images is None:
            raise RequestError(404, "this server was started without --images.")
        root = Path(self.images).resolve()
        if image_id in self.positions:
            for name in (image_id, *(image_id + s for s in IMAGE_SUFFIXES)):
                path = (root / name).resolve()
                if path.is_relative_to(root) and path.is_file():
                    return path
        raise RequestError(404, f"no image {image_id!r} in the collection's image folder.")


def image_ids_in(folder: str | Path, ids: list[str]) -> list[str]:
    """The ids of `ids` with a file in `folder` (named by the id, with or without a suffix)."""
    root = Path(folder)
    names = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    return [i for i in ids if i in names or any(i + s in names for s in IMAGE_SUFFIXES)]


def add_search_page(app, collection: Collection) -> None:
    """Add the page's routes to the service's FastAPI `app` (from `create_app`); searches run
    on its device thread, never beside a forward."""
    from fastapi.responses import HTMLResponse

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    _add_search(app, collection)
    _add_describe(app, collection)
    _add_images(app, collection)


async def _run_on_device(app, work, *args):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(app.state.device_thread, work, *args)


def _add_search(app, collection: Collection) -> None:
    """`POST /v1/search`: caption -> the first stage's top k and EDJE's reranking of them."""
    from fastapi import Request

    fusion_available = fusion_weights(collection.reranker.model.config) is not None

    @app.post("/v1/search")
    async def search(request: Request):
        body = await read_body(request, app.state.limits)
        payload = check_fields(parse_json(body), {"query", "k", "top_n", "fusion"})
        query = check_query(payload.get("query"), app.state.limits)
        k, fusion = _k(payload), payload.get("fusion", fusion_available)
        if not isinstance(fusion, bool):
            raise RequestError(400, f"'fusion' must be true or false, got {fusion!r}.")
        fusion = fusion and fusion_available
        answer = await _run_on_device(app, collection.search, query, k, fusion, _top_n(payload))
        return {**answer, "fusion_available": fusion_available}


def _add_describe(app, collection: Collection) -> None:
    """`POST /v1/describe`: image -> the first stage's top k captions and EDJE's reranking."""
    from fastapi import Request

    @app.post("/v1/describe")
    async def describe(request: Request):
        body = await read_body(request, app.state.limits)
        payload = check_fields(parse_json(body), {"image_id", "k", "top_n"})
        image_id = payload.get("image_id")
        if not isinstance(image_id, str) or image_id not in collection.positions:
            raise RequestError(404, f"no image {image_id!r} in the collection.")
        if not collection.captions:
            raise RequestError(404, "this collection has no captions (start with --captions).")
        k, top_n = _k(payload), _top_n(payload)
        return await _run_on_device(app, collection.describe, image_id, k, top_n)


def _add_images(app, collection: Collection) -> None:
    """`GET /images/{image_id}`: thumbnails, each decoded once (the first asker makes it, the
    others wait for it) and the last `THUMBNAILS_KEPT` kept in memory."""
    from fastapi.responses import Response

    thumbnails: OrderedDict[str, bytes] = OrderedDict()
    making: dict[str, asyncio.Future] = {}  # thumbnails being made, by image id

    async def make_thumbnail(image_id: str) -> None:
        # Decoded within the server's pixel budget, as base64 images are: six 6000 x 6000
        # RGBA files asked at once held 3.2 GB.
        path = collection.image_file(image_id)
        budget = app.state.pixels_in_flight
        async with budget.reserve(min(_pixels_in(path), budget.capacity)):
            thumbnails[image_id] = await asyncio.to_thread(_thumbnail, path)
        if len(thumbnails) > THUMBNAILS_KEPT:
            thumbnails.popitem(last=False)

    @app.get("/images/{image_id:path}")
    async def image(image_id: str):
        if image_id not in thumbnails:
            made = making.get(image_id)
            if made is None:  # the first asker decodes it; the others wait for its thumbnail
                made = making[image_id] = asyncio.ensure_future(make_thumbnail(image_id))
                made.add_done_callback(lambda _: making.pop(image_id, None))
            await asyncio.shield(made)
        thumbnails.move_to_end(image_id)
        headers = {"Cache-Control": "public, max-age=3600"}
        return Response(thumbnails[image_id], media_type="image/png", headers=headers)


def _pixels_in(path: Path) -> int:
    """Pixels of the image file, from its header (0 when it has none: `_thumbnail` says why)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.width * image.height
    except Exception:  # not an image: nothing will be decoded
        return 0


def _thumbnail(path: Path) -> bytes:
    from edje._utils import load_rgb

    try:
        image = load_rgb(path)
    except ValueError as error:
        raise RequestError(422, f"the image file cannot be decoded: {error}") from None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _k(payload: dict) -> int:
    return _depth(payload, "k", 10)


def _top_n(payload: dict) -> int | None:
    """How many reranked hits to show: null or absent, all k."""
    return _depth(payload, "top_n", None)


def _depth(payload: dict, name: str, default: int | None) -> int | None:
    value = payload.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_K:
        raise RequestError(400, f"'{name}' must be an integer from 1 to {MAX_K}, got {value!r}.")
    return value
