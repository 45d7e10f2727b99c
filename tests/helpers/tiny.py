"""Tiny random EDJE models (width 32, 2 layers; a 28 px DINOv2 with patch 14 -> 5 raw tokens)
and what tests do to them. The fixtures built from these are in tests/conftest.py."""

from __future__ import annotations

TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_IMAGE_SIZE, TINY_PATCH = 28, 14  # 2 x 2 patches + CLS = 5 raw tokens


def make_tiny_config(tokenizer_size: int, image_token_id: int, **overrides):
    from edje import EDJEConfig

    values = dict(
        text_config=dict(TINY_VISION, vocab_size=tokenizer_size),
        vision_hidden_size=32,
        vision_num_tokens=5,
        vision_num_heads=2,
        num_image_tokens=4,
        adapter_mlp_size=64,
        image_token_id=image_token_id,
        max_caption_length=16,
    )
    values.update(overrides)
    return EDJEConfig(**values)


def make_tiny_config_on_offline_dinov2(tokenizer_size: int, **overrides):
    """A tiny joint encoder (width 64, 2 layers) over the offline DINOv2-S's raw tokens at
    112 px (65 of width 384), for training on a real raw store; <image> is the last id.
    `text_config` entries given are added to the tiny one's."""
    text = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=tokenizer_size,
    )
    text.update(overrides.pop("text_config", {}))
    values = dict(
        text_config=text,
        vision_hidden_size=384,
        vision_num_tokens=65,
        vision_num_heads=6,
        max_caption_length=32,
    )
    values.update(overrides)
    return make_tiny_config(tokenizer_size, tokenizer_size - 1, **values)


def make_tiny_model(processor, vision_encoder, seed: int = 0):
    """A tiny EDJE whose config names its vision encoder and preprocessing (for stores)."""
    import torch

    from edje import EDJEModel

    config = make_tiny_config(
        len(processor.tokenizer),
        processor.image_token_id,
        vision_encoder_name="tiny/dinov2",
        vision_image_processor=processor.image_processor.to_dict(),
    )
    torch.manual_seed(seed)
    return EDJEModel(config, vision_encoder=vision_encoder).eval()


def crowded_tokens(fp32_reranker, caption: str, seed: int, near: int = 12, far: int = 36):
    """Candidate tokens `[near + far, 4, 32]` for a tiny model (exact mode's tests), shuffled:
    `near` small perturbations of the best of 200 random images for `caption` (their logits a
    few 1e-3 apart, under bf16's rounding, so bf16 swaps them) among `far` random ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(200, 4, 32, generator=g)
    logits = fp32_reranker.predict([(caption, t) for t in pool], convert_to_tensor=True)
    base = pool[int(logits.argmax())]
    tokens = torch.cat([base + 0.02 * torch.randn(near, 4, 32, generator=g), pool[:far]])
    return tokens[torch.randperm(len(tokens), generator=g)]


def spread_weights_(model):
    """Random, non-trivial joint-encoder weights, biases and LayerNorms so every term matters and
    scores spread (std about 0.2-1; the default init, std 0.02, gives nearly equal logits)."""
    import torch

    with torch.no_grad():
        for name, p in [
            *model.joint_encoder.named_parameters(),
            *model.itm_head.named_parameters(),
        ]:
            if "LayerNorm" in name or "bias" in name:
                p.normal_(0.0 if "bias" in name else 1.0, 0.1)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model
