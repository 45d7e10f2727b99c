"""EDJEConfig: defaults from the paper, validation, serialisation, AutoConfig."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, BertConfig

from edje import EDJEConfig


def test_defaults_follow_the_paper():
    config = EDJEConfig()
    assert config.num_image_tokens == 64
    assert config.image_token_shape == (64, 384)
    assert config.max_caption_length == 64
    assert config.adapter_mode == "compressed"
    assert config.adapter_mlp_size == 8192
    assert config.adapter_num_heads == config.vision_num_heads
    assert config.adapter_type == "paper"
    assert (config.adapter_hidden_act, config.adapter_layer_norm_eps) == ("gelu", 1e-6)


def test_local_mode_keeps_every_raw_token():
    assert EDJEConfig(adapter_mode="local", vision_num_tokens=257).image_token_shape == (257, 384)
    assert EDJEConfig(adapter_type="local", vision_num_tokens=257).image_token_shape == (257, 384)


@pytest.mark.parametrize(
    ("saved", "adapter_type"),
    [
        ({"adapter_mode": "local"}, "local"),
        ({"adapter_mode": "local", "adapter_type": "paper"}, "local"),
        ({"adapter_mode": "compressed", "adapter_type": "light"}, "light"),
        ({"adapter_mode": "compressed"}, "paper"),
    ],
)
def test_an_old_config_with_adapter_mode_loads_as_one_adapter_type(tmp_path, saved, adapter_type):
    """Configs saved before `adapter_type` alone picked the adapter still load, and save
    again with `adapter_type` only."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "edje", **saved}))
    config = EDJEConfig.from_pretrained(tmp_path)
    assert config.adapter_type == adapter_type
    assert config.adapter_mode == ("local" if adapter_type == "local" else "compressed")
    assert "adapter_mode" not in config.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"adapter_mode": "pooled"},
            r"adapter_mode must be one of \('compressed', 'local'\), got 'pooled'",
        ),
        ({"num_image_tokens": 0}, "num_image_tokens must be a positive int, got 0"),
        ({"adapter_mlp_size": 1.5}, "adapter_mlp_size must be a positive int, got 1.5"),
        (
            {"vision_hidden_size": 30, "vision_num_heads": 4},
            r"vision_hidden_size \(30\) must be divisible",
        ),
        ({"max_caption_length": 2}, "at least 3, got 2"),
        ({"num_image_tokens": 500}, "max_position_embeddings=512"),
        ({"image_token_id": 30522}, r"image_token_id must be in \[0, 30522\) .*, got 30522"),
        (
            {"adapter_type": "perceiver"},
            r"adapter_type must be one of \('paper', 'light', 'local'\), got 'perceiver'",
        ),
        ({"adapter_hidden_act": "swishy"}, r"ACT2FN .*, got 'swishy'"),
        (
            {"adapter_qk_norm": True},
            r"adapter_qk_norm exist only in the light adapter; expected adapter_type='light' "
            r"with them, got adapter_type='paper'",
        ),
    ],
)
def test_invalid_values_raise_value_error_naming_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EDJEConfig(**kwargs)


def test_round_trip_through_a_folder_and_auto_config(tmp_path):
    config = EDJEConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
        vision_encoder_name="edje:dinov2-small",
        num_image_tokens=8,
        image_token_id=7,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EDJEConfig)
    assert isinstance(loaded.text_config, BertConfig)
    assert loaded.text_config.hidden_size == 32
    assert loaded.to_diff_dict() == config.to_diff_dict()


def test_auto_config_resolves_the_model_type():
    assert isinstance(AutoConfig.for_model("edje"), EDJEConfig)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"adapter_mlp_size": 10_000_000},
        {"vision_hidden_size": 600_000, "vision_num_heads": 1},
        {"text_config": {"vocab_size": 10_000_000_000}},
        {"text_config": {"num_hidden_layers": 100_000}},
    ],
    ids=["mlp", "vision-width", "vocab", "layers"],
)
def test_sizes_past_the_parameter_bound_are_refused_before_anything_is_allocated(kwargs, tmp_path):
    import json
    import time

    from edje import EDJEModel

    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"billion parameters .* at most 2 billion"):
        EDJEConfig(**kwargs)
    config = EDJEConfig().to_dict()
    config.update({k: v for k, v in kwargs.items() if k != "text_config"})
    config["text_config"].update(kwargs.get("text_config", {}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"at most 2 billion"):
        EDJEModel.from_pretrained(tmp_path)  # a downloaded folder's config.json: the same
    assert time.perf_counter() - started < 10  # refused, not allocated and then refused
    assert EDJEConfig().parameter_estimate()["joint encoder"] < 40_000_000  # MiniLM-L12 size
