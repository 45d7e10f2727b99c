"""EDJEProcessor: the pair layout, broadcasting, bad captions, saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from edje import EDJEProcessor


def test_pair_layout_and_segments(tiny_processor):
    batch = tiny_processor(
        text=["a red circle", "a big blue square"], image_tokens=torch.zeros(2, 4, 32)
    )
    tok = tiny_processor.tokenizer
    image_id = tiny_processor.image_token_id
    for row, caption in enumerate(["a red circle", "a big blue square"]):
        caption_ids = tok(caption)["input_ids"]  # [CLS] ... [SEP]
        expected = caption_ids + [image_id] * 4 + [tok.sep_token_id]
        length = len(expected)
        assert batch["input_ids"][row, :length].tolist() == expected
        assert batch["token_type_ids"][row, :length].tolist() == [0] * len(caption_ids) + [1] * 5
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (
            batch["input_ids"].shape[1] - length
        )
        assert set(batch["input_ids"][row, length:].tolist()) <= {tok.pad_token_id}
    assert batch["image_tokens"].shape == (2, 4, 32)


def test_one_caption_against_many_images_tokenizes_once(tiny_processor, monkeypatch):
    calls = []
    tokenizer_call = type(tiny_processor.tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        calls.append(list(text) if not isinstance(text, str) else [text])
        return tokenizer_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tiny_processor.tokenizer), "__call__", spy)
    batch = tiny_processor(text="a red circle", image_tokens=torch.zeros(100, 4, 32))
    assert calls == [["a red circle"]]
    assert batch["input_ids"].shape[0] == 100
    assert (batch["input_ids"] == batch["input_ids"][0]).all()


def test_one_image_against_many_captions_is_broadcast(tiny_processor):
    batch = tiny_processor(text=["a", "b", "c"], image_tokens=torch.randn(1, 4, 32))
    assert batch["image_tokens"].shape == (3, 4, 32)
    assert torch.equal(batch["image_tokens"][0], batch["image_tokens"][2])


def test_images_give_pixel_values(tiny_processor):
    images = [Image.fromarray(np.zeros((50, 20, 3), dtype=np.uint8)), Image.new("L", (9, 9))]
    batch = tiny_processor(text=["a", "b"], images=images)
    assert batch["pixel_values"].shape == (2, 3, 28, 28)


def test_blips_argument_order_images_then_text_gives_the_same_inputs(tiny_processor):
    image = Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8))
    expected = tiny_processor(text="a cat", images=image)
    for swapped in (tiny_processor(image, "a cat"), tiny_processor([image, image], ["a", "b"])):
        assert set(swapped) == set(expected)
    swapped = tiny_processor(image, "a cat")
    assert all(torch.equal(swapped[k], expected[k]) for k in expected)


def test_long_caption_is_truncated_to_max_caption_length(tiny_processor):
    caption = " ".join(["circle"] * 10_000)
    batch = tiny_processor(text=caption, image_tokens=torch.zeros(1, 4, 32))
    text_tokens = int((batch["token_type_ids"][0] == 0).sum())
    assert text_tokens == tiny_processor.max_caption_length == 16
    assert batch["input_ids"].shape[1] == 16 + 4 + 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "caption 0 is empty"),
        (["ok", "   "], "caption 1 is empty"),
        ([], "at least one caption"),
        (None, "expects text"),
        ([3], "caption 0 must be a str, got int"),
    ],
)
def test_bad_captions_are_refused(tiny_processor, text, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=text, image_tokens=torch.zeros(1, 4, 32))


def test_images_and_tokens_both_or_neither_are_refused(tiny_processor):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="exactly one of images or image_tokens, got both"):
        tiny_processor(text="a", images=[image], image_tokens=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="got neither"):
        tiny_processor(text="a")


def test_mismatched_counts_are_refused(tiny_processor):
    with pytest.raises(ValueError, match="2 captions and 3 images"):
        tiny_processor(text=["a", "b"], image_tokens=torch.zeros(3, 4, 32))


def test_save_and_auto_processor_round_trip(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    import edje  # noqa: F401  (registers the Auto classes)

    # AutoProcessor finds the class through the model's config, as for any model folder.
    from tests.helpers.tiny import make_tiny_config

    make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id).save_pretrained(
        tmp_path
    )
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, EDJEProcessor)
    assert loaded.num_image_tokens == 4 and loaded.max_caption_length == 16
    assert loaded.image_token_id == tiny_processor.image_token_id
    tokens = torch.zeros(2, 4, 32)
    expected = tiny_processor(text=["x y", "z"], image_tokens=tokens)
    got = loaded(text=["x y", "z"], image_tokens=tokens)
    for key in expected:
        assert torch.equal(expected[key], got[key])


def test_pairs_from_captions_padded_to_max_length_match_the_processor(tiny_processor):
    from edje.processing_edje import append_image_slots

    captions = ["a red circle", "a big blue square left of a small green star", "x"]
    padded = tiny_processor.tokenize_captions(captions, pad_to_max_length=True)
    assert padded["input_ids"].shape == (3, tiny_processor.max_caption_length)
    tok = tiny_processor.tokenizer
    pairs = append_image_slots(
        padded["input_ids"],
        padded["attention_mask"],
        image_token_id=tiny_processor.image_token_id,
        sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
        num_image_tokens=4,
    )
    expected = tiny_processor.tokenize_pairs(captions)
    for key in expected:
        assert torch.equal(pairs[key], expected[key]), key
