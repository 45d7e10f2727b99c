"""ONNX export of EDJE's joint encoder + ITM head, and an onnxruntime scorer for the CPU path.

The exported graph takes the processor's pair inputs and stored image tokens and returns one
logit per pair:

    input_ids [B, L] int64, attention_mask [B, L] int64, token_type_ids [B, L] int64,
    image_tokens [B, m, d] float32  ->  logits [B] float32

with dynamic `B` and `L`. It is traced from `EDJEOnnxGraph`, a plain-torch restatement of
`EDJEModel.forward` on the same weights (word embeddings with the `<image>` slots replaced,
position + segment embeddings, LayerNorm, BERT layers with an additive padding mask, pooler,
head), because tracing transformers' BertModel freezes its mask construction to the example's
shapes. torch 2.13's default exporter (`dynamo=True`) needs `onnxscript`, which edje does not
depend on; the TorchScript exporter (`dynamo=False`) is used instead and needs only `onnx`.

`quantize="int8"` applies onnxruntime's dynamic quantisation (int8 weights of every MatMul,
activations quantised per call). Its error is not bounded a priori;
`tests/scoring/test_onnx_export.py` measures it on a fixed set of pairs (see `OnnxScorer`).

Example:

```python
>>> import tempfile, torch
>>> from edje import EDJEConfig, EDJEModel
>>> config = EDJEConfig(text_config={"hidden_size": 32, "num_hidden_layers": 2,
...     "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 200},
...     vision_hidden_size=32, vision_num_tokens=5, vision_num_heads=2, num_image_tokens=4,
...     adapter_mlp_size=64, image_token_id=199)
>>> model = EDJEModel(config).eval()
>>> path = export_onnx(model, tempfile.mkdtemp() + "/edje.onnx")
>>> scorer = OnnxScorer(path, num_threads=1)
>>> scorer.score([101, 7, 8, 102], torch.randn(6, 4, 32)).shape
torch.Size([6])

```
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edje._utils import atomic_write
from edje.processing_edje import append_image_slots
from edje.scoring.base import Scorer, as_caption_list

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "image_tokens")
QUANTIZE_MODES = (None, "int8")


class EDJEOnnxGraph(nn.Module):
    """`EDJEModel.forward` (image-token path) in export-friendly torch ops; shares its weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        bert, head = model.joint_encoder, model.itm_head
        weight = bert.embeddings.word_embeddings.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":  # leave the model be
            bert, head = copy.deepcopy(bert).float().cpu(), copy.deepcopy(head).float().cpu()
        self.bert, self.head = bert, head
        self.image_token_id = int(model.config.image_token_id)
        config = self.bert.config
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.num_heads

    def forward(self, input_ids, attention_mask, token_type_ids, image_tokens) -> torch.Tensor:
        emb = self.bert.embeddings
        batch, length = input_ids.shape
        slots = input_ids == self.image_token_id  # (B, L)
        slot_index = (slots.long().cumsum(1) - 1).clamp(min=0)  # (B, L): j-th slot -> token j
        d = image_tokens.shape[-1]
        placed = torch.gather(image_tokens, 1, slot_index.unsqueeze(-1).expand(-1, -1, d))
        words = emb.word_embeddings(input_ids)  # (B, L, d)
        x = torch.where(slots.unsqueeze(-1), placed.to(words.dtype), words)
        positions = torch.arange(length, device=input_ids.device)
        x = x + emb.token_type_embeddings(token_type_ids) + emb.position_embeddings(positions)
        x = emb.LayerNorm(x)
        # additive mask over keys: 0 for tokens, a large negative for padding; (B, 1, 1, L)
        bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min
        nh, hs = self.num_heads, self.head_size
        for layer in self.bert.encoder.layer:
            sa = layer.attention.self
            q, k, v = (
                lin(x).view(batch, length, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
                for lin in (sa.query, sa.key, sa.value)
            )
            scores = q @ k.transpose(-1, -2) * hs**-0.5 + bias  # (B, nh, L, L)
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)  # (B, L, d)
            x = layer.attention.output.LayerNorm(x + layer.attention.output.dense(ctx))
            h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(x + layer.output.dense(h))
        pooled = torch.tanh(self.bert.pooler.dense(x[:, 0]))  # (B, d)
        return self.head(pooled).squeeze(-1)  # (B,)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    quantize: str | None = None,
) -> Path:
    """Export the joint encoder + head of an `EDJEModel` to `path` (fp32, or int8 weights).

    The file appears atomically: it is written under a temporary name in the same folder and
    renamed into place, so `path` is either absent, the previous file, or the complete new one.

    Returns:
        `path`.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"export_onnx: quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    if model.config.image_token_id is None:
        raise ValueError("export_onnx: model.config.image_token_id is None; nothing marks slots.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = EDJEOnnxGraph(model)
    was_training = [module.training for module in graph.modules()]
    graph.eval()  # shares the model's fp32 CPU modules: their train flags are restored below
    m, d = model.config.image_token_shape
    example = _example_inputs(graph.image_token_id, m, d)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES[:3]}
    dynamic["image_tokens"] = {0: "batch"}
    dynamic["logits"] = {0: "batch"}
    try:
        if quantize == "int8":  # the fp32 graph is only a step: a scratch folder beside `path`
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
                fp32 = Path(tmp) / "model.onnx"
                _export_fp32(graph, example, dynamic, opset, fp32)
                atomic_write(path, lambda temp: _quantize_int8(fp32, temp))
        else:
            atomic_write(path, lambda temp: _export_fp32(graph, example, dynamic, opset, temp))
    finally:
        for module, training in zip(graph.modules(), was_training, strict=True):
            module.train(training)
    return path


def _export_fp32(graph: EDJEOnnxGraph, example, dynamic: dict, opset: int, out) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(
            graph,
            example,
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    _add_metadata(Path(out), {"edje_image_token_id": graph.image_token_id})


def _quantize_int8(fp32: Path, out) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)


def _add_metadata(path: Path, values: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, str(path))


def _example_inputs(image_token_id: int, m: int, d: int) -> tuple[torch.Tensor, ...]:
    batch, caption = 2, 5
    length = caption + m + 1
    input_ids = torch.full((batch, length), 1000 % max(image_token_id, 2))
    input_ids[:, caption : caption + m] = image_token_id
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, -2:] = 0
    token_type_ids = torch.zeros(batch, length, dtype=torch.long)
    token_type_ids[:, caption:] = 1
    return input_ids, attention_mask, token_type_ids, torch.randn(batch, m, d)


class OnnxScorer(Scorer):
    """Score pairs with an exported EDJE graph in onnxruntime (CPU), the `Scorer` interface.

    Args:
        path: a file written by `export_onnx` (or use `OnnxScorer.from_model`).
        processor: an `EDJEProcessor` for caption strings (else captions are token-id lists
            `[CLS] ... [SEP]`).
        num_threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        image_token_id, sep_token_id: ids of `<image>` and `[SEP]` when no processor is given
            (defaults: the `<image>` id `export_onnx` stores in the file's metadata, and 102,
            BERT's `[SEP]`).

    Rows are grouped by sequence length and each group runs unpadded (one session call per
    length), so no compute goes to padding. The int8 error is measured, not bounded: see
    `tests/scoring/test_onnx_export.py`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        processor=None,
        *,
        num_threads: int | None = None,
        image_token_id: int | None = None,
        sep_token_id: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        shape = self.session.get_inputs()[3].shape  # ["batch", m, d]
        self.num_image_tokens, self.hidden_size = int(shape[1]), int(shape[2])
        self.processor = processor
        if image_token_id is None and processor is not None:
            image_token_id = processor.image_token_id
        if image_token_id is None:  # written by export_onnx
            meta = self.session.get_modelmeta().custom_metadata_map
            image_token_id = (
                int(meta["edje_image_token_id"]) if meta.get("edje_image_token_id") else None
            )
        self.image_token_id = image_token_id
        if sep_token_id is None:
            sep_token_id = getattr(getattr(processor, "tokenizer", None), "sep_token_id", None)
        self.sep_token_id = 102 if sep_token_id is None else int(sep_token_id)

    @classmethod
    def from_model(cls, model: nn.Module, processor=None, *, quantize: str | None = None, **kwargs):
        """Export `model` to a temporary file and score with it (the file goes once loaded)."""
        with tempfile.TemporaryDirectory(prefix="edje-onnx-") as folder:
            path = export_onnx(model, Path(folder) / "edje.onnx", quantize=quantize)
            return cls(path, processor, **kwargs)

    def score_pairs(self, captions, image_tokens: torch.Tensor) -> torch.Tensor:
        """`captions[i]` with `image_tokens[i]` (`[N, m, d]`) -> logits `[N]` (float32, CPU)."""
        self.check_tokens("score_pairs", image_tokens, "[N, m, d]", 3)
        captions = as_caption_list(captions, "OnnxScorer")
        self.check_pair_count(captions, image_tokens)
        if not captions:
            return torch.zeros(0)
        feeds = {k: v.contiguous().numpy() for k, v in self._pair_inputs(captions).items()}
        tokens = image_tokens.detach().float().cpu().contiguous().numpy()
        # No compute on padding: one session call per sequence length, each cut to its length.
        lengths = feeds["attention_mask"].sum(1)  # (N,)
        out = np.empty(len(captions), dtype=np.float32)
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            part = {k: np.ascontiguousarray(v[rows, :length]) for k, v in feeds.items()}
            part["image_tokens"] = tokens[rows]
            out[rows] = self.session.run(["logits"], part)[0]
        return torch.from_numpy(out)

    def _pair_inputs(self, captions: list) -> dict[str, torch.Tensor]:
        """The processor's pair layout, from strings or token-id captions."""
        if all(isinstance(c, str) for c in captions):
            if self.processor is None:
                raise ValueError("OnnxScorer: caption strings need a processor.")
            unique = list(dict.fromkeys(captions))  # one caption vs K images: tokenized once
            return self.processor.tokenize_pairs(
                unique if len(unique) == 1 else captions, len(captions)
            )
        if self.image_token_id is None:
            raise ValueError("OnnxScorer: token-id captions need image_token_id (or a processor).")
        width = max(len(c) for c in captions)
        ids = torch.zeros(len(captions), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, caption in enumerate(captions):
            ids[row, : len(caption)] = torch.tensor(list(caption))
            mask[row, : len(caption)] = 1
        return append_image_slots(
            ids,
            mask,
            image_token_id=self.image_token_id,
            sep_token_id=self.sep_token_id,
            pad_token_id=0,
            num_image_tokens=self.num_image_tokens,
        )


__all__ = ["EDJEOnnxGraph", "OnnxScorer", "export_onnx"]
