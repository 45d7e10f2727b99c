"""Two-stage retrieval: a first stage proposes top-k candidates, EDJE reranks them, R@k both ways.

Text -> image: each caption retrieves images (`image_retrieval_recall@k`). Image -> text: each
image retrieves captions, a hit when any of its captions is in the top k
(`text_retrieval_recall@k`). Ties count against the query (`edje.evaluation.metrics`).

- First-stage recall comes from the full caption x image score matrix when it has at most
  `full_matrix_limit` entries, else from the FAISS candidates (where a tie at the k-th place
  cannot be seen).
- Reranking scores the deepest candidate list once; a shallower depth K reads its first K
  columns. Past the depth (k >= K), the reranked top k holds the same items as the first
  stage's, so its recall@k is the first stage's.
- Image tokens come from a token store by image id when given (compressed `[m, d]` tokens, or
  raw `[n, d_vis]` tokens that the model compresses), else from
  `model.compress(model.encode_images(pixels))`, computed once per image.

Example (first stage only: a toy embedding model that knows colours):
    >>> import torch
    >>> from PIL import Image
    >>> from edje.data.schema import make_dataset
    >>> from edje.evaluation import evaluate
    >>> from edje.first_stage import EmbeddingModel
    >>> class Colours(EmbeddingModel):
    ...     embedding_dim = 3
    ...     def embed_texts(self, texts, batch_size=256, show_progress_bar=None):
    ...         rows = [[float(c in t) + 0.01 for c in ("red", "green", "blue")] for t in texts]
    ...         return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)
    ...     def embed_images(self, images, batch_size=64, show_progress_bar=None):
    ...         rows = [[v / 255 + 0.01 for v in im.getpixel((0, 0))] for im in images]
    ...         return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)
    >>> ds = make_dataset([Image.new("RGB", (4, 4), c) for c in ("red", "blue")], ["r", "b"],
    ...                   [["a red square"], ["a blue square", "blue"]], "test")
    >>> report = evaluate(ds, Colours(), k=2, ks=(1, 2), show_progress_bar=False)
    >>> report.first_stage_metrics["image_retrieval_recall@1"]  # clip_benchmark's 0-1 scale
    1.0
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from edje import image_tokens
from edje._utils import progress
from edje.evaluation.metrics import (
    I2T_KEY,
    T2I_KEY,
    recall_at_k,
    reranked_hits_at_1,
    reranked_recall_at_k,
)
from edje.evaluation.report import Candidates, EvaluationReport
from edje.first_stage.base import EmbeddingModel
from edje.first_stage.features import DatasetImages
from edje.first_stage.index import VectorIndex
from edje.fusion import FUSION_GRID, FusionChoice, choose_fusion, fuse, fusion_weights
from edje.scoring import Scorer, make_scorer

__all__ = [
    "Candidates",
    "EvaluationReport",
    "choose_fusion_weights",
    "evaluate",
    "image_token_source",
    "rerank_candidates",
    "search_both_ways",
    "with_fusion",
]

FULL_MATRIX_LIMIT = 50_000_000  # captions x images; 200 MB in float32


def evaluate(
    dataset: Any,
    first_stage: EmbeddingModel,
    model: Any = None,
    processor: Any = None,
    store: Any = None,
    *,
    k: int = 10,
    ks: Sequence[int] = (1, 5, 10),
    extra_k: Sequence[int] = (),
    batch_size: int = 256,
    image_batch_size: int = 64,
    device: str | torch.device | None = None,
    backend: str = "fast",
    dtype: torch.dtype | None = None,
    fusion: Sequence[float] | str | None = "auto",
    dataset_name: str | None = None,
    full_matrix_limit: int = FULL_MATRIX_LIMIT,
    show_progress_bar: bool | None = None,
    force_store: bool = False,
) -> EvaluationReport:
    """First stage -> top-k both ways -> EDJE rerank -> recall@k, side by side.

    Args:
        dataset: a `datasets.Dataset` in the edje schema (image, image_id, captions, split).
        first_stage: the embedding model proposing candidates.
        model, processor: an `EDJEModel` and its `EDJEProcessor`; without them only the
            first stage is reported.
        store: a `TokenStore` holding every image id of `dataset` (the fast path).
        k: the rerank depth reported as "reranked"; `extra_k` adds more depths.
        ks: recall cut-offs in the tables; the curves cover 1 .. the deepest depth.
        batch_size: (caption, image) pairs per scoring call.
        image_batch_size: images per forward pass of the vision encoders.
        device: where the models run (default: CUDA if available, else CPU).
        backend: the scorer (`edje.scoring`): `"fast"`, `"torch"` or `"onnx"`.
        dtype: the scorer's dtype (default: the model's).
        fusion: `(edje_weight, first_stage_weight)` for a "fused" row (`edje.fusion`);
            `"auto"`: the weights in the model's config, if any; `None`: no fused row.
        dataset_name: what the report calls the data (default: `dataset.info.dataset_name`).
        full_matrix_limit: the most captions x images to score in full for first-stage recall.
        show_progress_bar: tqdm bars (`None`: when stderr is a terminal).
        force_store: use a store whose fingerprint differs from the model's (a warning instead
            of the `ValueError` naming both fingerprints).
    """
    cutoffs = _cutoffs(ks, k, extra_k)
    if (model is None) != (processor is None):
        raise ValueError("evaluate: give model and processor together, or neither")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = _Run(batch_size, image_batch_size, device, backend, dtype, show_progress_bar, force_store)
    queries = _queries(dataset, model, store)
    first = _first_stage_step(first_stage, queries, cutoffs.curve, full_matrix_limit, run)
    second = _rerank_step(model, processor, store, queries, first, cutoffs, fusion, run)
    return _report(model, first_stage, dataset_name, queries, cutoffs, first, second, run)


def choose_fusion_weights(report: EvaluationReport, grid=FUSION_GRID) -> FusionChoice:
    """Fusion weights that maximise R@1 over the queries of both directions at the report's
    depth `k`, from its candidates, kept only when they beat the first stage alone by more
    than chance (`edje.fusion.choose_fusion`); evaluate a validation split, then keep the
    weights for the test split."""
    candidates = report.candidates
    if candidates is None or candidates.t2i_rerank is None:
        raise ValueError("choose_fusion_weights: the report has no reranked candidates")

    def hits(weights) -> torch.Tensor:
        t2i, t2i_scores, i2t, i2t_scores, text_to_image = _fused_lists(
            candidates, report.k, weights
        )
        return reranked_hits_at_1(text_to_image, t2i, t2i_scores, i2t, i2t_scores)

    return choose_fusion(hits, grid)


def with_fusion(report: EvaluationReport, weights) -> EvaluationReport:
    """The report with a fused row for `weights`, from its candidates (nothing is scored
    again)."""
    if report.candidates is None or report.candidates.t2i_rerank is None:
        raise ValueError("with_fusion: the report has no reranked candidates")
    first = report.first_stage_metrics
    fused = _reranked_curve(report.candidates, report.k, report.ks, first, weights)
    return dataclasses.replace(report, fused_metrics=fused, fusion_weights=list(weights))


# ---- the steps of evaluate ----


@dataclasses.dataclass
class _Run:
    """One `evaluate` call's settings, which every step reads, and its clock: `start` (when
    the run was made) and the `seconds` each step took."""

    batch_size: int
    image_batch_size: int
    device: torch.device
    backend: str
    dtype: torch.dtype | None
    show_progress_bar: bool | None
    force_store: bool
    start: float = dataclasses.field(default_factory=time.perf_counter)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def record(self, name: str, start: float) -> None:
        self.seconds[name] = round(time.perf_counter() - start, 3)


class _Cutoffs(NamedTuple):
    k: int  # the rerank depth reported as "reranked"
    ks: list[int]  # the tables' recall cut-offs
    depths: list[int]  # every rerank depth: k and extra_k
    curve: list[int]  # the curves' cut-offs: 1 .. the deepest depth or cut-off


class _Queries(NamedTuple):
    dataset: Any
    texts: list[str]  # every caption, as the model reads them
    text_to_image: torch.Tensor  # each caption's image row
    image_ids: list[str]


class _FirstStage(NamedTuple):
    candidates: Candidates  # both ways, as deep as the curves go
    curve: dict[str, float]  # recall at every k of the curves
    source: str  # "full score matrix" or "faiss candidates"


class _Reranked(NamedTuple):
    candidates: Candidates  # cut at the deepest depth, with EDJE's logits
    curves: dict[int, dict[str, float]]  # recall at every k of the curves, by rerank depth
    fused: dict[str, float]  # at depth k, when there are fusion weights
    weights: Sequence[float] | None
    pairs: int  # (caption, image) pairs scored


def _first_stage_step(first_stage, queries, curve_ks, full_matrix_limit, run) -> _FirstStage:
    """Embed captions and images, search both ways, and the first stage's recall curve."""
    t = time.perf_counter()
    text_emb, image_emb = _embed(first_stage, queries, run)
    run.record("embed", t)
    t = time.perf_counter()
    candidates = search_both_ways(text_emb, image_emb, max(curve_ks))
    candidates.text_to_image = queries.text_to_image
    curve, source = _first_stage_recall(
        text_emb, image_emb, queries.text_to_image, candidates, curve_ks, full_matrix_limit
    )
    run.record("search", t)
    return _FirstStage(candidates, curve, source)


def _rerank_step(model, processor, store, queries, first, cutoffs, fusion, run) -> _Reranked:
    """EDJE's logits for the first stage's candidates down to the deepest depth, both ways, and
    the recall they give (`_fuse_step`); without a model, nothing is reranked."""
    if model is None:
        return _Reranked(first.candidates, {}, {}, None, 0)
    dataset, texts, _, image_ids = queries
    model.to(run.device).eval()
    if store is not None:
        model.check_store(store, force=run.force_store)
    t = time.perf_counter()
    tokens = image_token_source(
        model, processor, dataset, store, image_ids, run.image_batch_size, run.show_progress_bar
    )
    run.record("image_tokens", t)  # the vision encoder without a store; a lookup with one
    t = time.perf_counter()
    scorer = make_scorer(model, processor, run.backend, dtype=run.dtype, device=run.device)
    candidates = first.candidates.truncate(max(cutoffs.depths))
    candidates.t2i_rerank, candidates.i2t_rerank = rerank_candidates(
        scorer, tokens, texts, candidates, run.batch_size, run.show_progress_bar
    )
    reranked = _fuse_step(candidates, first.curve, cutoffs, fusion, model.config)
    run.record("rerank", t)
    return reranked


def _fuse_step(candidates, first_curve, cutoffs, fusion, config) -> _Reranked:
    """Recall after reranking the top d, for every depth d, and after fusing the top k with
    `fusion`'s weights (`"auto"`: the config's, if any)."""
    reranked = {
        d: _reranked_curve(candidates, d, cutoffs.curve, first_curve) for d in cutoffs.depths
    }
    weights = fusion_weights(config) if fusion == "auto" else fusion
    fused = {}
    if weights is not None:
        fused = _reranked_curve(candidates, cutoffs.k, cutoffs.curve, first_curve, weights)
    pairs = candidates.t2i.numel() + candidates.i2t.numel()
    return _Reranked(candidates, reranked, fused, weights, pairs)


def _report(model, first_stage, dataset_name, queries, cutoffs, first, second, run):
    """Stop the clock and put the steps' results in an `EvaluationReport`."""
    run.record("total", run.start)
    return EvaluationReport.build(
        model=_name(model),
        first_stage=first_stage.name,
        dataset=_describe(queries.dataset, dataset_name, len(queries.texts)),
        k=cutoffs.k,
        ks=cutoffs.ks,
        depths=cutoffs.depths,
        first_stage_curve=first.curve,
        reranked_curves=second.curves,
        fused_curve=second.fused,
        fusion_weights=None if second.weights is None else list(second.weights),
        curve_ks=cutoffs.curve,
        pairs_scored=second.pairs,
        seconds=run.seconds,
        device=str(run.device),
        first_stage_recall_from=first.source,
        candidates=second.candidates,
    )


def _embed(first_stage, queries: _Queries, run: _Run):
    first_stage.to(run.device)
    images = DatasetImages(queries.dataset)
    image_emb = first_stage.encode_images(
        images, batch_size=run.image_batch_size, show_progress_bar=run.show_progress_bar
    )
    text_emb = first_stage.encode_texts(queries.texts, show_progress_bar=run.show_progress_bar)
    return text_emb.cpu(), image_emb.cpu()


# ---- first stage ----


def search_both_ways(text_emb: torch.Tensor, image_emb: torch.Tensor, depth: int) -> Candidates:
    """Exact top-`depth` by inner product: captions over images and images over captions."""
    images = VectorIndex(image_emb.shape[1])
    images.add(image_emb)
    t2i_scores, t2i = images.search(text_emb, depth)
    captions = VectorIndex(text_emb.shape[1])
    captions.add(text_emb)
    i2t_scores, i2t = captions.search(image_emb, depth)
    return Candidates(t2i=t2i, t2i_first=t2i_scores, i2t=i2t, i2t_first=i2t_scores)


def _first_stage_recall(text_emb, image_emb, text_to_image, candidates, curve_ks, limit):
    if len(text_emb) * len(image_emb) <= limit:
        scores = text_emb.float() @ image_emb.float().T
        return recall_at_k(scores, text_to_image, ks=curve_ks), "full score matrix"
    lists = (candidates.t2i, candidates.t2i_first, candidates.i2t, candidates.i2t_first)
    return _candidate_recall(*lists, text_to_image, curve_ks), "faiss candidates"


def _candidate_recall(t2i, t2i_scores, i2t, i2t_scores, text_to_image, curve_ks):
    # Queries may see fewer candidates than asked (a small gallery): cut the curve there.
    t2i_ks = [k for k in curve_ks if k <= t2i.shape[1]]
    i2t_ks = [k for k in curve_ks if k <= i2t.shape[1]]
    out = reranked_recall_at_k(text_to_image, t2i_candidates=t2i, t2i_scores=t2i_scores, ks=t2i_ks)
    out.update(
        reranked_recall_at_k(text_to_image, i2t_candidates=i2t, i2t_scores=i2t_scores, ks=i2t_ks)
    )
    return _fill_past_gallery(out, curve_ks)


def _fill_past_gallery(metrics: dict[str, float], curve_ks: list[int]) -> dict[str, float]:
    """A k past the gallery size lists the whole gallery: recall@k is recall@(gallery size)."""
    for key in (T2I_KEY, I2T_KEY):
        last = None
        for k in curve_ks:
            name = key.format(k=k)
            if name in metrics:
                last = metrics[name]
            elif last is not None:
                metrics[name] = last
    return metrics


# ---- reranking ----


def _check_store_ids(store, image_ids: Sequence[str]) -> None:
    missing = [i for i in image_ids if i not in store]
    if missing:
        raise ValueError(
            f"evaluate: {len(missing)} of the data's {len(image_ids)} image ids have no tokens "
            f"in the store {store.path}: the data has {missing[:3]}, the store ids such as "
            f"{list(store.ids[:3])}. Encode the data itself (`edje encode --data ...`; an "
            "image's id is its file path without the suffix), or pass the store it was made for."
        )


def image_token_source(
    model, processor, dataset, store, image_ids, image_batch_size, show_progress_bar
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`rows -> image tokens [len(rows), m, d]` on the model's device, from the store (raw
    stores through the adapter) or computed once from the pictures."""
    if store is not None:
        expected = tuple(model.config.image_token_shape)
        raw = (model.config.vision_num_tokens, model.config.vision_hidden_size)
        if tuple(store.token_shape) != (raw if store.is_raw else expected):
            raise ValueError(
                f"evaluate: the token store {store.path} holds {list(store.token_shape)} tokens "
                f"per image; the model expects compressed {list(expected)} or raw {list(raw)}"
            )
        rows = torch.from_numpy(store.index(image_ids))  # KeyError names a missing id
        return lambda index: image_tokens.from_store(model, store, rows[index.cpu()])
    tokens = image_tokens.from_images(
        model,
        processor.image_processor,
        DatasetImages(dataset),
        batch_size=image_batch_size,
        show_progress_bar=show_progress_bar,
    )
    return lambda index: tokens[index.to(tokens.device)]


def rerank_candidates(
    scorer: Scorer,
    tokens_of: Callable[[torch.Tensor], torch.Tensor],
    texts: Sequence[str],
    candidates: Candidates,
    batch_size: int = 256,
    show_progress_bar: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDJE logits for every candidate, both ways: `(t2i [T, K], i2t [I, K])` float32 CPU.

    A caption against its K candidate images, and an image against its K candidate captions,
    `batch_size // K` queries per scoring call.
    """
    total = candidates.t2i.numel() + candidates.i2t.numel()

    def t2i(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        tokens = tokens_of(cands.reshape(-1)).view(*cands.shape, scorer.num_image_tokens, -1)
        return scorer.score_queries([texts[t] for t in rows.tolist()], tokens)

    def i2t(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        tokens = tokens_of(rows).repeat_interleave(cands.shape[1], dim=0)
        return scorer.score_pairs([texts[c] for c in cands.reshape(-1).tolist()], tokens)

    with progress(total, show_progress_bar, "rerank", "pair") as bar:
        return (
            _score_rows(candidates.t2i, batch_size, t2i, bar),
            _score_rows(candidates.i2t, batch_size, i2t, bar),
        )


def _score_rows(candidates: torch.Tensor, batch_size: int, score, bar) -> torch.Tensor:
    n, depth = candidates.shape
    per_batch = max(1, batch_size // max(depth, 1))
    out = torch.empty(n, depth)
    for start in range(0, n, per_batch):
        rows = torch.arange(start, min(n, start + per_batch))
        out[rows] = score(rows, candidates[rows]).float().cpu().view(len(rows), depth)
        bar.update(len(rows) * depth)
    return out


def _fused_lists(candidates: Candidates, depth: int, weights=None):
    """`(t2i, t2i scores, i2t, i2t scores)` cut at `depth`: EDJE's logits, or fused ones."""
    t2i, i2t = candidates.t2i[:, :depth], candidates.i2t[:, :depth]
    t2i_scores, i2t_scores = candidates.t2i_rerank[:, :depth], candidates.i2t_rerank[:, :depth]
    if weights is not None:
        t2i_scores = fuse(t2i_scores, candidates.t2i_first[:, :depth], weights)
        i2t_scores = fuse(i2t_scores, candidates.i2t_first[:, :depth], weights)
    return t2i, t2i_scores, i2t, i2t_scores, candidates.text_to_image


def _reranked_curve(candidates, depth, curve_ks, first_curve, weights=None):
    """Recall at every k of the curve after reranking (or fusing, with `weights`) the top
    `depth`; past the depth the top k is the first stage's, reordered: its recall."""
    within = [k for k in curve_ks if k <= depth]
    out = _candidate_recall(*_fused_lists(candidates, depth, weights), within)
    for k in curve_ks[len(within) :]:
        for key in (T2I_KEY, I2T_KEY):
            out[key.format(k=k)] = first_curve[key.format(k=k)]
    return out


# ---- inputs and descriptions ----


def _cutoffs(ks, k, extra_k) -> _Cutoffs:
    ks = [ks] if isinstance(ks, int) else list(ks)
    depths = sorted({k, *extra_k})
    for name, values in (("ks", ks), ("k / extra_k", depths)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"evaluate: {name} must be positive integers, got {values}")
    ks = sorted(set(ks))
    return _Cutoffs(k, ks, depths, list(range(1, max([*depths, *ks]) + 1)))


def _queries(dataset, model, store) -> _Queries:
    """The captions and image ids of `dataset`, checked; a store must hold every image id."""
    from edje.data import flatten_captions

    if isinstance(dataset, dict):  # a DatasetDict
        raise ValueError(
            f"evaluate: expected one split (a datasets.Dataset), got splits {sorted(dataset)}; "
            "pass e.g. dataset['test']"
        )
    missing = [c for c in ("image", "image_id", "captions") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"evaluate: the data set lacks column(s) {missing}; expected the edje schema "
            f"(image, image_id, captions, split), got {dataset.column_names}"
        )
    if len(dataset) == 0:
        raise ValueError("evaluate: the data set is empty; expected at least one image")
    texts, text_to_image = flatten_captions(dataset)
    if not texts:
        raise ValueError("evaluate: the data set has no captions; expected at least one")
    image_ids = list(dataset["image_id"])
    if model is not None and store is not None:  # before any image is embedded
        _check_store_ids(store, image_ids)
    if model is not None:  # both stages read the captions as the model was trained on them
        texts = model.config.prepare_captions(texts)
    return _Queries(dataset, texts, text_to_image, image_ids)


def _describe(dataset, name: str | None, n_texts: int) -> dict[str, Any]:
    splits = sorted(set(dataset["split"])) if "split" in dataset.column_names else []
    info_name = getattr(getattr(dataset, "info", None), "dataset_name", None)
    return {
        "name": name or info_name or "dataset",
        "split": splits[0] if len(splits) == 1 else ",".join(splits) or None,
        "images": len(dataset),
        "captions": n_texts,
    }


def _name(model) -> str | None:
    if model is None:
        return None
    return getattr(model, "name_or_path", None) or type(model).__name__
