"""The first stage: embedding models for top-k retrieval, hard negatives and text targets.

- `EmbeddingModel`: the interface (`embed_texts`, `embed_images`,
  `embed_vision_tokens`; L2-normalised float32 `[N, D]`).
- `LinearProbeEmbedding`: offline, two linear heads over the frozen offline backbones,
  trained contrastively on cached features in seconds.
- `TransformersEmbedding`: CLIP / SigLIP / SigLIP2 by Hub id or folder.
- `VectorIndex`: FAISS top-k search (exact inner product by default).
- `load_embedding_model`: either model from a folder or a Hub id.

Example:
    >>> import torch
    >>> from edje.first_stage import LinearProbeEmbedding, VectorIndex
    >>> probe = LinearProbeEmbedding(vision_dim=8, text_dim=8, embedding_dim=4)
    >>> images = probe.embed_image_features(torch.randn(5, 8))
    >>> index = VectorIndex(probe.embedding_dim)
    >>> index.add(images)
    >>> scores, positions = index.search(images, k=1)
    >>> positions.flatten().tolist()  # each image finds itself
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import os
from pathlib import Path

from edje.first_stage.base import EmbeddingModel
from edje.first_stage.index import VectorIndex
from edje.first_stage.linear_probe import CONFIG_NAME, LinearProbeEmbedding
from edje.first_stage.transformers_embedding import TransformersEmbedding

__all__ = [
    "EmbeddingModel",
    "LinearProbeEmbedding",
    "TransformersEmbedding",
    "VectorIndex",
    "load_embedding_model",
]


def load_embedding_model(name_or_path: str | os.PathLike, **kwargs) -> EmbeddingModel:
    """A folder written by `LinearProbeEmbedding.save_pretrained`, else a transformers model.

    `kwargs` go to `TransformersEmbedding` (`device`, `dtype`, `max_length`).
    A folder of first stages, one per data set (as `edje quickstart` leaves `first_stage/`),
    is refused with a `ValueError` naming them: which one fits depends on the images.
    """
    folder = Path(name_or_path)
    if (folder / CONFIG_NAME).is_file():
        return LinearProbeEmbedding.from_pretrained(name_or_path)
    inner = _first_stages_in(folder)
    if inner:
        raise ValueError(
            f"{folder} is a folder of {len(inner)} first stages ({', '.join(inner)}), not one: "
            f"pass the one made for your images, e.g. {folder / inner[0]}."
        )
    return TransformersEmbedding(name_or_path, **kwargs)


def _first_stages_in(folder: Path) -> list[str]:
    """The names of `folder`'s sub-folders that hold a first stage, when `folder` holds no
    model of its own (no config.json)."""
    if not folder.is_dir() or (folder / "config.json").is_file():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if (p / CONFIG_NAME).is_file() or (p / "config.json").is_file())  # fmt: skip
