"""Which vision encoder an authors' checkpoint was trained on: what its weights say (the
adapter's width; the frozen SigLIP's position count, when the file keeps it), completed by the
user's options and by the named encoder's own `config.json`, every pair of them checked.

The authors' code runs SigLIP2 fixed-resolution towers (B/16 at 224, L/16 at 256 or 384); their
released checkpoint is L/16 at 384. A checkpoint of another size converts only to a config that
says so, or not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edje.authors_facts import AUTHORS_IMAGE_SIZE, AUTHORS_VISION, SIGLIP2_BY_WIDTH, SIGLIP2_PATCH


class VisionMismatchError(ValueError):
    """Two sources disagree about the vision encoder; the message names both."""


@dataclass(frozen=True)
class VisionFacts:
    name: str  # Hub id or folder of the vision encoder
    image_size: int
    num_tokens: int  # patch tokens: SigLIP has no [CLS]
    num_heads: int


def vision_facts(
    width: int,
    file_tokens: int | None,
    *,
    vision_encoder: str | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    load_config: bool = True,
) -> VisionFacts:
    """The vision encoder of a checkpoint whose adapter reads tokens of `width` (and whose
    frozen SigLIP copy has `file_tokens` positions, if kept).

    `vision_encoder` defaults to the SigLIP2 tower of that width at the size the file gives
    (else the authors' SigLIP2-L/16-384); its `config.json` is read when it can be (a folder,
    the Hub cache or the Hub; never weights). Raises `VisionMismatchError` naming both sides
    when the file, the options and that config disagree, and when the heads are unknown.
    """
    side = _side(file_tokens, "the checkpoint's frozen SigLIP positions")
    known = SIGLIP2_BY_WIDTH.get(width)
    if vision_encoder is None:
        size = image_size or (side * SIGLIP2_PATCH if side else AUTHORS_IMAGE_SIZE)
        vision_encoder = f"google/siglip2-{known[0]}-patch16-{size}" if known else AUTHORS_VISION
    config = _vision_config(vision_encoder) if load_config else None
    patch = getattr(config, "patch_size", SIGLIP2_PATCH)
    file_size = side * patch if side else None
    if config is not None and config.hidden_size != width:
        raise VisionMismatchError(
            f"edje convert: the checkpoint's adapter reads {width}-wide vision tokens, but "
            f"{vision_encoder} is {config.hidden_size} wide; name its vision encoder with "
            "--vision."
        )
    size = _agree(
        "image size",
        {
            "the checkpoint's frozen SigLIP positions": file_size,
            "--image-size": image_size,
            f"{vision_encoder}'s config": getattr(config, "image_size", None),
        },
    )
    heads = _agree(
        "vision encoder's attention heads",
        {"--vision-heads": num_heads, f"{vision_encoder}'s config": _heads(config)},
    )
    heads = heads or (known[1] if known else None)
    if heads is None:
        raise VisionMismatchError(
            f"edje convert: the checkpoint's vision tokens are {width} wide, no SigLIP2 width "
            f"edje knows ({sorted(SIGLIP2_BY_WIDTH)}), and {vision_encoder}'s config could not "
            "be read: give the vision encoder with --vision, or its head count with "
            "--vision-heads."
        )
    size = size or AUTHORS_IMAGE_SIZE
    if size % patch:
        raise VisionMismatchError(
            f"edje convert: image size {size} is not a multiple of the patch size {patch}."
        )
    return VisionFacts(vision_encoder, size, (size // patch) ** 2, heads)


def _side(tokens: int | None, where: str) -> int | None:
    if tokens is None:
        return None
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise VisionMismatchError(
            f"edje convert: {where} number {tokens}, not a square grid of patches; expected a "
            "fixed-resolution SigLIP2 tower."
        )
    return side


def _agree(what: str, sources: dict[str, Any]) -> Any:
    """The one value the sources that know it give; refused when two differ."""
    given = {where: value for where, value in sources.items() if value is not None}
    if len(set(given.values())) > 1:
        told = ", ".join(f"{where}: {value}" for where, value in given.items())
        raise VisionMismatchError(
            f"edje convert: the {what} disagree ({told}); nothing was written."
        )
    return next(iter(given.values()), None)


def config_of(name: str):
    """The `config.json` of a model by Hub id or folder, or None where it cannot be read
    (offline without it in the cache, or not a model)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return None


def _vision_config(name: str):
    """The vision tower's config (`SiglipVisionConfig`), or None where it cannot be read."""
    config = config_of(name)
    return getattr(config, "vision_config", config)


def _heads(config) -> int | None:
    return getattr(config, "num_attention_heads", None) if config is not None else None
