"""Frozen backbone features the offline first stage trains its heads on.

- images: the vision tower's first `last_hidden_state` token (DINOv2's CLS), `[N, d_vis]`;
- texts: the text encoder's `last_hidden_state` averaged over real tokens (sentence-
  transformers' mean pooling), `[N, d_text]`.

Both run without gradients in batches, with an optional tqdm bar.

Example:
    >>> from PIL import Image
    >>> from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
    >>> from edje.first_stage.features import FrozenBackbones
    >>> backbones = FrozenBackbones(OFFLINE_VISION, OFFLINE_TEXT, image_size=112)
    >>> backbones.image_features([Image.new("RGB", (112, 112))]).shape
    torch.Size([1, 384])
    >>> backbones.text_features(["a red circle", "a blue square"]).shape
    torch.Size([2, 384])
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch

from edje._utils import batches, load_rgb, progress
from edje.modeling_edje import forward_features

__all__ = ["DatasetImages", "FrozenBackbones", "mean_pool"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average `hidden [B, L, d]` over the positions where `attention_mask [B, L]` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class FrozenBackbones:
    """A vision and a text encoder by name (offline name, Hub id or folder), loaded on first use.

    Args:
        vision: vision encoder for `edje.backbones.load_vision_encoder`.
        text: text encoder for `edje.backbones.load_text_encoder`.
        image_size: the vision processor's output side (`None`: the model's own).
        max_length: caption tokens kept (truncated beyond).
        device: where the encoders run.
    """

    def __init__(
        self,
        vision: str,
        text: str,
        image_size: int | None = None,
        max_length: int = 64,
        device: str | torch.device = "cpu",
    ):
        self.vision_name, self.text_name = str(vision), str(text)
        self.image_size, self.max_length = image_size, max_length
        self.device = torch.device(device)

    @cached_property
    def vision(self) -> tuple[torch.nn.Module, Any]:
        from edje.backbones import load_vision_encoder

        model, processor = load_vision_encoder(self.vision_name, image_size=self.image_size)
        return model.to(self.device), processor

    @cached_property
    def text(self) -> tuple[torch.nn.Module, Any]:
        from edje.backbones import load_text_encoder

        model, tokenizer = load_text_encoder(self.text_name)
        return model.eval().requires_grad_(False).to(self.device), tokenizer

    def to(self, device: str | torch.device) -> FrozenBackbones:
        """Move the encoders (loaded or not yet) to `device`."""
        self.device = torch.device(device)
        for name in ("vision", "text"):
            if name in self.__dict__:
                self.__dict__[name][0].to(self.device)
        return self

    @torch.inference_mode()
    def vision_tokens(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> the vision tower's `last_hidden_state` `[N, n, d_vis]`."""
        model, processor = self.vision
        rgb = [load_rgb(image) for image in images]  # the one decoder: EXIF, transparency
        pixels = processor(images=rgb, return_tensors="pt")["pixel_values"]
        return forward_features(model, {"pixel_values": pixels})

    @torch.inference_mode()
    def image_features(
        self, images: Sequence[Any], batch_size: int = 64, show_progress_bar: bool | None = None
    ) -> torch.Tensor:
        """PIL images -> first (CLS) token `[N, d_vis]` float32 on the CPU."""
        out = []
        with progress(len(images), show_progress_bar, "image features", "img") as bar:
            for chunk in batches(images, batch_size):
                out.append(self.vision_tokens(chunk)[:, 0].float().cpu())
                bar.update(len(chunk))
        return torch.cat(out) if out else torch.empty(0, self.vision[0].config.hidden_size)

    @torch.inference_mode()
    def text_features(
        self, texts: Sequence[str], batch_size: int = 256, show_progress_bar: bool | None = None
    ) -> torch.Tensor:
        """Texts -> mean-pooled last hidden state `[N, d_text]` float32 on the CPU."""
        model, tokenizer = self.text
        out = []
        with progress(len(texts), show_progress_bar, "text features", "text") as bar:
            for chunk in batches(list(texts), batch_size):
                batch = tokenizer(
                    chunk,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = model(**batch).last_hidden_state
                out.append(mean_pool(hidden, batch["attention_mask"]).float().cpu())
                bar.update(len(chunk))
        return torch.cat(out) if out else torch.empty(0, model.config.hidden_size)


class DatasetImages(Sequence):
    """The `image` column of a `datasets.Dataset` read lazily: a slice decodes only its rows,
    so a 100k-image data set is never decoded into memory at once.

    Example:
        >>> from edje.data import make_builtin_dataset
        >>> ds = make_builtin_dataset(n_train_triplets=1, n_train_single=0, n_val_triplets=0,
        ...                           n_test_triplets=1)["test"]
        >>> images = DatasetImages(ds)
        >>> len(images), images[1].size, len(images[0:2])
        (3, (112, 112), 2)
    """

    def __init__(self, dataset: Any, column: str = "image"):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(self.dataset[index][self.column])
        return self.dataset[int(index)][self.column]
