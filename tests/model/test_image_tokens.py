"""`edje.image_tokens.pixel_inputs`, the one preprocessing of every door: a large picture reaches
the image processor whole, so its pixels are exactly `processor(images=picture)`'s; only past
`MAX_EXACT_PIXELS` is a picture box-reduced, and that is said once; a batch is preprocessed in
groups within that budget, to the same tensors."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from edje import image_tokens
from edje.image_tokens import pixel_inputs, reduced
from tests.helpers.tiny import TINY_IMAGE_SIZE


def detailed_picture(side: int, seed: int = 2) -> Image.Image:
    """Seeded noise: every pixel differs from its neighbours, so a box reduction changes what
    a processor's resize makes of the picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def processed(processor, pictures) -> torch.Tensor:
    return processor(images=list(pictures), return_tensors="pt")["pixel_values"]


def test_a_1536_px_picture_reaches_the_authors_siglip_processor_whole():
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": 384, "width": 384})  # SigLIP2-L/16-384's
    picture = detailed_picture(1536)  # short side 4 x 384: box-reduced by 2 before
    exact = processed(processor, [picture])
    assert torch.equal(pixel_inputs(processor, [picture])["pixel_values"], exact)
    # A box reduction by 2 moves pixels by up to 0.16: the comparison has teeth.
    assert (processed(processor, [picture.reduce(2)]) - exact).abs().max() > 0.1


def test_only_a_picture_past_the_pixel_budget_is_reduced_and_that_is_said_once(
    tiny_image_processor, monkeypatch
):
    big = detailed_picture(1536)
    monkeypatch.setattr(image_tokens, "MAX_EXACT_PIXELS", 1536 * 1536 - 1)
    monkeypatch.setattr(image_tokens, "_reduction_warned", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = pixel_inputs(tiny_image_processor, [big, big])["pixel_values"]
        pixel_inputs(tiny_image_processor, [big])
    said = [w for w in seen if issubclass(w.category, image_tokens.ReducedImageWarning)]
    assert len(said) == 1 and "MAX_EXACT_PIXELS (2359295)" in str(said[0].message)
    assert "1536x1536" in str(said[0].message)
    smaller = reduced(big, TINY_IMAGE_SIZE)  # the processor resizes to TINY_IMAGE_SIZE
    assert smaller.width < big.width
    assert torch.equal(got, processed(tiny_image_processor, [smaller] * 2))

    monkeypatch.setattr(image_tokens, "MAX_EXACT_PIXELS", None)  # no budget: always whole
    with warnings.catch_warnings():
        warnings.simplefilter("error", image_tokens.ReducedImageWarning)
        whole = pixel_inputs(tiny_image_processor, [big])["pixel_values"]
    assert torch.equal(whole, processed(tiny_image_processor, [big]))


def test_a_batch_is_preprocessed_in_groups_within_the_budget_to_the_same_tensors(
    tiny_image_processor, monkeypatch
):
    pictures = [detailed_picture(64, seed) for seed in range(7)]
    monkeypatch.setattr(image_tokens, "MAX_EXACT_PIXELS", 3 * 64 * 64)
    calls = []

    class Recording:
        size = tiny_image_processor.size

        def __call__(self, images, **kwargs):
            calls.append(sum(image.width * image.height for image in images))
            return tiny_image_processor(images=images, **kwargs)

    got = pixel_inputs(Recording(), pictures)["pixel_values"]
    assert calls == [3 * 64 * 64, 3 * 64 * 64, 64 * 64]  # never more than the budget at once
    assert torch.equal(got, processed(tiny_image_processor, pictures))
