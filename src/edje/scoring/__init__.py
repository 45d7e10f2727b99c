"""Scoring (caption, image tokens) pairs: one interface, three backends.

- `"torch"`: `TorchScorer`, `EDJEModel.forward` itself over padded batches (the reference);
- `"fast"`: `FastScorer`, the same weights without compute on padding (`PackedBert`), optional
  `torch.compile`, varlen attention and fp8 on CUDA;
- `"onnx"`: `OnnxScorer`, an exported graph in onnxruntime on the CPU (fp32 or int8).

All share `Scorer`'s `score` / `score_pairs` / `score_queries` and give the same ranking up to
float rounding (int8 aside). `make_scorer` builds one by name; the reranker, evaluation and the
service score through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from edje.scoring.base import Caption, Scorer, TorchScorer

__all__ = ["BACKENDS", "Caption", "Scorer", "TorchScorer", "make_scorer"]

BACKENDS = ("torch", "fast", "onnx")  # no torch import for this: `edje eval --help` lists them


def __getattr__(name: str):
    if name in ("Caption", "Scorer", "TorchScorer"):
        from edje.scoring import base

        return getattr(base, name)
    raise AttributeError(f"module 'edje.scoring' has no attribute {name!r}")


def make_scorer(
    model: Any,
    processor: Any,
    backend: str = "fast",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> Scorer:
    """The scorer `backend` names, over `model`'s weights; `options` go to its constructor
    (e.g. `compile=True` for "fast", `quantize="int8"` or `num_threads` for "onnx").

    Example:
        >>> make_scorer(None, None, backend="tensorrt")
        Traceback (most recent call last):
        ...
        ValueError: make_scorer: backend must be one of ('torch', 'fast', 'onnx'), got 'tensorrt'.
    """
    if backend not in BACKENDS:
        raise ValueError(f"make_scorer: backend must be one of {BACKENDS}, got {backend!r}.")
    import torch

    from edje.scoring.base import TorchScorer

    _check_caption_rule(model, processor)
    if backend == "torch":
        return TorchScorer(model, processor, dtype=dtype, device=device, **options)
    if backend == "fast":
        from edje.scoring.fast import FastScorer

        return FastScorer(model, processor, dtype=dtype, device=device, **options)
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"make_scorer: the onnx backend runs on the CPU, got device {device}.")
    from edje.scoring.onnx import OnnxScorer

    return OnnxScorer.from_model(model, processor, **options)


def _check_caption_rule(model: Any, processor: Any) -> None:
    """The model's config records how its captions are cleaned; a processor that cleans them
    otherwise would score other text than the first stage reads."""
    wanted = getattr(getattr(model, "config", None), "normalize_captions", None)
    given = getattr(processor, "normalize_captions", None)
    if wanted is not None and given is not None and wanted != given:
        raise ValueError(
            f"make_scorer: the model's config has normalize_captions={wanted} but its processor "
            f"normalize_captions={given}; load both from the same folder, or set the processor's "
            "to the model's."
        )
