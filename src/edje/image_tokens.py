"""Image tokens, one way for every door: pictures (or a token store) -> what the joint encoder
reads.

`edje encode`, `EDJEReranker`, evaluation and `edje serve` all decode pictures with
`edje._utils.load_rgb` (transparency over white, every mode to RGB) and preprocess them with
`pixel_inputs`, so an image scores the same whichever way it came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from edje._utils import load_rgb, progress

__all__ = ["from_images", "from_store", "pixel_inputs"]


def pixel_inputs(image_processor: Any, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Decode `images` (PIL images, paths, bytes) with `load_rgb` and preprocess them."""
    side = _target_side(image_processor)
    rgb = [reduced(load_rgb(image), side) for image in images]
    return dict(image_processor(images=rgb, return_tensors="pt"))


def _target_side(image_processor: Any) -> int | None:
    """The largest side the processor resizes to (None when it does not say)."""
    size = getattr(image_processor, "size", None)
    sides = [v for v in (dict(size) if size else {}).values() if isinstance(v, int)]
    return max(sides) if sides else None


def reduced(image, side: int | None):
    """A picture many times larger than the processor's size, box-reduced by a whole factor to
    still at least twice that size: the processor's own resize then makes nearly the same
    pixels, without turning tens of millions of pixels into float arrays first."""
    factor = min(image.size) // (2 * side) if side else 0
    return image.reduce(factor) if factor >= 2 else image


@torch.inference_mode()
def from_images(
    model: Any,
    image_processor: Any,
    images: Sequence[Any],
    *,
    batch_size: int = 32,
    show_progress_bar: bool | None = False,
) -> torch.Tensor:
    """Pictures -> compressed image tokens `[N, m, d]` (float32, on the model's device):
    the frozen vision encoder, then the model's adapter."""
    out = []
    with progress(len(images), show_progress_bar, "image tokens", "img") as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = pixel_inputs(image_processor, chunk)["pixel_values"].to(model.device)
            out.append(model.compress(model.encode_images(pixels)).float())
            bar.update(len(chunk))
    m, d = model.config.image_token_shape
    return torch.cat(out) if out else torch.empty(0, m, d, device=model.device)


@torch.inference_mode()
def from_store(model: Any, store: Any, rows: Sequence[str] | torch.Tensor) -> torch.Tensor:
    """Stored tokens by image id (or by row) -> compressed tokens `[N, m, d]` (float32, on the
    model's device); a raw store's tokens go through the model's adapter first."""
    if isinstance(rows, torch.Tensor):
        tokens = store.gather_rows(rows.cpu())
    else:
        tokens = store.gather(list(rows))
    tokens = tokens.to(model.device)
    if store.is_raw:
        tokens = model.compress(tokens.to(model.dtype))
    return tokens.float()
