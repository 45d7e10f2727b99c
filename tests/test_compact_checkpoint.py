"""Compact checkpoints: only what differs from the pip-installed text encoder, in fp16."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from edje import EDJEModel, EDJEProcessor
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
from edje.compact_checkpoint import COMPACT_WEIGHTS

OPTIONS = dict(vision=OFFLINE_VISION, text=OFFLINE_TEXT, vision_image_size=112)


@pytest.fixture(scope="module")
def fine_tuned():
    """An EDJE on the offline backbones whose last joint layer, adapter and head changed, as
    after training with frozen word embeddings (values kept fp16-representable)."""
    torch.manual_seed(0)
    model = EDJEModel.from_backbones(**OPTIONS, num_image_tokens=4, adapter_mlp_size=64).eval()
    changed = [
        *model.joint_encoder.encoder.layer[-1].parameters(),
        *model.adapter.parameters(),
        *model.itm_head.parameters(),
    ]
    with torch.no_grad():
        for param in changed:
            param.add_(0.01 * torch.randn_like(param)).copy_(param.half().float())
    return model


def test_compact_checkpoint_keeps_only_changed_weights_and_scores_identically(fine_tuned, tmp_path):
    fine_tuned.save_pretrained(tmp_path, compact=True)
    assert not (tmp_path / "model.safetensors").exists()  # transformers alone cannot misload it
    with safe_open(tmp_path / COMPACT_WEIGHTS, "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float16}
    assert not any("word_embeddings" in k or "layer.0." in k for k in keys)
    assert any(k.startswith("joint_encoder.encoder.layer.5.") for k in keys)
    card = (tmp_path / "README.md").read_text()  # says edje is needed, not remote code alone
    assert "compact" in card and "pip install edje" in card and "trust_remote_code" not in card
    full_bytes = sum(t.numel() * 2 for t in fine_tuned.state_dict().values())
    assert (tmp_path / COMPACT_WEIGHTS).stat().st_size < 0.5 * full_bytes

    loaded = EDJEModel.from_pretrained(tmp_path).eval()
    assert not loaded.config.compact_checkpoint
    processor = EDJEProcessor.from_backbones(**OPTIONS, num_image_tokens=4)
    inputs = processor(
        text=["a red circle", "a small blue square left of a star"],
        image_tokens=torch.randn(2, 4, 384),
    )
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, fine_tuned(**inputs).logits)


def test_compact_needs_the_base_encoder_name(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="base_text_encoder is None"):
        tiny_model.save_pretrained(tmp_path, compact=True)
