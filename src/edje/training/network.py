"""The network trained by `EDJETrainingModule`: an EDJEModel plus its training-only heads."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edje.modeling_edje import EDJEModel


class EDJEForPreTraining(nn.Module):
    """EDJE with the heads its objectives need; `edje` is what gets exported.

    - MLM: transform (dense, GELU, LayerNorm) then the joint encoder's word embeddings
      (transposed) and a bias, so the head adds no vocabulary-sized matrix.
    - Text-embedding recovery: `[CLS]` of the caption alone -> Linear(d -> text_embedding_dim).

    Build from exactly one source: an `EDJEModel`, a saved EDJE (`pretrained`, folder or Hub id),
    or two backbones (`vision` and `text`, with `EDJEConfig` fields in `config`).
    `freeze_word_embeddings` leaves the joint encoder's word embeddings as the text encoder's
    (11.7M weights for MiniLM), so a compact checkpoint need not store them.

    Example:

    ```python
    >>> from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
    >>> net = EDJEForPreTraining(vision=OFFLINE_VISION, text=OFFLINE_TEXT,
    ...     text_embedding_dim=256, config={"num_image_tokens": 16, "adapter_mlp_size": 1024})
    >>> net.edje.config.image_token_shape, net.text_embedding_head.out_features
    ((16, 384), 256)

    ```
    """

    def __init__(
        self,
        edje: EDJEModel | None = None,
        *,
        pretrained: str | None = None,
        vision: str | None = None,
        text: str | None = None,
        vision_image_size: int | None = None,
        text_embedding_dim: int | None = None,
        mlm: bool = True,
        freeze_word_embeddings: bool = False,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        sources = [edje is not None, pretrained is not None, vision is not None or text is not None]
        if sum(sources) != 1:
            raise ValueError(
                "EDJEForPreTraining: give exactly one of edje, pretrained, or vision + text; got "
                f"edje={edje is not None}, pretrained={pretrained!r}, vision={vision!r}, "
                f"text={text!r}."
            )
        if (edje is not None or pretrained is not None) and (config or vision_image_size):
            raise ValueError(
                "EDJEForPreTraining: config and vision_image_size shape a model built from "
                "backbones; a given or saved model keeps its own. Got them with "
                f"pretrained={pretrained!r} (on the command line, set "
                "--model.network.init_args.config null and ...vision_image_size null)."
            )
        if pretrained is not None:
            edje = EDJEModel.from_pretrained(pretrained)
        elif edje is None:
            if vision is None or text is None:
                raise ValueError("EDJEForPreTraining: vision and text backbones go together.")
            edje = EDJEModel.from_backbones(
                vision=vision, text=text, vision_image_size=vision_image_size, **(config or {})
            )
        self.edje = edje
        if freeze_word_embeddings:  # keeps them the text encoder's: compact checkpoints skip them
            edje.joint_encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        text_config = edje.config.text_config
        hidden = text_config.hidden_size
        self.mlm_transform = (
            nn.Sequential(
                nn.Linear(hidden, hidden),
                nn.GELU(),
                nn.LayerNorm(hidden, eps=text_config.layer_norm_eps),
            )
            if mlm
            else None
        )
        self.mlm_bias = nn.Parameter(torch.zeros(text_config.vocab_size)) if mlm else None
        self.text_embedding_head = (
            nn.Linear(hidden, text_embedding_dim) if text_embedding_dim else None
        )
        self.train()  # a saved model loads in eval mode; a network built to train starts training

    def itm_logits(self, pairs: dict[str, torch.Tensor], image_tokens: torch.Tensor):
        """One match logit per pair, `[B]`."""
        return self.edje(**pairs, image_tokens=image_tokens).logits

    def mlm_logits(
        self, pairs: dict[str, torch.Tensor], image_tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Vocabulary logits `[P, V]` at the `positions` (bool `[B, L]`) of masked pairs."""
        if self.mlm_transform is None:
            raise ValueError("EDJEForPreTraining was built with mlm=False: it has no MLM head.")
        hidden = self.edje.encode_pairs(**pairs, image_tokens=image_tokens).last_hidden_state
        states = self.mlm_transform(hidden[positions])  # (P, d)
        words = self.edje.joint_encoder.embeddings.word_embeddings.weight
        return F.linear(states, words, self.mlm_bias)

    def text_embedding(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor):
        """The caption alone through the joint encoder, `[CLS]` -> `[B, text_embedding_dim]`."""
        if self.text_embedding_head is None:
            raise ValueError(
                "EDJEForPreTraining was built without text_embedding_dim: it has no "
                "text-embedding head."
            )
        # Right-padded captions: columns past the longest hold padding only. Batches pad to the
        # maximum length (equal shapes across processes), which would otherwise triple the work.
        width = int(caption_mask.sum(dim=1).max())
        caption_ids, caption_mask = caption_ids[:, :width], caption_mask[:, :width]
        hidden = self.edje.joint_encoder(
            input_ids=caption_ids,
            attention_mask=caption_mask,
            token_type_ids=torch.zeros_like(caption_ids),
        ).last_hidden_state
        return self.text_embedding_head(hidden[:, 0])
