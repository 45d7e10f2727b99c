"""Synthetic training batches for tiny networks: the keys the collator gives, random values."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edje.training import stable_key


def synthetic_batch(processor, size: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    captions = [f"a shape number {i} of colour {i * 7 % 5}" for i in range(size)]
    encoded = processor.tokenize_captions(captions, pad_to_max_length=True)
    return {
        "caption_ids": encoded["input_ids"],
        "caption_mask": encoded["attention_mask"],
        "vision_tokens": torch.randn(size, 5, 32, generator=generator),
        "image_key": torch.tensor([stable_key(f"img{i}") for i in range(size)]),
        "caption_key": torch.tensor([stable_key(c) for c in captions]),
        "text_embedding": F.normalize(torch.randn(size, 8, generator=generator), dim=-1),
        "image_embedding": F.normalize(torch.randn(size, 8, generator=generator), dim=-1),
    }
