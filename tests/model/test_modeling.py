"""EDJEModel and its adapter on tiny random configs: shapes, freezing, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edje import (
    EDJELightAdapter,
    EDJELocalAdapter,
    EDJEModel,
    EDJEPaperAdapter,
    LocalProjector,
    PaperTokenCompressionAdapter,
    TokenCompressionAdapter,
)
from edje.modeling_edje import ADAPTER_CLASSES, sincos_grid_positions
from tests.helpers.tiny import make_tiny_config

CAPTIONS = ["a small red circle left of a large blue square", "a green star"]


def pair_inputs(processor, n=2, **kwargs):
    return processor(text=CAPTIONS[:n], image_tokens=torch.randn(n, 4, 32), **kwargs)


def test_adapter_compresses_n_tokens_to_m():
    adapter = TokenCompressionAdapter(
        vision_dim=32, out_dim=16, num_queries=4, num_heads=2, mlp_dim=64
    )
    assert adapter(torch.randn(3, 17, 32)).shape == (3, 4, 16)


def test_adapter_options_qk_norm_and_positions_keep_shape():
    adapter = TokenCompressionAdapter(32, 16, 4, 2, 64, qk_norm=True, num_positions=17)
    assert adapter(torch.randn(3, 17, 32)).shape == (3, 4, 16)
    assert adapter.value_position_embedding.shape == (1, 17, 32)


def test_value_positions_start_as_a_sincos_grid_that_tells_mirrored_images_apart():
    positions = sincos_grid_positions(65, 384)  # CLS + 8 x 8 patches
    assert torch.equal(positions[0], torch.zeros(384))
    grid = positions[1:].view(8, 8, 384)
    assert not torch.allclose(grid, grid.flip(1))  # left and right differ
    assert sincos_grid_positions(10, 6).shape == (10, 6)  # no square grid: 1D, padded
    torch.manual_seed(0)
    tokens = torch.randn(1, 65, 384)
    patches = tokens[:, 1:].view(1, 8, 8, 384).flip(2).flatten(1, 2)
    mirrored = torch.cat([tokens[:, :1], patches], dim=1)
    blind = TokenCompressionAdapter(384, 16, 4, 6, 64)  # attention pooling ignores order
    assert torch.allclose(blind(tokens), blind(mirrored), atol=1e-5)
    adapter = TokenCompressionAdapter(384, 16, 4, 6, 64, num_positions=65)
    assert not torch.allclose(adapter(tokens), adapter(mirrored), atol=1e-3)


def test_adapter_output_depends_on_every_raw_token():
    torch.manual_seed(0)
    adapter = TokenCompressionAdapter(32, 16, 4, 2, 64)
    tokens = torch.randn(1, 17, 32, requires_grad=True)
    adapter(tokens).sum().backward()
    assert bool((tokens.grad.abs().sum(-1) > 0).all())


def test_paper_adapter_is_the_default_with_attention_projections(tiny_model):
    adapter = tiny_model.adapter
    assert isinstance(adapter, PaperTokenCompressionAdapter)
    assert isinstance(adapter.attention, torch.nn.MultiheadAttention)
    assert adapter.attention.in_proj_weight.shape == (3 * 32, 32)  # its own q/k/v in-projection
    assert adapter.norm.eps == 1e-6
    assert adapter.queries.std().item() > 0.5  # random normal (std 1), as the authors start them
    assert adapter(torch.randn(3, 5, 32)).shape == (3, 4, 32)


def test_light_adapter_keeps_its_options(tiny_processor):
    config = make_tiny_config(
        len(tiny_processor.tokenizer),
        tiny_processor.image_token_id,
        adapter_type="light",
        adapter_qk_norm=True,
        adapter_position_embedding=True,
    )
    adapter = EDJEModel(config).adapter
    assert isinstance(adapter, TokenCompressionAdapter)
    assert adapter.norm.eps == 1e-5 and isinstance(adapter.mlp[1], torch.nn.GELU)
    assert adapter.value_position_embedding.shape == (1, 5, 32)


def test_local_projector_keeps_every_token():
    assert LocalProjector(32, 16, 64)(torch.randn(3, 17, 32)).shape == (3, 17, 16)


def test_one_adapter_type_picks_one_class_and_the_old_names_still_work(tiny_processor):
    assert {
        "paper": EDJEPaperAdapter,
        "light": EDJELightAdapter,
        "local": EDJELocalAdapter,
    } == ADAPTER_CLASSES
    old = (PaperTokenCompressionAdapter, TokenCompressionAdapter, LocalProjector)
    assert old == (EDJEPaperAdapter, EDJELightAdapter, EDJELocalAdapter)
    for adapter_type, cls in ADAPTER_CLASSES.items():
        config = make_tiny_config(
            len(tiny_processor.tokenizer), tiny_processor.image_token_id, adapter_type=adapter_type
        )
        assert type(EDJEModel(config).adapter) is cls


def test_a_config_that_still_has_adapter_mode_loads_and_scores_as_the_current_one(tmp_path):
    """A config.json from before `adapter_type` alone chose the adapter (it holds
    `adapter_mode`: tests/fixtures/config_with_adapter_mode.json, the quickstart model's until
    2026-12-07) loads the same adapter over the shipped weights and scores bitwise as the
    shipped config does; saved again, it drops `adapter_mode` and still scores the same."""
    import shutil

    from edje import EDJEProcessor
    from edje.quickstart import shipped_checkpoint
    from tests.helpers.paths import ROOT

    legacy = tmp_path / "legacy"
    shutil.copytree(shipped_checkpoint(), legacy)
    old_config = ROOT / "tests" / "fixtures" / "config_with_adapter_mode.json"
    assert "adapter_mode" in json.loads(old_config.read_text())
    shutil.copyfile(old_config, legacy / "config.json")
    model = EDJEModel.from_pretrained(legacy).eval()
    assert type(model.adapter) is EDJELightAdapter
    processor = EDJEProcessor.from_pretrained(legacy)
    generator = torch.Generator().manual_seed(0)
    config = model.config
    vision = torch.randn(
        2, config.vision_num_tokens, config.vision_hidden_size, generator=generator
    )
    captions = ["a small red circle left of a large blue square", "a cat"]
    inputs = processor(text=captions, image_tokens=torch.zeros(2, *config.image_token_shape))
    del inputs["image_tokens"]
    with torch.no_grad():
        logits = model(**inputs, vision_tokens=vision).logits
        current = EDJEModel.from_pretrained(shipped_checkpoint()).eval()
        assert torch.equal(current(**inputs, vision_tokens=vision).logits, logits)
    model.save_pretrained(tmp_path / "saved")
    assert "adapter_mode" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    with torch.no_grad():
        again = EDJEModel.from_pretrained(tmp_path / "saved").eval()
        assert torch.equal(again(**inputs, vision_tokens=vision).logits, logits)


def test_image_token_path_gives_one_logit_per_pair(tiny_model, tiny_processor):
    out = tiny_model(**pair_inputs(tiny_processor))
    assert out.logits.shape == (2,)
    assert out.pooled_output.shape == (2, 32)
    assert out.image_tokens.shape == (2, 4, 32)


def test_vision_token_path_runs_the_adapter(tiny_model, tiny_processor):
    inputs = tiny_processor(text=CAPTIONS, image_tokens=torch.zeros(2, 4, 32))
    del inputs["image_tokens"]
    vision_tokens = torch.randn(2, 5, 32)
    out = tiny_model(**inputs, vision_tokens=vision_tokens)
    compressed = tiny_model.compress(vision_tokens)
    assert compressed.shape == (2, 4, 32)
    torch.testing.assert_close(out.image_tokens, compressed)
    torch.testing.assert_close(out.logits, tiny_model(**inputs, image_tokens=compressed).logits)


def test_pixel_path_runs_the_frozen_vision_encoder(tiny_model, tiny_processor):
    images = [Image.fromarray(np.full((40, 30, 3), c, dtype=np.uint8)) for c in (0, 200)]
    inputs = tiny_processor(text=CAPTIONS, images=images)
    assert inputs["pixel_values"].shape == (2, 3, 28, 28)
    raw = tiny_model.encode_images(inputs["pixel_values"])
    assert raw.shape == (2, 5, 32)
    out = tiny_model(**inputs)
    torch.testing.assert_close(out.image_tokens, tiny_model.compress(raw))


def test_local_mode_keeps_all_raw_tokens(tiny_processor):
    config = make_tiny_config(
        len(tiny_processor.tokenizer), tiny_processor.image_token_id, adapter_mode="local"
    )
    assert config.image_token_shape == (5, 32)
    model = EDJEModel(config).eval()
    local_processor = type(tiny_processor)(
        image_processor=tiny_processor.image_processor,
        tokenizer=tiny_processor.tokenizer,
        num_image_tokens=5,
        max_caption_length=16,
    )
    inputs = local_processor(text=CAPTIONS, image_tokens=torch.zeros(2, 5, 32))
    del inputs["image_tokens"]
    assert model(**inputs, vision_tokens=torch.randn(2, 5, 32)).logits.shape == (2,)


def test_frozen_vision_encoder_gets_no_gradients(tiny_model, tiny_processor):
    tiny_model.train()
    images = [Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8))] * 2
    out = tiny_model(**tiny_processor(text=CAPTIONS, images=images), labels=torch.tensor([1, 0]))
    out.loss.backward()
    encoder = tiny_model.vision_encoder
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    assert not any(name.startswith("_vision") for name, _ in tiny_model.named_parameters())
    assert tiny_model.adapter.queries.grad is not None
    assert tiny_model.joint_encoder.embeddings.word_embeddings.weight.grad is not None


def test_image_token_slots_change_the_logit(tiny_model, tiny_processor):
    inputs = tiny_processor(text=CAPTIONS[0], image_tokens=torch.randn(2, 4, 32))
    logits = tiny_model(**inputs).logits
    assert not torch.allclose(logits[0], logits[1])


def test_labels_give_binary_cross_entropy(tiny_model, tiny_processor):
    inputs = pair_inputs(tiny_processor)
    labels = torch.tensor([1.0, 0.0])
    out = tiny_model(**inputs, labels=labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [((2, 4, 16), "[B, 4, 32], got [2, 4, 16]"), ((2, 3, 32), "[B, 4, 32], got [2, 3, 32]")],
)
def test_wrong_image_token_shape_names_expected_and_given(
    tiny_model, tiny_processor, shape, fragment
):
    inputs = pair_inputs(tiny_processor)
    inputs["image_tokens"] = torch.randn(*shape)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        tiny_model(**inputs)


def test_wrong_vision_token_shape_names_expected_and_given(tiny_model, tiny_processor):
    inputs = pair_inputs(tiny_processor)
    del inputs["image_tokens"]
    with pytest.raises(ValueError, match=r"\[B, 5, 32\], got \[2, 7, 32\]"):
        tiny_model(**inputs, vision_tokens=torch.randn(2, 7, 32))


def test_both_or_neither_image_inputs_are_refused(tiny_model, tiny_processor):
    inputs = pair_inputs(tiny_processor)
    with pytest.raises(
        ValueError, match=r"exactly one of.*got \['image_tokens', 'vision_tokens'\]"
    ):
        tiny_model(**inputs, vision_tokens=torch.randn(2, 5, 32))
    del inputs["image_tokens"]
    with pytest.raises(ValueError, match=r"exactly one of.*got none"):
        tiny_model(**inputs)


def test_pair_count_mismatch_is_refused(tiny_model, tiny_processor):
    inputs = pair_inputs(tiny_processor)
    inputs["image_tokens"] = torch.randn(3, 4, 32)
    with pytest.raises(ValueError, match="2 captions but 3 images"):
        tiny_model(**inputs)


def test_input_ids_without_image_slots_are_refused(tiny_model, tiny_processor):
    inputs = pair_inputs(tiny_processor)
    inputs["input_ids"] = torch.where(
        inputs["input_ids"] == tiny_processor.image_token_id, 0, inputs["input_ids"]
    )
    with pytest.raises(ValueError, match=r"must hold 4 <image> tokens.*got \[0\]"):
        tiny_model(**inputs)


def test_pixels_without_a_vision_encoder_name_say_what_to_pass(tiny_config, tiny_processor):
    model = EDJEModel(tiny_config)
    images = [Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8))]
    with pytest.raises(ValueError, match="vision_encoder_name is None"):
        model(**tiny_processor(text=CAPTIONS[:1], images=images))
