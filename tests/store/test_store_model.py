"""A real EDJEModel with a real token store: its fingerprint, its refusal of foreign stores, and
scores from stored tokens equal to scores from pixels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from edje.store import TokenStore
from edje.store.encode import encode_images
from tests.helpers.tiny import make_tiny_model


def photos(count: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(count)
    ]


def encode(model, processor, out, images, compressed=True):
    paths = []
    for i, image in enumerate(images):
        path = out.parent / f"{out.name}-{i}.png"
        image.save(path)
        paths.append(str(path))
    return encode_images(
        paths,
        out,
        ids=[f"img{i}" for i in range(len(paths))],
        vision_encoder=model.vision_encoder,
        image_processor=processor.image_processor,
        compressor=model.compress if compressed else None,
        fingerprint=model.store_fingerprint(raw=not compressed),
        accelerator="cpu",
        devices=1,
        progress=False,
    )


def test_model_accepts_its_own_stores_and_refuses_another_adapters(
    tiny_processor, tiny_vision_encoder, tmp_path
):
    model = make_tiny_model(tiny_processor, tiny_vision_encoder, seed=0)
    other = make_tiny_model(tiny_processor, tiny_vision_encoder, seed=1)
    encode(model, tiny_processor, tmp_path / "compressed", photos())
    encode(model, tiny_processor, tmp_path / "raw", photos(), compressed=False)
    compressed, raw = TokenStore.open(tmp_path / "compressed"), TokenStore.open(tmp_path / "raw")
    model.check_store(compressed)
    model.check_store(raw)
    other.check_store(raw)  # same vision encoder and preprocessing: raw tokens are shared
    with pytest.raises(ValueError, match="adapter_sha256"):
        other.check_store(compressed)
    with pytest.warns(UserWarning, match="adapter_sha256"):
        other.check_store(compressed, force=True)


def test_scores_from_stored_tokens_match_scores_from_pixels(
    tiny_processor, tiny_vision_encoder, tmp_path
):
    model = make_tiny_model(tiny_processor, tiny_vision_encoder, seed=0)
    images = photos()
    encode(model, tiny_processor, tmp_path / "store", images)
    store = TokenStore.open(tmp_path / "store")
    captions = ["a noisy photo", "another", "a third", "the last one"]
    with torch.no_grad():
        pixels = tiny_processor(text=captions, images=images)
        expected_tokens = model.compress(model.encode_images(pixels["pixel_values"]))
        from_pixels = model(**pixels).logits
        tokens = store.gather([f"img{i}" for i in range(4)], dtype=torch.float32)
        from_store = model(**tiny_processor(text=captions, image_tokens=tokens)).logits
    # fp16 storage of the compressed tokens is the only difference.
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-3, atol=1e-3)
    assert (tokens - expected_tokens).abs().max() > 0  # they were stored in fp16
    torch.testing.assert_close(from_store, from_pixels, rtol=0, atol=1e-4)


def test_a_saved_model_checks_its_store_without_instantiating_the_vision_encoder(
    tiny_processor, tiny_vision_encoder, tmp_path, monkeypatch
):
    from edje import EDJEModel
    from edje.rerank import EDJEReranker

    model = make_tiny_model(tiny_processor, tiny_vision_encoder, seed=0)
    encode(model, tiny_processor, tmp_path / "store", photos(2))
    model.save_pretrained(tmp_path / "model", save_vision_encoder=True)
    tiny_processor.save_pretrained(tmp_path / "model")
    loaded = EDJEModel.from_pretrained(tmp_path / "model")
    assert loaded.config.vision_encoder_sha256 == model.config.vision_encoder_sha256 is not None

    def refuse():
        raise AssertionError("the vision encoder was instantiated")

    monkeypatch.setattr(loaded, "_load_vision_encoder", refuse)
    reranker = EDJEReranker(loaded, store=tmp_path / "store", processor=tiny_processor,
                            device="cpu")  # fmt: skip
    assert reranker.predict([("a photo", "img0")]).shape == (1,)
    assert not loaded._vision_encoder
    # Another encoder attached: the recorded hash no longer describes it, and is dropped.
    loaded.set_vision_encoder(tiny_vision_encoder)
    assert loaded.config.vision_encoder_sha256 is None


def test_a_folder_recording_no_weight_hash_reads_its_store_without_any_vision_encoder(
    tiny_processor, tiny_vision_encoder, tmp_path, monkeypatch
):
    """A converted folder names its vision encoder (a Hub id) but records no weight hash: the
    store's fingerprint is checked against what the folder records, and nothing is loaded."""
    from edje import EDJEModel
    from edje.rerank import EDJEReranker

    model = make_tiny_model(tiny_processor, tiny_vision_encoder, seed=0)
    encode(model, tiny_processor, tmp_path / "store", photos(2))
    assert TokenStore.open(tmp_path / "store").fingerprint["vision_weights_sha256"]
    config = copy.deepcopy(model.config)
    config.vision_encoder_sha256 = None  # as `edje convert` writes it: the encoder by name only
    unhashed = EDJEModel(config)
    unhashed.load_state_dict(model.state_dict())
    unhashed.save_pretrained(tmp_path / "model")  # no encoder attached: no hash computed
    tiny_processor.save_pretrained(tmp_path / "model")

    def refuse(self):
        raise AssertionError("the vision encoder was loaded")

    monkeypatch.setattr(EDJEModel, "_load_vision_encoder", refuse)
    loaded = EDJEModel.from_pretrained(tmp_path / "model")
    assert loaded.config.vision_encoder_sha256 is None
    reranker = EDJEReranker(tmp_path / "model", store=tmp_path / "store", device="cpu")
    assert reranker.predict([("a photo", "img0")]).shape == (1,)
    assert not reranker.model.has_vision_encoder
    # Without a weight hash the vision encoder's name is what is compared.
    loaded.config.vision_encoder_name = "another/encoder"
    with pytest.raises(ValueError, match="vision_name: store='tiny/dinov2', expected='another"):
        loaded.check_store(TokenStore.open(tmp_path / "store"))
