"""EDJEReranker: sentence-transformers CrossEncoder's `predict` / `rank`, over stored image tokens.

Documents (the images) may be given as

- image ids of a `TokenStore` (str): their tokens are read from the store, nothing is encoded;
- pictures: PIL images, image file paths, encoded image bytes, uint8 arrays `[H, W, C]`,
  `{"image": ...}` (sentence-transformers' multimodal dict): decoded by `edje._utils.load_rgb`
  and encoded on the fly (vision encoder + adapter), once each;
- image tokens, a tensor `[m, d]` per document or one `[K, m, d]` for all of them.

A str is read as a store id first, then as a file path (so an id that is also a file name is
the store's); a `pathlib.Path` is always a file. Kinds may be mixed in one call. `rank` also
takes an image as the query and captions as the documents (image -> captions).

Scoring goes through one of `edje.scoring`'s backends: `"fast"` (default; padding-free, equal
to `EDJEModel.forward` up to float rounding), `"torch"` (`EDJEModel.forward` itself, the
reference) or `"onnx"` (onnxruntime on the CPU).

`precision="exact"` ranks with fp32's answer at about bf16's speed: every candidate is scored in
bf16, the few whose score could still cross the top-k cut or swap with a neighbour are scored
again in fp32, and the top k come back in fp32's order with fp32's scores (`edje.scoring.exact`
states the guarantee and the bound it rests on, measured by `edje calibrate`).

With first-stage scores (`rank(..., first_stage_scores=...)`, `rank_many`), candidates are ordered
by the fused score of `edje.fusion` when the model's config holds fusion weights.

Example (a tiny random model; `EDJEReranker("path/to/edje", store="photos.store")` for a real one):

```python
>>> import torch
>>> from edje import EDJEConfig, EDJEModel, EDJEProcessor
>>> from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
>>> from edje.rerank import EDJEReranker
>>> processor = EDJEProcessor.from_backbones(vision=OFFLINE_VISION, text=OFFLINE_TEXT,
...     num_image_tokens=4)
>>> tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
...     intermediate_size=64, vocab_size=len(processor.tokenizer))
>>> config = EDJEConfig(text_config=tiny, vision_hidden_size=32, vision_num_tokens=5,
...     vision_num_heads=2, num_image_tokens=4, adapter_mlp_size=64,
...     image_token_id=processor.image_token_id)
>>> reranker = EDJEReranker(EDJEModel(config), processor=processor, device="cpu")
>>> images = torch.randn(3, 4, 32)  # three images' tokens [K, m, d]
>>> reranker.predict([("a red circle", images[0]), ("a blue square", images[1])]).shape
(2,)
>>> hits = reranker.rank("a red circle", images, top_k=2)  # best first
>>> len(hits), sorted(hits[0]), bool(hits[0]["score"] >= hits[1]["score"])
(2, ['corpus_id', 'score'], True)

```
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from edje import image_tokens
from edje._utils import progress
from edje.fusion import fusion_weights
from edje.ranking import rank_logits
from edje.rerank_batches import Batch, chunks_of_equal_length, in_batches
from edje.rerank_inputs import (
    Documents,
    as_list,
    as_rows,
    check_batch_size,
    check_caption,
    first_stage_list,
    kept_candidates,
    one_of,
    reranker_precision,
    warn_ignored,
)
from edje.scoring.exact import FAST_DTYPE, ExactTopN, error_bound, scoring_dtype

__all__ = ["EDJEReranker"]

PIXEL_BATCH = 32  # images per vision-encoder forward when documents are pixels


class EDJEReranker:
    """Rerank images for a caption with EDJE, shaped like sentence-transformers' CrossEncoder.

    Args:
        model: an `EDJEModel`, or a folder / Hub id to load one (and its processor) from.
        store: a `TokenStore` or its path, where document ids are looked up. It must have been
            made by this model's vision encoder, preprocessing and adapter (or hold raw vision
            tokens, which are compressed on the fly); `force_store=True` only warns.
        device: where to score (default: CUDA if available, else CPU). The model is moved there.
        dtype: scoring dtype (default: float32, the model's own answer and the dtype the paper's
            authors evaluate in; `torch.bfloat16` is faster on GPUs and AMX CPUs but moves
            logits by about 1e-2, enough to swap close candidates). `precision` names it too.
        processor: the `EDJEProcessor` (required when `model` is a model object).
        force_store: use a store whose fingerprint differs from the model's.
        backend: `"fast"` (default), `"torch"` or `"onnx"` (see `edje.scoring`).
        precision: `"float32"` (default), `"bfloat16"`, `"float16"` or `"exact"`: `rank` and
            `rank_many` with a `top_k` score in bf16 and re-score in fp32 the candidates that
            could change the top k, whose order and scores are then fp32's (`predict` and
            `top_k=None` score in fp32). Exact mode needs the `"fast"` backend and an error
            bound: the model config's `score_error_bounds` (`edje calibrate`) or `error_bound`.
            `rank` / `rank_many` take `precision=` per call too (other than the default: the
            `"fast"` backend only).
        error_bound: exact mode's bound on |bf16 logit - fp32 logit|, instead of the config's.
    """

    def __init__(
        self,
        model: Any,
        store: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        processor: Any = None,
        force_store: bool = False,
        *,
        backend: str = "fast",
        precision: str | None = None,
        error_bound: float | None = None,
    ):
        from edje.modeling_edje import EDJEModel
        from edje.processing_edje import EDJEProcessor
        from edje.scoring import make_scorer
        from edje.store import TokenStore

        if isinstance(model, str | os.PathLike):
            source = model
            model = EDJEModel.from_pretrained(source)
            processor = processor or EDJEProcessor.from_pretrained(source)
        if processor is None:
            raise ValueError(
                "EDJEReranker: an EDJEModel object needs its processor: "
                "EDJEReranker(model, processor=EDJEProcessor...), or pass a model folder."
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = reranker_precision(dtype, precision)
        self.dtype = scoring_dtype(self.precision)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.token_shape = tuple(model.config.image_token_shape)  # (m, d)
        if isinstance(store, str | os.PathLike):
            store = TokenStore.open(store)
        if store is not None:
            model.check_store(store, force=force_store)
        self.store = store
        self.scorer = make_scorer(model, processor, backend, dtype=self.dtype, device=self.device)
        self.backend, self._scorers = backend, {self.dtype: self.scorer}
        self._error_bound, self._exact = error_bound, None
        if self.precision == "exact":
            self._exact_mode()  # no bound or another backend: an error now, not at the first rank

    # -- CrossEncoder API ----------------------------------------------------------------------

    def predict(
        self,
        pairs: Sequence[tuple[str, Any]] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        apply_softmax: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        *,
        inputs: Sequence[tuple[str, Any]] | None = None,
        sentences: Sequence[tuple[str, Any]] | None = None,
        precision: str | None = None,
    ) -> np.ndarray | torch.Tensor | list[float]:
        """Score `(caption, document)` pairs: sigmoid of EDJE's logits, in the order given.

        The arguments are sentence-transformers 5.x `CrossEncoder.predict`'s. `activation_fn=
        torch.nn.Identity()` returns the logits; `apply_softmax` changes nothing here (one logit
        a pair, as a one-label CrossEncoder). Pairs are sorted by caption (same caption
        together, similar lengths together) into batches of `batch_size`, and the original
        order is restored. A single pair `(caption, document)` gives a single score. Returns a
        float32 numpy array (default), a tensor (`convert_to_tensor=True`, on the reranker's
        device) or a list of floats (both False). `inputs=` and `sentences=` (older releases'
        name) are the same as `pairs`. `precision` overrides the reranker's for this call
        (`"exact"` scores every pair in fp32: all scores are wanted).
        """
        check_batch_size(batch_size, "predict")
        dtype = scoring_dtype(self._precision_of(precision))
        self._scorer_for(dtype)  # a dtype the backend cannot score in: an error before any work
        pairs = one_of(pairs, inputs, sentences)
        single = len(pairs) == 2 and isinstance(pairs[0], str)
        pairs = [pairs] if single else list(pairs)
        captions = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f"EDJEReranker.predict: pair {i} must be (caption, document).")
            captions.append(check_caption(pair[0], f"pair {i}"))
        documents = self._documents([pair[1] for pair in pairs])

        def logits_of(rows: list[int], scorer) -> torch.Tensor:
            return scorer.score_pairs([captions[r] for r in rows], documents.tokens(rows))

        # Same caption together, similar lengths together; `_logits` puts rows back in place.
        order = sorted(range(len(pairs)), key=lambda i: (len(captions[i]), captions[i]))
        batches = in_batches(order, batch_size, logits_of, dtype, in_place=True)
        with progress(len(pairs), show_progress_bar, "EDJE predict", "pair") as bar:
            logits = self._logits(batches, len(pairs), bar)
        scores = _converted((activation_fn or torch.sigmoid)(logits), convert_to_numpy,
                            convert_to_tensor)  # fmt: skip
        return scores[0] if single else scores

    def rank(
        self,
        query: Any,
        documents: Sequence[Any] | torch.Tensor,
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        first_stage_scores: Sequence[float] | torch.Tensor | None = None,
        precision: str | None = None,
        **ignored: Any,
    ) -> list[dict[str, Any]]:
        """Rank documents for one query, best first: sentence-transformers 6's `CrossEncoder.rank`.

        Args:
            query: a caption (str), or an image (a PIL image, `Path`, bytes, array,
                `{"image": ...}` or tokens `[m, d]`): image -> captions ranking.
            documents: images (any kind the class takes) for a caption, captions for an image.
            top_k: keep the best `top_k`.
            return_documents: add `"text"` (the document as given) to each entry.
            activation_fn: what `score` is of the logit (default: sigmoid).
            first_stage_scores: one per document; with fusion weights in the model's config,
                `score` is of the fused score (`edje.fusion`) and entries add `"edje_score"` and
                `"first_stage_score"`.
            precision: overrides the reranker's for this call (`"exact"`: see the class).
            **ignored: `apply_softmax`, `convert_to_numpy` and `convert_to_tensor` are accepted
                and ignored with a warning, as sentence-transformers 6 does.

        Returns:
            `[{"corpus_id": i, "score": s}, ...]`: `i` indexes `documents`, `s` is a Python float
            (`json.dumps` takes the result); store ids add `"image_id"`. Ties keep input order.
        """
        check_batch_size(batch_size, "rank")
        warn_ignored(ignored)
        precision = self._precision_of(precision)
        count, image_ids, logits_of = self._rank_inputs(query, documents)
        first = first_stage_list(first_stage_scores, count)  # checked before any scoring
        exact = _exact_wanted(precision, top_k, count)
        dtype = FAST_DTYPE if exact else scoring_dtype(precision)
        self._scorer_for(dtype)  # a dtype the backend cannot score in: an error, documents or not
        with progress(count, show_progress_bar, "EDJE rank", "document") as bar:
            logits = self._logits(in_batches(range(count), batch_size, logits_of, dtype), count,
                                  bar)  # fmt: skip
        if exact:

            def rescore(rows: list[torch.Tensor]) -> list[torch.Tensor]:
                again = in_batches(rows[0].tolist(), batch_size, logits_of, torch.float32)
                return [self._logits(again, rows[0].numel())]

            logits = self._exact_logits([logits], None if first is None else [first], rescore,
                                        top_k)[0]  # fmt: skip
        hits = []
        for i, hit in self._hits(logits, first, top_k, activation_fn or torch.sigmoid):
            hits.append({"corpus_id": i, **hit})
            if image_ids[i] is not None:
                hits[-1]["image_id"] = image_ids[i]
            if return_documents:
                hits[-1]["text"] = documents[i]
        return hits

    def rank_many(
        self,
        queries: Sequence[str],
        candidate_ids: Any,
        first_stage_scores: Any = None,
        top_k: int | None = None,
        ids: Sequence[str] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        precision: str | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Rerank a first stage's candidates for many captions at once: the second stage in one
        call.

        Args:
            queries: Q captions.
            candidate_ids: `[Q, K]` store ids (str), or integer positions as a FAISS search
                returns them (`VectorIndex.search(...)[1]`). Positions index `ids` (e.g.
                `VectorIndex.ids`), or the store's rows when `ids` is None. Negative positions
                (FAISS's "no result") are dropped.
            first_stage_scores: `[Q, K]` first-stage scores (`VectorIndex.search(...)[0]`):
                reported beside EDJE's, and fused with them when the model's config holds
                fusion weights (`edje.fusion`).
            top_k: keep the best `top_k` per query.
            ids: the image id of each position.
            precision: overrides the reranker's for this call (`"exact"`: see the class).

        Returns:
            Per query, entries best first: `{"corpus_id", "image_id", "score",
            "first_stage_rank", "first_stage_score"?, "edje_score"?}`. `corpus_id` is the
            position given (for str candidates, the column in the query's row, as `rank`'s
            index); `first_stage_rank` is the 0-based column. Ties keep the first stage's order.
        """
        check_batch_size(batch_size, "rank_many")
        precision = self._precision_of(precision)
        if self.store is None:
            raise ValueError("EDJEReranker.rank_many: candidates are image ids, but no store.")
        queries = [check_caption(q, f"query {i}") for i, q in enumerate(as_list(queries))]
        rows = as_rows(candidate_ids, len(queries), "candidate_ids")
        fs = None if first_stage_scores is None else as_rows(first_stage_scores, len(queries))
        id_of = ids if ids is not None else self.store.ids
        kept = [kept_candidates(row, id_of) for row in rows]  # (columns, image_ids, corpus)
        firsts = None if fs is None else [[fs[q][c] for c in k[0]] for q, k in enumerate(kept)]
        lengths = [len(k[1]) for k in kept]
        with progress(len(queries), show_progress_bar, "EDJE rank_many", "query") as bar:
            batches = self._query_batches(queries, kept, firsts, precision, top_k, batch_size)
            logits = self._logits(batches, sum(lengths), bar).split(lengths)
        results: list[list[dict[str, Any]]] = []
        for q, (columns, image_ids, corpus_ids) in enumerate(kept):
            hits = self._hits(logits[q], None if firsts is None else firsts[q], top_k)
            results.append([{"corpus_id": corpus_ids[i], "image_id": image_ids[i], **hit,
                             "first_stage_rank": columns[i]} for i, hit in hits])  # fmt: skip
        return results

    @property
    def exact_top_n(self) -> ExactTopN | None:
        """Exact mode's `ExactTopN` (its bound, counts and warn-once flag: one per reranker,
        shared by every door that ranks with it) when the reranker's precision is exact."""
        return self._exact_mode() if self.precision == "exact" else None

    @property
    def exact_counts(self) -> dict[str, int] | None:
        """Exact mode's running counts (queries, candidates, rescored, fallbacks; see
        `edje.scoring.exact.ExactTopN`), None before exact mode's first use."""
        return None if self._exact is None else dict(self._exact.counts)

    # -- internals -----------------------------------------------------------------------------

    def _hits(
        self,
        logits: torch.Tensor,
        first: list[float] | None,
        top_k: int | None,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
    ) -> list[tuple[int, dict[str, Any]]]:
        """`(candidate, entry)` best first: EDJE's logits, fused with the first stage's scores
        when both are known and the model's config holds fusion weights. Scores are Python
        floats of `activation` of the logits."""
        weights = fusion_weights(self.model.config) if first is not None else None
        ranked = rank_logits(logits, first, weights, top_k)
        scores = _converted(activation(ranked.scores), False, False)
        edje = _converted(activation(logits), False, False) if ranked.fused else None
        hits = []
        for i in ranked.order:
            hit: dict[str, Any] = {"score": scores[i]}
            if edje is not None:
                hit["edje_score"] = edje[i]
            if first is not None:
                hit["first_stage_score"] = float(first[i])
            hits.append((i, hit))
        return hits

    def _logits(self, batches: Iterable[Batch], count: int, bar=None) -> torch.Tensor:
        """The one scoring loop under `predict`, `rank` and `rank_many`: each batch's
        `score(scorer)`, with the scorer of its dtype, fills its `rows` of logits `[count]`
        (on the reranker's device) and moves `bar` on by its `done`."""
        logits = torch.zeros(count, device=self.device)
        for batch in batches:
            logits[batch.rows] = batch.score(self._scorer_for(batch.dtype)).to(self.device)
            if bar is not None:
                bar.update(batch.done)
        return logits

    def _rank_inputs(self, query: Any, documents: Any) -> tuple[int, list, Callable]:
        """`rank`'s query and documents resolved: (count, image ids, `logits_of(rows,
        scorer)`). A caption query scores one caption against the documents' tokens; an image
        query, the documents (captions) against its tokens."""
        if isinstance(query, str):
            caption, resolved = check_caption(query, "query"), self._documents(documents)

            def logits_of(rows: Sequence[int], scorer) -> torch.Tensor:
                return scorer.score(caption, resolved.tokens(rows))

            return len(resolved), resolved.image_ids, logits_of
        captions = [check_caption(c, f"document {i}") for i, c in enumerate(as_list(documents))]
        image = self._documents([query], names=["query"]).tokens([0])  # [1, m, d]

        def pairs_of(rows: Sequence[int], scorer) -> torch.Tensor:
            batch = [captions[r] for r in rows]
            return scorer.score_pairs(batch, image.expand(len(batch), -1, -1))

        return len(captions), [None] * len(captions), pairs_of

    def _query_batches(self, queries, kept, firsts, precision, top_k, batch_size):
        """`rank_many`'s batches: consecutive queries with as many candidates, about
        `batch_size` candidates a batch, each one `_score_queries` call (progress by query)."""
        start = 0
        for chunk in chunks_of_equal_length([k[1] for k in kept], batch_size):
            k = len(kept[chunk[0]][1])
            exact = _exact_wanted(precision, top_k, k)
            score = partial(
                self._score_queries, [queries[q] for q in chunk], [kept[q][1] for q in chunk],
                top_k if exact else None, None if firsts is None else [firsts[q] for q in chunk],
            )  # fmt: skip
            dtype = FAST_DTYPE if exact else scoring_dtype(precision)
            yield Batch(slice(start, start + k * len(chunk)), score, dtype, len(chunk))
            start += k * len(chunk)

    @torch.inference_mode()
    def _score_queries(
        self, queries: list[str], image_ids: list[list[str]], exact_top_k: int | None,
        firsts: list[list[float]] | None, scorer,
    ) -> torch.Tensor:  # fmt: skip
        """Flat logits `[Q * K]` of Q queries' K candidates each (one `score_queries` call;
        with `exact_top_k`, exact mode: then one fp32 `score_pairs` call for the candidates
        it re-scores)."""
        k = len(image_ids[0])
        if k == 0:
            return torch.zeros(0, device=self.device)
        tokens = self._from_store([i for row in image_ids for i in row])
        tokens = tokens.view(len(queries), k, *self.token_shape)
        logits = scorer.score_queries(queries, tokens).to(self.device)
        if exact_top_k is None:
            return logits.flatten()

        def rescore(rows: list[torch.Tensor]) -> list[torch.Tensor]:
            lengths = [r.numel() for r in rows]
            captions = [queries[q] for q, n in enumerate(lengths) for _ in range(n)]
            if not captions:
                return [torch.zeros(0, device=self.device) for _ in rows]
            picked = torch.cat([tokens[q, r.to(tokens.device)] for q, r in enumerate(rows)])
            batch = Batch(slice(None), lambda fp32: fp32.score_pairs(captions, picked),
                          torch.float32, 0)  # fmt: skip
            return list(self._logits([batch], len(captions)).split(lengths))

        return torch.cat(self._exact_logits(list(logits), firsts, rescore, exact_top_k))

    def _exact_logits(self, fast, firsts, rescore, top_k: int) -> list[torch.Tensor]:
        """`ExactTopN.logits` over fast logits, ranked by the fused score when the model's
        config holds fusion weights and first-stage scores are given."""
        weights = None if firsts is None else fusion_weights(self.model.config)
        return self._exact_mode().logits(fast, rescore, top_k, firsts, weights)

    def _scorer_for(self, dtype: torch.dtype):
        """The reranker's scorer in `dtype`, built at first use."""
        from edje.scoring import make_scorer

        if dtype not in self._scorers:
            if self.backend != "fast":
                raise ValueError(
                    f"EDJEReranker: scoring in {dtype} besides {self.dtype} needs "
                    f"backend='fast', got backend={self.backend!r}."
                )
            self._scorers[dtype] = make_scorer(
                self.model, self.processor, self.backend, dtype=dtype, device=self.device
            )
        return self._scorers[dtype]

    def _exact_mode(self) -> ExactTopN:
        """Exact mode's state (its bound, counts and warn-once flag), built at first use."""
        if self._exact is None:
            if self.backend != "fast":
                raise ValueError(
                    f"EDJEReranker(precision='exact') needs backend='fast', got {self.backend!r}."
                )
            bound = self._error_bound or error_bound(self.model.config)
            if bound is None:
                raise ValueError(
                    "EDJEReranker(precision='exact'): the model's config holds no bfloat16 error "
                    "bound (score_error_bounds); measure one with `edje calibrate --model DIR "
                    "--store STORE --captions FILE`, or pass error_bound=."
                )
            self._exact = ExactTopN(bound, FAST_DTYPE)
        return self._exact

    def _precision_of(self, precision: str | None) -> str:
        if precision is None:
            return self.precision
        scoring_dtype(precision)  # checks the name
        if precision == "exact":
            self._exact_mode()
        return precision

    def _from_store(self, image_ids: list[str]) -> torch.Tensor:
        return image_tokens.from_store(self.model, self.store, image_ids)

    def _documents(self, documents: Any, names: Sequence[str] = ()) -> Documents:
        return Documents(self, documents, names, pixel_batch=PIXEL_BATCH)


def _converted(scores: torch.Tensor, to_numpy: bool, to_tensor: bool):
    """Scores as CrossEncoder returns them: a tensor, a float32 numpy array or floats."""
    if to_tensor:
        return scores
    scores = scores.detach().float().cpu()
    return scores.numpy() if to_numpy else scores.tolist()


def _exact_wanted(precision: str, top_k: int | None, count: int) -> bool:
    """Exact mode pays only when fewer than all candidates are kept; else fp32 throughout."""
    return precision == "exact" and top_k is not None and 1 <= top_k < count
