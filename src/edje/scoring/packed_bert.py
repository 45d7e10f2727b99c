"""A BERT forward over packed, padding-free sequences, reading a transformers BertModel's weights.

Sequences are packed end to end into one `(T, d)` tensor, grouped into *buckets* of equal length
`L`, each bucket contiguous (`B` sequences x `L` tokens). Every Linear, LayerNorm and activation
runs once over all `T` real tokens; only attention looks at the layout:

- `"sdpa"`: per bucket, a dense `(B, nh, L, hs)` `scaled_dot_product_attention` with no mask (no
  padding exists inside a bucket). Exact on CPU and the flash kernel on CUDA.
- `"varlen"`: one `torch.nn.attention.varlen.varlen_attn` call over the whole packed tensor with
  cumulative sequence offsets (CUDA, fp16/bf16 only).

The last layer computes only what the pooler reads: keys and values for every token but the
query, the output projection and the MLP for each sequence's `[CLS]` row alone.

Reduced precision (`dtype` bfloat16 or float16) is mixed, as `torch.autocast` does it: the Linear
layers and attention run in `dtype` (their inputs rounded to it, fp32 accumulation inside the
kernels), while the embeddings, the residual stream, every LayerNorm, the pooler and the head stay
in float32. Measured on CPU (2 Xeon cores, AMX) against fp32 (`|bf16 - fp32|` logit):

| bf16 path | quickstart, 8,952 pairs: max / p99 | paper size, random: max | speed |
|---|---|---|---|
| all bf16 (weights, activations, residual, LayerNorm, head) | 0.43 / 0.033 | 0.028 | 1x |
| + pooler and head in fp32 | 0.42 / 0.011 | | 1x |
| + embeddings, residual stream, LayerNorm in fp32 (this one) | 0.074 / 0.006 | 0.011 | 0.9x |
| + GELU in fp32 | 0.074 / 0.006 | | 0.6x |
| + attention in fp32 | 0.13 / 0.006 | | 0.75x |
| fp32 weights rounded to bf16, fp32 compute (diagnostic) | 0.064 / 0.005 | 0.019 | |

All-bf16 rounds the logit itself to 8 bits (0.03 apart at |logit| 4-8, the top of a ranking) and
each residual add and LayerNorm output to bf16; keeping those in fp32 leaves the error of the
matmuls' bf16 inputs and weights (the rounded weights alone account for most of what is left),
for one more elementwise pass over `(T, d)` per sublayer (the cast to bf16) and fp32 adds and
LayerNorms: about 10% of all-bf16's speed at paper size on 2 busy cores; the same elementwise
work fused into the GEMMs' epilogues (`torch.compile`) would win it back.

Example (a tiny random BertModel; `[CLS]`-pooled logits of two buckets, lengths 3 and 5):

```python
>>> import torch
>>> from transformers import BertConfig, BertModel
>>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
...     intermediate_size=64, vocab_size=50)).eval()
>>> encoder = PackedBert(bert, torch.nn.Linear(32, 1))
>>> x = torch.randn(2 * 3 + 1 * 5, 32)  # (T, d): 2 sequences of 3 tokens, 1 of 5
>>> encoder.encode(x, ((2, 3), (1, 5))).shape
torch.Size([3])

```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edje.scoring.fp8 import Fp8Linear

try:  # torch >= 2.10 on CUDA: flash attention over variable-length packed sequences
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

Buckets = tuple[tuple[int, int], ...]  # ((B, L), ...): B sequences of L tokens, packed in order
ATTENTION_BACKENDS = ("sdpa", "varlen")


class _Linear:
    """`x @ W.T + b` on tensors shared with the source module (no copy when dtypes agree)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class _Layer:
    qkv: _Linear | Fp8Linear  # (d -> 3d), [q; k; v] rows
    q: _Linear  # the q rows of qkv, for the last layer's [CLS] queries
    kv: _Linear | Fp8Linear  # the k and v rows of qkv
    out: _Linear | Fp8Linear
    norm1: tuple[torch.Tensor, torch.Tensor, float]
    up: _Linear | Fp8Linear
    down: _Linear | Fp8Linear
    norm2: tuple[torch.Tensor, torch.Tensor, float]
    act: nn.Module


class PackedBert:
    """The encoder, pooler and a `Linear(d, 1)` head of a BertModel, for packed input.

    Args:
        bert: a transformers `BertModel` with absolute positions and a pooler, in eval mode.
        head: the `Linear(d, 1)` read on the pooled `[CLS]`.
        dtype, device: where to run; weights are referenced, not copied, when they already match
            (the fused QKV weight is always a new tensor, built once).
        fp8: run the big Linear layers (QKV, output, MLP) in e4m3 via `Fp8Linear`.
    """

    def __init__(
        self,
        bert: nn.Module,
        head: nn.Linear,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        fp8: bool = False,
    ):
        config = bert.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                "PackedBert supports absolute position embeddings only, got "
                f"{config.position_embedding_type!r}."
            )
        if bert.pooler is None:
            raise ValueError("PackedBert needs a BertModel built with add_pooling_layer=True.")
        ref = bert.embeddings.word_embeddings.weight
        self.dtype = dtype or ref.dtype  # the Linear layers' and attention's dtype
        # embeddings, residual stream, LayerNorm, pooler, head: fp32 at least (module docstring)
        self.stream_dtype = torch.promote_types(self.dtype, torch.float32)
        self.device = torch.device(device) if device is not None else ref.device
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_size = self.hidden_size // self.num_heads
        self.fp8 = fp8

        s = self._stream
        emb = bert.embeddings
        self.word = s(emb.word_embeddings.weight)  # (V, d)
        self.position = s(emb.position_embeddings.weight)  # (P, d)
        self.segment = s(emb.token_type_embeddings.weight)  # (S, d)
        self.embed_norm = self._norm_params(emb.LayerNorm)
        self.max_positions = self.position.shape[0]
        self.layers: list[_Layer] = [self._layer(layer) for layer in bert.encoder.layer]
        self.pooler = _Linear(s(bert.pooler.dense.weight), s(bert.pooler.dense.bias))
        self.head = _Linear(s(head.weight), s(head.bias))

    # -- weights, referenced in the run dtype and device ---------------------------------------

    def _tensor(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.detach().to(self.device, self.dtype)

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> _Linear | Fp8Linear:
        if self.fp8:
            return Fp8Linear(self._tensor(weight), self._tensor(bias), out_dtype=self.dtype)
        return _Linear(self._tensor(weight), self._tensor(bias))

    def _stream(self, p: torch.Tensor | None) -> torch.Tensor | None:
        """Kept in the residual stream's dtype (embeddings, LayerNorm, pooler, head)."""
        return None if p is None else p.detach().to(self.device, self.stream_dtype)

    def _norm_params(self, module: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self._stream(module.weight), self._stream(module.bias), module.eps

    def _layer(self, layer: nn.Module) -> _Layer:
        """One BertLayer's weights, with Q, K and V fused into one `(3d, d)` projection."""
        t, lin, attn = self._tensor, self._linear, layer.attention
        sa = attn.self
        w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]).detach()  # (3d, d)
        b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]).detach()  # (3d,)
        d = self.hidden_size
        qkv = lin(w, b)
        if isinstance(qkv, _Linear):  # q and kv share the fused tensor's rows: no copy
            q, kv = _Linear(qkv.weight[:d], qkv.bias[:d]), _Linear(qkv.weight[d:], qkv.bias[d:])
        else:
            q, kv = _Linear(t(w[:d]), t(b[:d])), lin(w[d:], b[d:])
        return _Layer(
            qkv=qkv,
            q=q,
            kv=kv,
            out=lin(attn.output.dense.weight, attn.output.dense.bias),
            norm1=self._norm_params(attn.output.LayerNorm),
            up=lin(layer.intermediate.dense.weight, layer.intermediate.dense.bias),
            down=lin(layer.output.dense.weight, layer.output.dense.bias),
            norm2=self._norm_params(layer.output.LayerNorm),
            act=layer.intermediate.intermediate_act_fn,
        )

    # -- embeddings ----------------------------------------------------------------------------

    def embed_bucket(
        self,
        caption_ids: torch.Tensor,
        caption_of_row: torch.Tensor | None,
        image_tokens: torch.Tensor,
        sep_id: int,
    ) -> torch.Tensor:
        """Embed one bucket of pairs `[CLS] caption [SEP] <image tokens> [SEP]`, LayerNorm-ed.

        The caption part (and its LayerNorm) is computed once per caption, not once per pair.

        Args:
            caption_ids: `(Qb, n)` token ids of the bucket's captions (`[CLS] ... [SEP]`).
            caption_of_row: `(B,)` which caption each row reads; `None` when `Qb == 1`.
            image_tokens: `(B, m, d)`.
            sep_id: the final `[SEP]` token id.

        Returns:
            The bucket's `(B * L, d)` packed embeddings, `L = n + m + 1`.
        """
        n, (rows, m, d) = caption_ids.shape[1], image_tokens.shape
        pos, seg = self.position, self.segment
        w, b, eps = self.embed_norm
        caption = self.word[caption_ids] + pos[:n] + seg[0]  # (Qb, n, d)
        caption = F.layer_norm(caption, (d,), w, b, eps)
        # (B, n, d): one caption broadcast, or each row's caption gathered
        caption = caption.expand(rows, n, d) if caption_of_row is None else caption[caption_of_row]
        image = image_tokens.to(self.stream_dtype) + (pos[n : n + m] + seg[1])  # (B, m, d)
        image = F.layer_norm(image, (d,), w, b, eps)
        sep = F.layer_norm(self.word[sep_id] + pos[n + m] + seg[1], (d,), w, b, eps)  # (d,)
        x = torch.cat([caption, image, sep.expand(rows, 1, d)], dim=1)  # (B, L, d)
        return x.reshape(rows * (n + m + 1), d)

    # -- encoder -------------------------------------------------------------------------------

    def encode(
        self,
        x: torch.Tensor,
        buckets: Buckets,
        attention: str = "sdpa",
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed embeddings `(T, d)` -> one logit per sequence `(N,)`, in packing order.

        `cu_seqlens` (`(N + 1,)` int32 offsets on the device) is used by `"varlen"` and built
        from `buckets` when not given.
        """
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"PackedBert: attention must be one of {ATTENTION_BACKENDS}, got {attention!r}."
            )
        starts = _sequence_starts(buckets, x.device)  # (N,) row of each [CLS]
        if attention == "varlen" and cu_seqlens is None:
            cu_seqlens = torch.cat([starts, starts.new_tensor([x.shape[0]])]).to(torch.int32)
        max_len = max([length for _, length in buckets] or [0])
        last = len(self.layers) - 1
        low = self.dtype  # x: the residual stream, in stream_dtype; x.to(low): a matmul's input
        for index, layer in enumerate(self.layers):
            if index < last:
                qkv = layer.qkv(x.to(low))  # (T, 3d)
                if attention == "sdpa":
                    ctx = self._attend_buckets(qkv, buckets)  # (T, d)
                else:
                    ctx = self._attend_varlen(qkv, cu_seqlens, max_len)
                x = self._norm(x + layer.out(ctx).to(x.dtype), layer.norm1)
                x = self._norm(x + self._mlp(layer, x.to(low)).to(x.dtype), layer.norm2)
            else:  # only the [CLS] rows go on to the pooler
                cls = x[starts]  # (N, d)
                q, kv = layer.q(cls.to(low)), layer.kv(x.to(low))  # (N, d), (T, 2d)
                if attention == "sdpa":
                    ctx = self._attend_cls_buckets(q, kv, buckets)  # (N, d)
                else:
                    ctx = self._attend_cls_varlen(q, kv, cu_seqlens, max_len)
                x = self._norm(cls + layer.out(ctx).to(cls.dtype), layer.norm1)
                x = self._norm(x + self._mlp(layer, x.to(low)).to(x.dtype), layer.norm2)
        if not self.layers:
            x = x[starts]
        pooled = torch.tanh(self.pooler(x.to(self.stream_dtype)))  # (N, d)
        return self.head(pooled).reshape(-1)  # (N,)

    @staticmethod
    def _mlp(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        return layer.down(layer.act(layer.up(x)))

    def _norm(self, x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor, float]):
        weight, bias, eps = params
        return F.layer_norm(x.to(self.stream_dtype), (self.hidden_size,), weight, bias, eps)

    def _attend_buckets(self, qkv: torch.Tensor, buckets: Buckets) -> torch.Tensor:
        nh, hs, d = self.num_heads, self.head_size, self.hidden_size
        outs, offset = [], 0
        for rows, length in buckets:
            chunk = qkv[offset : offset + rows * length]  # (B * L, 3d)
            chunk = chunk.view(rows, length, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hs)
            ctx = F.scaled_dot_product_attention(chunk[0], chunk[1], chunk[2])  # (B, nh, L, hs)
            outs.append(ctx.transpose(1, 2).reshape(rows * length, d))
            offset += rows * length
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # (T, d)

    def _attend_cls_buckets(self, q: torch.Tensor, kv: torch.Tensor, buckets: Buckets):
        nh, hs, d = self.num_heads, self.head_size, self.hidden_size
        outs, offset, seq = [], 0, 0
        for rows, length in buckets:
            qb = q[seq : seq + rows].view(rows, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
            chunk = kv[offset : offset + rows * length]  # (B * L, 2d)
            chunk = chunk.view(rows, length, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (2, B, nh, L, hs)
            ctx = F.scaled_dot_product_attention(qb, chunk[0], chunk[1])  # (B, nh, 1, hs)
            outs.append(ctx.reshape(rows, d))
            offset, seq = offset + rows * length, seq + rows
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, d)

    def _attend_varlen(self, qkv: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        if varlen_attn is None:  # pragma: no cover - older torch
            raise RuntimeError("PackedBert: this torch has no torch.nn.attention.varlen.")
        nh, hs = self.num_heads, self.head_size
        q, k, v = qkv.view(-1, 3, nh, hs).unbind(1)  # (T, nh, hs) each
        ctx = varlen_attn(q, k, v, cu, cu, max_len, max_len)  # (T, nh, hs)
        return ctx.reshape(-1, self.hidden_size)

    def _attend_cls_varlen(self, q, kv, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        if varlen_attn is None:  # pragma: no cover - older torch
            raise RuntimeError("PackedBert: this torch has no torch.nn.attention.varlen.")
        nh, hs = self.num_heads, self.head_size
        k, v = kv.view(-1, 2, nh, hs).unbind(1)  # (T, nh, hs)
        cu_q = torch.arange(len(cu), device=cu.device, dtype=cu.dtype)  # one query per sequence
        ctx = varlen_attn(q.view(-1, nh, hs), k, v, cu_q, cu, 1, max_len)  # (N, nh, hs)
        return ctx.reshape(-1, self.hidden_size)


def _sequence_starts(buckets: Buckets, device: torch.device) -> torch.Tensor:
    """Row offset of each sequence's first token in the packed tensor, `(N,)` int64."""
    parts, offset = [], 0
    for rows, length in buckets:
        parts.append(torch.arange(rows, device=device) * length + offset)
        offset += rows * length
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


__all__ = ["ATTENTION_BACKENDS", "Buckets", "PackedBert"]
