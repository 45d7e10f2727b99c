"""CLIP, SigLIP and SigLIP2 as first stage, by Hub id or folder (transformers AutoModel).

Example (a tiny random CLIP saved to a folder; a real one: `"openai/clip-vit-base-patch16"`):
    >>> import tempfile
    >>> from transformers import CLIPConfig, CLIPModel
    >>> from edje.first_stage import TransformersEmbedding
    >>> folder = tempfile.mkdtemp()
    >>> config = CLIPConfig(
    ...     text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, vocab_size=99),
    ...     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                        num_attention_heads=2, image_size=28, patch_size=14),
    ...     projection_dim=8)
    >>> CLIPModel(config).save_pretrained(folder)  # plus a tokenizer and image processor
    >>> TransformersEmbedding(folder).embedding_dim  # doctest: +SKIP
    8
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from edje._utils import batches, load_rgb, progress
from edje.first_stage.base import EmbeddingModel

__all__ = ["TransformersEmbedding"]

SUPPORTED = ("clip", "siglip", "siglip2")


class TransformersEmbedding(EmbeddingModel):
    """A dual encoder from transformers: `get_text_features` / `get_image_features`.

    Args:
        name_or_path: a Hub id (e.g. `"google/siglip2-large-patch16-384"`) or a folder holding
            a CLIP, SigLIP or SigLIP2 model with its processor.
        device: where the model runs.
        dtype: the model's dtype (outputs are float32 either way).
        max_length: text tokens kept; SigLIP pads to it (as it was trained), the others pad to
            the batch's longest.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_length: int = 64,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoProcessor

        self.name_or_path = os.fspath(name_or_path)
        model_type = AutoConfig.from_pretrained(self.name_or_path).model_type
        if model_type not in SUPPORTED:
            raise ValueError(
                f"TransformersEmbedding: {self.name_or_path!r} is a {model_type!r} model; "
                f"expected one of {SUPPORTED}"
            )
        kwargs = {"dtype": dtype} if dtype is not None else {}
        self.model = AutoModel.from_pretrained(self.name_or_path, **kwargs).eval()
        self.model.requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(self.name_or_path)
        self.model_type, self.max_length = model_type, max_length
        config = self.model.config
        self.embedding_dim = int(
            getattr(config, "projection_dim", None) or config.text_config.hidden_size
        )
        if device is not None:
            self.to(device)

    @property
    def name(self) -> str:
        return self.name_or_path

    @torch.inference_mode()
    def embed_texts(
        self, texts: Sequence[str], batch_size: int = 256, show_progress_bar: bool | None = None
    ) -> torch.Tensor:
        padding = "max_length" if self.model_type.startswith("siglip") else True
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        out = []
        with progress(len(texts), show_progress_bar, "text embeddings", "text") as bar:
            for chunk in batches(list(texts), batch_size):
                inputs = tokenizer(
                    list(chunk),
                    padding=padding,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                inputs.pop("token_type_ids", None)
                out.append(_features(self.model.get_text_features(**inputs)).float())
                bar.update(len(chunk))
        return self._finish(out)

    @torch.inference_mode()
    def embed_images(
        self, images: Sequence[Any], batch_size: int = 64, show_progress_bar: bool | None = None
    ) -> torch.Tensor:
        image_processor = getattr(self.processor, "image_processor", self.processor)
        out = []
        with progress(len(images), show_progress_bar, "image embeddings", "img") as bar:
            for chunk in batches(images, batch_size):
                rgb = [load_rgb(image) for image in chunk]  # the one decoder
                inputs = image_processor(images=rgb, return_tensors="pt").to(self.device)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
                out.append(_features(self.model.get_image_features(**inputs)).float())
                bar.update(len(chunk))
        return self._finish(out)

    @torch.inference_mode()
    def embed_vision_tokens(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Raw `last_hidden_state` of this model's own vision tower -> image embeddings.

        CLIP: post-LayerNorm of the CLS token, then the visual projection. SigLIP: the
        attention-pooling head. SigLIP2 NaFlex needs its patch mask: not supported here.
        """
        vision = self.model.vision_model
        tokens = vision_tokens.to(self.device, self.model.dtype)
        if self.model_type == "clip":
            pooled = self.model.visual_projection(vision.post_layernorm(tokens[:, 0]))
        elif self.model_type == "siglip" and getattr(vision, "use_head", True):
            pooled = vision.head(tokens)
        else:
            return super().embed_vision_tokens(vision_tokens)
        return F.normalize(pooled.float(), dim=-1)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the model (safetensors) and its processor, for `TransformersEmbedding(folder)`."""
        self.model.save_pretrained(save_directory)
        self.processor.save_pretrained(save_directory)

    def _finish(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        if not chunks:
            return torch.empty(0, self.embedding_dim, device=self.device)
        return F.normalize(torch.cat(chunks), dim=-1)


def _features(output: Any) -> torch.Tensor:
    """`get_*_features` gives a tensor (transformers 4.x) or a ModelOutput (5.x)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"expected a tensor or an output with pooler_output, got {type(output)}")
    return pooled
