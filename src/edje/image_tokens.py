"""Image tokens, one way for every door: pictures (or a token store) -> what the joint encoder
reads.

`edje encode`, `EDJEReranker`, evaluation and `edje serve` all decode pictures with
`edje._utils.load_rgb` (transparency over white, every mode to RGB) and preprocess them with
`pixel_inputs`, so an image scores the same whichever way it came in: as the image processor
makes it of the original picture (up to `MAX_EXACT_PIXELS`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from edje._utils import load_rgb, progress

__all__ = ["MAX_EXACT_PIXELS", "ReducedImageWarning", "from_images", "from_store", "pixel_inputs"]

# The image processor works on copies of a picture (about 8.5 bytes a pixel: 306 MB for 36M
# pixels, on top of the decoded picture). Pictures up to this many pixels (a 24-Mpx camera's
# 6000 x 4000) reach it whole, so their tokens are exactly `processor(images=picture)`'s; a
# larger one is first box-reduced by a whole factor, with a `ReducedImageWarning` (once). Like
# PIL's `Image.MAX_IMAGE_PIXELS`, a module setting: None keeps every picture whole.
MAX_EXACT_PIXELS: int | None = 24_000_000

# The warning is given once a process. A flag, since Python's once-per-place memory is reset
# whenever warning filters change, as `load_rgb` changes them for every picture.
_reduction_warned = False


class ReducedImageWarning(UserWarning):
    """A picture past `MAX_EXACT_PIXELS` was box-reduced before the image processor."""


def pixel_inputs(image_processor: Any, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Decode `images` (PIL images, paths, bytes) with `load_rgb` and preprocess them: the same
    tensors as `image_processor(images=pictures)`, in groups of at most `MAX_EXACT_PIXELS`
    pixels, so its working copies stay within that budget whatever the batch size."""
    side = _target_side(image_processor)
    rgb = [_within_budget(load_rgb(image), side) for image in images]
    parts = [dict(image_processor(images=group, return_tensors="pt")) for group in _groups(rgb)]
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _within_budget(image, side: int | None):
    """`image` itself, or box-reduced (and said once) when it holds more than
    `MAX_EXACT_PIXELS` pixels."""
    global _reduction_warned
    if MAX_EXACT_PIXELS is None or image.width * image.height <= MAX_EXACT_PIXELS:
        return image
    smaller = reduced(image, side)
    if smaller is not image and not _reduction_warned:
        _reduction_warned = True
        warnings.warn(
            f"edje: a picture of {image.width}x{image.height} pixels, over "
            f"edje.image_tokens.MAX_EXACT_PIXELS ({MAX_EXACT_PIXELS}), was box-reduced to "
            f"{smaller.width}x{smaller.height} before the image processor, so its tokens differ "
            "slightly from processor(images=picture)'s (said once; others past the limit are "
            "reduced alike). Set MAX_EXACT_PIXELS higher, or None, to keep them whole at the "
            "cost of memory.",
            ReducedImageWarning,
            stacklevel=2,
        )
    return smaller


def _groups(images: list) -> list[list]:
    """Consecutive groups of at most `MAX_EXACT_PIXELS` pixels together, each of one picture at
    least (no pictures: one empty group, handed to the processor as before)."""
    groups, total = [[]], 0
    for image in images:
        pixels = image.width * image.height
        if groups[-1] and MAX_EXACT_PIXELS is not None and total + pixels > MAX_EXACT_PIXELS:
            groups.append([])
            total = 0
        groups[-1].append(image)
        total += pixels
    return groups


def _target_side(image_processor: Any) -> int | None:
    """The largest side the processor resizes to (None when it does not say)."""
    size = getattr(image_processor, "size", None)
    sides = [v for v in (dict(size) if size else {}).values() if isinstance(v, int)]
    return max(sides) if sides else None


def reduced(image, side: int | None):
    """A picture many times larger than `side`, box-reduced by a whole factor to still at least
    twice that size: a processor's own resize then makes nearly the same pixels (not the same:
    the box average drops detail), without turning tens of millions of pixels into arrays."""
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
