"""FastScorer: EDJEModel's scores without compute on padding.

`EDJEModel.forward` pads every caption of a batch to the longest and runs transformers'
BertModel over the padded grid with a mask. FastScorer reads the same weights and runs
`edje.scoring.packed_bert.PackedBert` instead:

- a caption is tokenized once (and cached), its embedding row and LayerNorm computed once, then
  shared by its K candidates;
- all sequences of one caption have the same length `L = n + m + 1`, so one query x K
  candidates is a dense `(K, L)` batch with no padding; many queries are grouped into buckets of
  equal length (one dense batch each, or one packed `varlen_attn` call on CUDA);
- the last layer runs the MLP and output projection on the `[CLS]` rows only.

Scores equal `EDJEModel.forward(...).logits` up to float rounding (about 1e-6 in fp32).

Example:

```python
>>> import torch
>>> from edje import EDJEConfig, EDJEModel
>>> from edje.scoring.fast import FastScorer
>>> config = EDJEConfig(text_config={"hidden_size": 32, "num_hidden_layers": 2,
...     "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 200},
...     vision_hidden_size=32, vision_num_tokens=5, vision_num_heads=2, num_image_tokens=4,
...     adapter_mlp_size=64, image_token_id=199)
>>> model = EDJEModel(config).eval()
>>> scorer = FastScorer(model)  # no processor: captions are given as token ids
>>> scorer.score([101, 7, 8, 102], torch.randn(6, 4, 32)).shape  # one caption, 6 images
torch.Size([6])
>>> scorer.score_queries([[101, 7, 102], [101, 9, 9, 102]], torch.randn(2, 3, 4, 32)).shape
torch.Size([2, 3])

```

With an `EDJEProcessor` (`FastScorer(model, processor)`), captions are plain strings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from edje.scoring.base import Caption, Scorer, as_caption_list
from edje.scoring.fp8 import fp8_supported
from edje.scoring.packed_bert import PackedBert, varlen_attn

CACHE_SIZE = 65536  # tokenized captions kept


CPU_ROWS = 64  # pairs per CPU forward (see `cpu_rows`)


class FastScorer(Scorer):
    """Score (caption, image tokens) pairs with EDJEModel's weights, padding-free.

    Args:
        model: an `EDJEModel` (its joint encoder and ITM head are read, not copied, when `dtype`
            and `device` match the model's).
        processor: an `EDJEProcessor` (or anything with its `tokenizer` and
            `max_caption_length`), needed to score caption strings; without one, captions are
            lists of token ids `[CLS] ... [SEP]`.
        dtype: compute dtype of the Linear layers and attention (default: the model's);
            `torch.bfloat16` (AMX CPUs, GPUs) or `torch.float16` (GPUs). Embeddings, the residual
            stream, LayerNorm and the head stay in fp32 (`edje.scoring.packed_bert`: a quarter
            of all-bf16's worst logit error on the quickstart model at the same speed).
        device: where to run (default: the model's device).
        compile: `torch.compile` the per-bucket forward (`mode=compile_mode`, dynamic shapes so
            new caption lengths do not recompile; rows are padded to one of 8 sizes per power of
            two, so `"reduce-overhead"` records one CUDA graph per (caption length, rows) and
            replays it).
        compile_mode: passed to `torch.compile` (default `"reduce-overhead"` on CUDA,
            `"default"` elsewhere).
        attention: `"sdpa"` (dense attention per length bucket; exact, any device), `"varlen"`
            (one packed `varlen_attn` call; CUDA with fp16/bf16), or `"auto"` (varlen where it
            runs, else sdpa). Ignored with `compile=True`, which runs sdpa per bucket.
        fp8: run the QKV, output and MLP Linear layers in e4m3 (`torch._scaled_mm`); only on
            devices with compute capability >= 8.9, else a `ValueError`. Off by default.
        cpu_rows: the most pairs in one forward on a CPU (`None`: all of a call's). Larger
            forwards leave the caches: on 2 Xeon cores, 1,000 paper-size pairs in one bf16
            forward ran at 0.6x the pairs/s of forwards of 64 (128 and 256: 0.75x).

    Outputs are float32 logits `[N]` on `device`, one per pair, in the order given.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor=None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        attention: str = "auto",
        fp8: bool = False,
        cpu_rows: int | None = CPU_ROWS,
    ):
        if cpu_rows is not None and cpu_rows < 1:
            raise ValueError(f"FastScorer: cpu_rows must be a positive int or None, got {cpu_rows}")
        self.cpu_rows = cpu_rows
        config = model.config
        self.num_image_tokens, self.hidden_size = config.image_token_shape
        device = torch.device(device) if device is not None else model.device
        if fp8:
            ok, why = fp8_supported(device)
            if not ok:
                raise ValueError(f"FastScorer(fp8=True): {why}.")
        self.encoder = PackedBert(
            model.joint_encoder, model.itm_head, dtype=dtype, device=device, fp8=fp8
        )
        self.device, self.dtype = self.encoder.device, self.encoder.dtype
        self.attention = self._pick_attention(attention)
        self.processor = processor
        slots = getattr(processor, "num_image_tokens", self.num_image_tokens)
        if slots != self.num_image_tokens:
            raise ValueError(
                f"FastScorer: the processor lays out {slots} image slots but the model reads "
                f"{self.num_image_tokens} image tokens."
            )
        tokenizer = getattr(processor, "tokenizer", processor)
        # The closing [SEP] after the image slots: the tokenizer's, or (token-id captions without
        # a processor) the last id of the first caption scored, which is its own [SEP].
        sep = getattr(tokenizer, "sep_token_id", None)
        self.sep_id: int | None = None if sep is None else int(sep)
        self.max_caption_length = getattr(processor, "max_caption_length", None) or getattr(
            config, "max_caption_length", 64
        )
        self._ids_cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._compiled = None
        if compile:
            self._compiled = self._compile(compile_mode)

    # -- public API ----------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, caption: Caption, image_tokens: torch.Tensor) -> torch.Tensor:
        """One caption against K images: `image_tokens [K, m, d]` -> logits `[K]`."""
        self.check_tokens("score", image_tokens, "[K, m, d]", 3)
        ids = self._caption_ids([caption])[0]
        if image_tokens.shape[0] == 0:
            return torch.zeros(0, device=self.device)
        tokens = self._to_device(image_tokens)
        caption_ids = torch.tensor([ids], device=self.device)  # (1, n)
        return self._run([(caption_ids, None, tokens)]).float()

    @torch.inference_mode()
    def score_pairs(self, captions: Sequence[Caption], image_tokens: torch.Tensor) -> torch.Tensor:
        """Row-by-row pairs: `captions[i]` with `image_tokens[i]` (`[N, m, d]`) -> `[N]`."""
        self.check_tokens("score_pairs", image_tokens, "[N, m, d]", 3)
        captions = as_caption_list(captions, "FastScorer")
        self.check_pair_count(captions, image_tokens)
        if not captions:
            return torch.zeros(0, device=self.device)
        return self._score_rows(captions, list(range(len(captions))), image_tokens)

    @torch.inference_mode()
    def score_queries(
        self, captions: Sequence[Caption], candidate_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Q captions, each against its own K candidates `[Q, K, m, d]` -> logits `[Q, K]`."""
        captions, q, k = self.check_queries(captions, candidate_tokens)
        if q * k == 0:
            return torch.zeros(q, k, device=self.device)
        ids = self._caption_ids(captions)
        tokens = self._to_device(candidate_tokens)  # (Q, K, m, d)
        by_length: dict[int, list[int]] = {}
        for query, caption in enumerate(ids):
            by_length.setdefault(len(caption), []).append(query)
        jobs, order, arange_k = [], [], torch.arange(k, device=self.device)
        for n in sorted(by_length):
            queries = by_length[n]  # O(Q) Python per call, not O(Q * K)
            index = torch.tensor(queries, device=self.device)
            caption_ids = torch.tensor([ids[i] for i in queries], device=self.device)  # (Qb, n)
            of_row = None
            if len(queries) > 1:
                of_row = torch.arange(len(queries), device=self.device).repeat_interleave(k)
            jobs.append((caption_ids, of_row, tokens.index_select(0, index).flatten(0, 1)))
            order.append((index[:, None] * k + arange_k).flatten())  # (Qb * K,) rows
        logits = self._run(jobs).float()  # packing order
        out = torch.empty_like(logits)
        out[torch.cat(order)] = logits
        return out.view(q, k)

    # -- internals -----------------------------------------------------------------------------

    def _score_rows(
        self, captions: list[Caption], owner: list[int], image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Rows `r` pair `captions[owner[r]]` with `image_tokens[r]`; logits in row order."""
        ids = self._caption_ids(captions)
        unique: dict[tuple[int, ...], int] = {}
        caption_slot = [unique.setdefault(c, len(unique)) for c in ids]
        row_caption = [caption_slot[o] for o in owner]  # unique-caption index of each row
        groups: dict[int, list[int]] = {}  # caption length -> rows
        for row in range(len(row_caption)):
            groups.setdefault(len(ids[owner[row]]), []).append(row)
        tokens = self._to_device(image_tokens)
        keys = list(unique)
        jobs, order = [], []
        for n in sorted(groups):
            rows = groups[n]
            local: dict[int, int] = {}
            of_row = [local.setdefault(row_caption[r], len(local)) for r in rows]
            caption_ids = torch.tensor([keys[u] for u in local], device=self.device)  # (Qb, n)
            index = torch.tensor(rows, device=self.device)
            of_row_t = None if len(local) == 1 else torch.tensor(of_row, device=self.device)
            jobs.append((caption_ids, of_row_t, tokens.index_select(0, index)))
            order.extend(rows)
        logits = self._run(jobs).float()  # packing order
        out = torch.empty_like(logits)
        out[torch.tensor(order, device=self.device)] = logits
        return out

    def _run(self, jobs) -> torch.Tensor:
        """jobs: `[(caption_ids (Qb, n), caption_of_row (B,) | None, tokens (B, m, d)), ...]`."""
        if self._compiled is not None:
            return torch.cat([self._run_compiled(*job) for job in jobs])
        if self.device.type != "cpu" or self.cpu_rows is None:
            return self._forward(jobs)
        forwards = _forwards_of_at_most(jobs, self.cpu_rows)
        return torch.cat([self._forward(part) for part in forwards])

    def _forward(self, jobs) -> torch.Tensor:
        """One packed forward of the jobs' rows, in their order."""
        sep, m = self.sep_id, self.num_image_tokens
        x = [self.encoder.embed_bucket(c, r, t, sep) for c, r, t in jobs]
        buckets = tuple((t.shape[0], c.shape[1] + m + 1) for c, _, t in jobs)
        x = x[0] if len(x) == 1 else torch.cat(x)  # (T, d)
        return self.encoder.encode(x, buckets, self.attention)

    def _forward_bucket(self, caption_ids, caption_of_row, tokens) -> torch.Tensor:
        x = self.encoder.embed_bucket(caption_ids, caption_of_row, tokens, self.sep_id)
        length = caption_ids.shape[1] + self.num_image_tokens + 1
        return self.encoder.encode(x, ((tokens.shape[0], length),), "sdpa")

    def _run_compiled(self, caption_ids, caption_of_row, tokens) -> torch.Tensor:
        rows = tokens.shape[0]
        padded = _round_rows(rows)
        if caption_of_row is None:
            caption_of_row = torch.zeros(rows, dtype=torch.long, device=self.device)
        if padded != rows:
            tokens = torch.cat([tokens, tokens.new_zeros(padded - rows, *tokens.shape[1:])])
            caption_of_row = torch.cat([caption_of_row, caption_of_row.new_zeros(padded - rows)])
        caption_pad = 1 << max(caption_ids.shape[0] - 1, 0).bit_length()
        if caption_pad != caption_ids.shape[0]:
            extra = caption_ids[:1].expand(caption_pad - caption_ids.shape[0], -1)
            caption_ids = torch.cat([caption_ids, extra])
        out = self._compiled(caption_ids, caption_of_row, tokens)
        return out[:rows].clone()  # clone: CUDA-graph outputs are overwritten on the next replay

    def _compile(self, mode: str | None):
        import torch._dynamo

        # Symbolic shapes: one compile serves every caption length and row count (CUDA graphs are
        # still recorded per concrete shape); allow a few recompiles for specialisations.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        return torch.compile(self._forward_bucket, mode=mode, dynamic=True)

    def _pick_attention(self, attention: str) -> str:
        varlen_ok = (
            varlen_attn is not None
            and self.device.type == "cuda"
            and self.dtype in (torch.float16, torch.bfloat16)
        )
        if attention == "auto":
            return "varlen" if varlen_ok else "sdpa"
        if attention == "varlen" and not varlen_ok:
            raise ValueError(
                "FastScorer(attention='varlen') needs torch.nn.attention.varlen, a CUDA device "
                f"and fp16/bf16; got device {self.device}, dtype {self.dtype}."
            )
        if attention not in ("sdpa", "varlen"):
            raise ValueError(
                f"FastScorer: attention must be 'auto', 'sdpa' or 'varlen', got {attention!r}."
            )
        return attention

    def _caption_ids(self, captions: Sequence[Caption]) -> list[tuple[int, ...]]:
        out, todo = [], []
        for caption in captions:
            if isinstance(caption, str):
                ids = self._ids_cache.get(caption)
                if ids is None:
                    todo.append(caption)
                out.append(ids if ids is not None else caption)
            else:
                ids = tuple(int(i) for i in caption)
                if len(ids) < 2:
                    raise ValueError(
                        f"FastScorer: token-id captions need at least [CLS] and [SEP], got {ids}."
                    )
                if min(ids) < 0 or max(ids) >= self.encoder.word.shape[0]:
                    raise ValueError(
                        f"FastScorer: token ids must be in [0, {self.encoder.word.shape[0]}), "
                        f"got {ids}."
                    )
                out.append(ids)
        if todo:
            self._tokenize(list(dict.fromkeys(todo)))
            out = [self._ids_cache[c] if isinstance(c, str) else c for c in out]
        if self.sep_id is None:
            self.sep_id = out[0][-1]
        too_long = max(len(ids) for ids in out) + self.num_image_tokens + 1
        if too_long > self.encoder.max_positions:
            raise ValueError(
                f"FastScorer: a sequence of {too_long} tokens exceeds the joint encoder's "
                f"{self.encoder.max_positions} positions."
            )
        return out

    def _tokenize(self, captions: list[str]) -> None:
        if self.processor is None:
            raise ValueError(
                "FastScorer: caption strings need a processor: FastScorer(model, processor); "
                "or pass token ids [CLS] ... [SEP]."
            )
        for caption in captions:
            if not caption.strip():
                raise ValueError(f"FastScorer: caption {caption!r} is empty; expected text.")
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        prepare = getattr(self.processor, "prepare_captions", list)
        encoded = tokenizer(
            prepare(captions),
            truncation=True,
            max_length=self.max_caption_length,
            add_special_tokens=True,
        )["input_ids"]
        for caption, ids in zip(captions, encoded, strict=True):
            self._ids_cache[caption] = tuple(ids)
            self._ids_cache.move_to_end(caption)
        while len(self._ids_cache) > CACHE_SIZE:
            self._ids_cache.popitem(last=False)

    def _to_device(self, tokens: torch.Tensor) -> torch.Tensor:
        """Host -> device through pinned memory (non-blocking), then the embeddings' dtype (fp32
        under bf16/fp16 compute: stored float16 tokens are not rounded to bf16's 8 bits)."""
        if tokens.device != self.device:
            if self.device.type == "cuda" and tokens.device.type == "cpu":
                tokens = tokens.pin_memory()
            tokens = tokens.to(self.device, non_blocking=True)
        return tokens.to(self.encoder.stream_dtype)


def _forwards_of_at_most(jobs, rows: int) -> list[list]:
    """The jobs' rows, in order, as forwards of at most `rows` rows (a job longer than that is
    cut; consecutive short ones share a forward)."""
    forwards, current, count = [], [], 0
    for caption_ids, of_row, tokens in jobs:
        for start in range(0, tokens.shape[0], rows):
            part = slice(start, start + rows)
            piece = (caption_ids, None if of_row is None else of_row[part], tokens[part])
            if current and count + piece[2].shape[0] > rows:
                forwards.append(current)
                current, count = [], 0
            current.append(piece)
            count += piece[2].shape[0]
    return [*forwards, current] if current else forwards


def _round_rows(rows: int) -> int:
    """Rows padded up to one of 8 sizes per power of two (under 1/8 waste): few CUDA graphs."""
    step = 1 << max((rows - 1).bit_length() - 4, 0)
    return -(-rows // step) * step


__all__ = ["FastScorer"]
