"""What `EDJEModel` can do only where edje is installed: build from named backbones, load
vision encoders by edje's names, fingerprint stores, model cards and the authors' checkpoint.

`modeling_edje.py` ships beside saved weights as remote code that must load without edje, so
it reaches all of this through this one module, imported in one guarded place.
"""

from __future__ import annotations

from typing import Any

import torch

from edje.authors_checkpoint import load_authors_checkpoint
from edje.backbones import load_text_encoder, load_vision_encoder, vision_encoder_spec
from edje.configuration_edje import IMAGE_TOKEN, EDJEConfig
from edje.model_card import write_model_card
from edje.store.fingerprint import RAW_ADAPTER, state_dict_sha256, store_fingerprint

__all__ = [
    "build_from_backbones",
    "load_authors_checkpoint",
    "record_vision_sha256",
    "store_fingerprint_of",
    "vision_encoder_by_name",
    "write_model_card",
]


def vision_encoder_by_name(config: EDJEConfig) -> torch.nn.Module:
    """`config.vision_encoder_name` as edje names it (Hub id, folder or offline name)."""
    model, _ = load_vision_encoder(config.vision_encoder_name, image_size=config.vision_image_size)
    return model


def record_vision_sha256(model) -> str | None:
    """The vision encoder's weight hash as the config records it, else of the encoder already
    attached (recorded then); None when neither: a vision encoder (1.2 GB for SigLIP2-L) is
    never loaded only to be hashed."""
    config = model.config
    if config.vision_encoder_sha256 is None and model.has_vision_encoder:
        config.vision_encoder_sha256 = state_dict_sha256(model.vision_encoder)
    return config.vision_encoder_sha256


def store_fingerprint_of(model, raw: bool) -> dict:
    """The fingerprint of the stores `model` makes (see `EDJEModel.store_fingerprint`)."""
    config = model.config
    return store_fingerprint(
        config.vision_encoder_name,
        record_vision_sha256(model),
        config.vision_image_processor,
        RAW_ADAPTER if raw else state_dict_sha256(model.adapter),
    )


def build_from_backbones(
    cls, vision: str, text: str, *, vision_image_size: int | None = None, **config_kwargs: Any
):
    """A new `cls` (an `EDJEModel`) around two backbones; see `EDJEModel.from_backbones`."""
    vision_model, image_processor = load_vision_encoder(vision, image_size=vision_image_size)
    spec = vision_encoder_spec(vision_model, image_processor)
    if spec["model_type"].startswith("siglip2"):
        raise ValueError(
            f"EDJEModel.from_backbones: {vision!r} is a SigLIP2 NaFlex model, whose forward "
            "needs per-image patch masks; use a fixed-resolution SigLIP2 checkpoint such as "
            "google/siglip2-large-patch16-384 (model type 'siglip')."
        )
    text_model, tokenizer = load_text_encoder(text)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text_config = text_model.config.to_dict()
    text_config["vocab_size"] = len(tokenizer)
    # As the authors build the paper's adapter: the MLP activation from the text encoder's
    # config, the LayerNorm eps from the vision encoder's (explicit kwargs win).
    config_kwargs.setdefault("adapter_hidden_act", text_model.config.hidden_act)
    vision_eps = getattr(vision_model.config, "layer_norm_eps", None)
    if vision_eps is not None:
        config_kwargs.setdefault("adapter_layer_norm_eps", vision_eps)
    config = EDJEConfig(
        text_config=text_config,
        vision_encoder_name=vision,
        vision_hidden_size=spec["hidden_size"],
        vision_num_tokens=spec["num_tokens"],
        vision_num_heads=spec["num_heads"],
        vision_image_size=spec["image_size"],
        vision_image_processor=image_processor.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        sep_token_id=tokenizer.sep_token_id,
        mask_token_id=tokenizer.mask_token_id,
        base_text_encoder=text,
        **config_kwargs,
    )
    model = cls(config, vision_encoder=vision_model)
    text_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    missing, unexpected = model.joint_encoder.load_state_dict(text_model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise ValueError(
            f"EDJEModel.from_backbones: text encoder {text!r} does not fit a BertModel "
            f"(missing {missing}, unexpected {unexpected})."
        )
    return model
