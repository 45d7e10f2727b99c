"""The offline first stage: two linear heads over frozen offline backbones, trained in seconds.

Image side: the vision encoder's CLS token (DINOv2-S at 112 px by default) -> Linear -> 256.
Text side: the text encoder's mean-pooled caption (all-MiniLM-L6-v2) -> Linear -> 256.
Both heads train with a symmetric InfoNCE loss on features computed once (`fit` takes cached
features; `fit_dataset` computes them from an edje-schema data set).

Example (a toy fit on random features; real use: `fit_dataset(ds["train"])`):
    >>> import torch
    >>> from edje.first_stage import LinearProbeEmbedding
    >>> probe = LinearProbeEmbedding(vision_dim=8, text_dim=8, embedding_dim=4)
    >>> g = torch.Generator().manual_seed(0)
    >>> images, texts = torch.randn(6, 8, generator=g), torch.randn(12, 8, generator=g)
    >>> losses = probe.fit(images, texts, torch.arange(6).repeat(2), epochs=3)
    >>> len(losses), probe.embed_image_features(images).shape
    (3, torch.Size([6, 4]))
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edje._utils import atomic_write, progress
from edje.first_stage.base import EmbeddingModel, check_embeddings
from edje.first_stage.features import DatasetImages, FrozenBackbones

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LinearProbeEmbedding"]

CONFIG_NAME = "first_stage_config.json"
WEIGHTS_NAME = "first_stage.safetensors"
KIND = "linear_probe"


class LinearProbeEmbedding(EmbeddingModel):
    """Linear heads over frozen vision (CLS) and text (mean-pooled) features.

    Args:
        vision: vision encoder name (`edje.backbones.OFFLINE_VISION`, a Hub id or folder).
        text: text encoder name (`edje.backbones.OFFLINE_TEXT`, a Hub id or folder).
        image_size: the vision processor's side in pixels (112 for the built-in set).
        vision_dim, text_dim: backbone widths (384 for both offline backbones).
        embedding_dim: the shared space's width.
        temperature: initial softmax temperature of the InfoNCE loss.
        learn_temperature: train the temperature (as CLIP's `logit_scale`) or keep it fixed.
        max_length: caption tokens kept.
    """

    def __init__(
        self,
        vision: str | None = None,
        text: str | None = None,
        *,
        image_size: int | None = 112,
        vision_dim: int = 384,
        text_dim: int = 384,
        embedding_dim: int = 256,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_length: int = 64,
    ):
        super().__init__()
        from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION

        self.vision_name = str(vision or OFFLINE_VISION)
        self.text_name = str(text or OFFLINE_TEXT)
        self.image_size, self.max_length = image_size, max_length
        self.vision_dim, self.text_dim, self.embedding_dim = vision_dim, text_dim, embedding_dim
        self.learn_temperature = learn_temperature
        self.image_head = nn.Linear(vision_dim, embedding_dim)
        self.text_head = nn.Linear(text_dim, embedding_dim)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature
        )
        # Frozen encoders live outside the module tree: never trained, never saved here.
        self.backbones = FrozenBackbones(self.vision_name, self.text_name, image_size, max_length)
        self.requires_grad_(False)

    @property
    def name(self) -> str:
        return f"linear-probe({self.vision_name} + {self.text_name}, {self.embedding_dim})"

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().exp())

    def _apply(self, fn, *args, **kwargs):  # .to(device) also moves the loaded backbones
        result = super()._apply(fn, *args, **kwargs)
        self.backbones.to(self.device)
        return result

    # -- embeddings --------------------------------------------------------------------------

    @torch.no_grad()
    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """Cached vision CLS features `[N, vision_dim]` -> unit embeddings `[N, D]`."""
        features = check_embeddings(features, self.vision_dim, type(self).__name__, "features")
        return F.normalize(self.image_head(features.to(self.device)), dim=-1)

    @torch.no_grad()
    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Cached mean-pooled text features `[N, text_dim]` -> unit embeddings `[N, D]`."""
        features = check_embeddings(features, self.text_dim, type(self).__name__, "features")
        return F.normalize(self.text_head(features.to(self.device)), dim=-1)

    def embed_images(
        self, images: Sequence[Any], batch_size: int = 64, show_progress_bar: bool | None = None
    ) -> torch.Tensor:
        features = self.backbones.image_features(images, batch_size, show_progress_bar)
        return self.embed_image_features(features)

    def embed_texts(
        self, texts: Sequence[str], batch_size: int = 256, show_progress_bar: bool | None = None
    ) -> torch.Tensor:
        features = self.backbones.text_features(texts, batch_size, show_progress_bar)
        return self.embed_text_features(features)

    def embed_vision_tokens(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Raw tokens `[N, n, d_vis]` of the same vision encoder: reads the CLS (index 0)."""
        if vision_tokens.ndim != 3 or vision_tokens.shape[-1] != self.vision_dim:
            raise ValueError(
                f"{type(self).__name__}.embed_vision_tokens: expected [N, n, {self.vision_dim}], "
                f"got {tuple(vision_tokens.shape)}"
            )
        return self.embed_image_features(vision_tokens[:, 0].float())

    # -- training ----------------------------------------------------------------------------

    def fit(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        text_to_image: torch.Tensor,
        *,
        epochs: int = 80,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        show_progress_bar: bool | None = None,
    ) -> list[float]:
        """Train both heads with symmetric InfoNCE on cached features; returns epoch losses.

        The heads start afresh from `seed` (as `nn.Linear` initialises them), so the same
        features and seed give the same heads whatever the global random state. Each epoch
        draws one caption per image (so a batch never holds two positives of one image),
        shuffles, and steps through batches of `batch_size` images.

        Args:
            image_features: `[n_images, vision_dim]` from `backbones.image_features`.
            text_features: `[n_texts, text_dim]` from `backbones.text_features`.
            text_to_image: `LongTensor[n_texts]`, each caption's image row.
        """
        images, texts, text_to_image = self._fit_inputs(
            image_features, text_features, text_to_image
        )
        device = self.device
        images, texts = images.to(device), texts.to(device)
        generator = torch.Generator().manual_seed(seed)
        for head in (self.image_head, self.text_head):
            _reset_linear(head, generator)
        captions = _group_captions(text_to_image, len(images))
        params = [
            p for p in self.parameters() if p is not self.logit_scale or self.learn_temperature
        ]
        self.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        losses = []
        try:
            with (
                torch.enable_grad(),
                _few_threads(device),
                progress(epochs, show_progress_bar, "fit", "epoch") as bar,
            ):
                for _ in range(epochs):
                    losses.append(
                        self._epoch(images, texts, captions, batch_size, optimizer, generator)
                    )
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", temperature=f"{self.temperature:.3f}")
                    bar.update()
        finally:
            self.requires_grad_(False)
        return losses

    def _fit_inputs(self, image_features, text_features, text_to_image):
        """`fit`'s inputs checked: float32 features of the heads' widths, and a caption-to-image
        map with one image row per caption."""
        who = f"{type(self).__name__}.fit"
        images = check_embeddings(image_features, self.vision_dim, who, "image_features")
        texts = check_embeddings(text_features, self.text_dim, who, "text_features")
        text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
        if text_to_image.shape != (len(texts),) or not len(texts):
            raise ValueError(
                f"{who}: text_to_image must have shape ({len(texts)},), got "
                f"{tuple(text_to_image.shape)}"
            )
        if text_to_image.min() < 0 or text_to_image.max() >= len(images):
            raise ValueError(f"{who}: text_to_image values must lie in [0, {len(images)})")
        return images, texts, text_to_image

    def _epoch(self, images, texts, captions, batch_size, optimizer, generator) -> float:
        order, starts, counts = captions  # captions grouped by image: see _group_captions
        rows = torch.nonzero(counts).flatten()  # images with at least one caption
        rows = rows[torch.randperm(len(rows), generator=generator)]
        offsets = (torch.rand(len(rows), generator=generator) * counts[rows]).long()
        picks = order[starts[rows] + offsets]  # one random caption per image
        total, steps = 0.0, 0
        for start in range(0, len(rows), batch_size):
            image_batch = images[rows[start : start + batch_size].to(images.device)]
            text_batch = texts[picks[start : start + batch_size].to(texts.device)]
            loss = self.contrastive_loss(image_batch, text_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                self.logit_scale.clamp_(0.0, math.log(100.0))
            total, steps = total + loss.item(), steps + 1
        return total / max(steps, 1)

    def contrastive_loss(self, image_features: torch.Tensor, text_features: torch.Tensor):
        """Symmetric InfoNCE: row i of each side is a positive pair, every other row a negative."""
        image = F.normalize(self.image_head(image_features), dim=-1)
        text = F.normalize(self.text_head(text_features), dim=-1)
        logits = self.logit_scale.exp() * image @ text.T  # (B, B)
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def fit_dataset(
        self,
        dataset: Any,
        *,
        batch_size: int = 64,
        show_progress_bar: bool | None = None,
        **fit_kwargs: Any,
    ) -> list[float]:
        """Compute the backbone features of an edje-schema `datasets.Dataset`, then `fit`.

        `fit_kwargs` go to `fit` (`epochs`, `lr`, ...); returns the epoch losses.
        """
        from edje.data import flatten_captions

        texts, text_to_image = flatten_captions(dataset)
        image_features = self.backbones.image_features(
            DatasetImages(dataset), batch_size, show_progress_bar
        )
        text_features = self.backbones.text_features(texts, show_progress_bar=show_progress_bar)
        return self.fit(
            image_features,
            text_features,
            text_to_image,
            show_progress_bar=show_progress_bar,
            **fit_kwargs,
        )

    def fit_shards(
        self,
        shards: str | Sequence[str],
        *,
        max_images: int | None = None,
        batch_size: int = 64,
        show_progress_bar: bool | None = None,
        **fit_kwargs: Any,
    ) -> list[float]:
        """`fit_dataset` over the samples of tar shards (`edje.data.shards.ShardImages`:
        each sample's image and its caption), or `max_images` of them spread evenly."""
        from edje.data.shards import ShardImages

        samples = ShardImages(shards)
        rows = [i for i, caption in enumerate(samples.captions) if caption]
        if max_images is not None and max_images < len(rows):
            rows = [rows[i * len(rows) // max_images] for i in range(max_images)]
        if not rows:
            raise ValueError(f"{type(self).__name__}.fit_shards: no captioned sample in {shards}")
        images = _ShardPictures(samples, rows)
        image_features = self.backbones.image_features(images, batch_size, show_progress_bar)
        texts = [samples.captions[i] for i in rows]
        text_features = self.backbones.text_features(texts, show_progress_bar=show_progress_bar)
        return self.fit(
            image_features,
            text_features,
            torch.arange(len(rows)),
            show_progress_bar=show_progress_bar,
            **fit_kwargs,
        )

    # -- saving ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """What `save_pretrained` writes to `first_stage_config.json`."""
        return {
            "kind": KIND,
            "vision": self.vision_name,
            "text": self.text_name,
            "image_size": self.image_size,
            "vision_dim": self.vision_dim,
            "text_dim": self.text_dim,
            "embedding_dim": self.embedding_dim,
            "temperature": self.temperature,
            "learn_temperature": self.learn_temperature,
            "max_length": self.max_length,
            "image_feature": "last_hidden_state[:, 0]",
            "text_feature": "mean-pooled last_hidden_state",
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `first_stage_config.json` and the heads as `first_stage.safetensors`."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_NAME, lambda path: save_file(tensors, path))
        text = json.dumps(self.config(), indent=2) + "\n"
        atomic_write(folder / CONFIG_NAME, lambda path: Path(path).write_text(text))
        return folder

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LinearProbeEmbedding:
        """Load what `save_pretrained` wrote (the backbones load on first use)."""
        from safetensors.torch import load_file

        folder = Path(directory)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: expected {CONFIG_NAME} in {folder}, found none"
            )
        config = json.loads(config_path.read_text())
        if config.get("kind") != KIND:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: {config_path} has kind {config.get('kind')!r}, "
                f"expected {KIND!r}"
            )
        names = (
            "image_size",
            "vision_dim",
            "text_dim",
            "embedding_dim",
            "temperature",
            "learn_temperature",
            "max_length",
        )
        model = cls(config["vision"], config["text"], **{k: config[k] for k in names})
        model.load_state_dict(load_file(folder / WEIGHTS_NAME))
        return model


class _ShardPictures(Sequence):
    """Chosen samples of `ShardImages`, decoded when a batch asks for them."""

    def __init__(self, samples, rows: list[int]):
        self.samples, self.rows = samples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        from edje._utils import load_rgb

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return load_rgb(self.samples[self.rows[index]])


@torch.no_grad()
def _reset_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """`nn.Linear`'s own initialisation, drawn from `generator` instead of the global RNG
    (which torch seeds at random in every process)."""
    bound = 1.0 / math.sqrt(layer.in_features)
    for tensor in (layer.weight, layer.bias):
        values = torch.rand(tensor.shape, generator=generator) * 2 * bound - bound
        tensor.copy_(values.to(tensor.device))


@contextlib.contextmanager
def _few_threads(device: torch.device):
    """One CPU thread: the heads' matrices are small, and threads waiting on busy cores cost
    ten times the work itself."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _group_captions(text_to_image: torch.Tensor, n_images: int):
    """Caption indices sorted by image, and per image where its run starts and its length."""
    order = torch.argsort(text_to_image, stable=True)
    counts = torch.bincount(text_to_image, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    return order, starts, counts
