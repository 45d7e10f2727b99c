"""The embedding-model interface every first stage implements.

An embedding model maps texts and images into one space where the dot product of two
L2-normalised vectors ranks candidates. EDJE uses it three ways: top-k retrieval before
reranking, hard-negative mining over a training batch, and text-embedding targets.

Example:
    >>> import torch
    >>> from edje.first_stage import EmbeddingModel
    >>> class Bag(EmbeddingModel):  # a toy: one dimension per known word
    ...     words = ["red", "blue"]
    ...     embedding_dim = 2
    ...     def embed_texts(self, texts, batch_size=64, show_progress_bar=None):
    ...         rows = [[float(w in t) + 1e-6 for w in self.words] for t in texts]
    ...         return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)
    ...     def embed_images(self, images, batch_size=64, show_progress_bar=None):
    ...         raise NotImplementedError
    >>> Bag().embed_texts(["a red circle"]).round(decimals=3)
    tensor([[1., 0.]])
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["EmbeddingModel", "check_embeddings"]


class EmbeddingModel(nn.Module, metaclass=ABCMeta):
    """Texts and images -> L2-normalised float32 embeddings `[N, embedding_dim]`, no grad,
    on the model's device (`model.to(device)` moves it, frozen backbones included).

    Subclasses implement `embedding_dim`, `embed_texts` and `embed_images` (PIL images), and
    `embed_vision_tokens` where the embedding can be read from the raw vision tokens a training
    batch already holds. `name` is what reports call the model. `encode_texts`,
    `encode_images` and `encode_vision_tokens` are the older names: a subclass may implement
    either, and edje calls these, so a duck-typed first stage written before keeps working.
    """

    embedding_dim: int
    name: str = "embedding-model"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass written against either name serves both (before ABCMeta counts abstracts).
        for new, old in _OLDER_NAMES.items():
            if old in cls.__dict__ and new not in cls.__dict__:
                setattr(cls, new, cls.__dict__[old])
            elif new in cls.__dict__ and old not in cls.__dict__:
                setattr(cls, old, cls.__dict__[new])

    @abstractmethod
    def embed_texts(
        self, texts: Sequence[str], batch_size: int = 256, show_progress_bar: bool | None = None
    ) -> torch.Tensor:
        """Texts -> `[N, embedding_dim]` float32, each row of unit length."""

    @abstractmethod
    def embed_images(
        self, images: Sequence[Any], batch_size: int = 64, show_progress_bar: bool | None = None
    ) -> torch.Tensor:
        """PIL images -> `[N, embedding_dim]` float32, each row of unit length."""

    def embed_vision_tokens(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Raw vision-encoder tokens `[N, n, d_vis]` -> `[N, embedding_dim]`, if possible.

        Only models whose image embedding is a function of the vision tower's
        `last_hidden_state` can do this; the others raise `NotImplementedError`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot embed raw vision tokens; use embed_images(images)"
        )

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{type(self).__name__}: call embed_texts / embed_images, not the model")

    encode_texts = embed_texts  # the older names (see the class notes)
    encode_images = embed_images
    encode_vision_tokens = embed_vision_tokens


_OLDER_NAMES = {
    "embed_texts": "encode_texts",
    "embed_images": "encode_images",
    "embed_vision_tokens": "encode_vision_tokens",
}


def check_embeddings(embeddings: torch.Tensor, dim: int, who: str, name: str) -> torch.Tensor:
    """Raise ValueError unless `embeddings` is `[N, dim]`; return it as float32."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        shape = tuple(getattr(embeddings, "shape", ())) or type(embeddings).__name__
        raise ValueError(f"{who}: {name} must be a 2-D tensor [N, {dim}], got {shape}")
    if embeddings.shape[1] != dim:
        raise ValueError(f"{who}: {name} must have {dim} columns, got {tuple(embeddings.shape)}")
    return embeddings.float()
