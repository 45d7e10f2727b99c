"""The paper authors' released checkpoint as an ordinary edje folder.

The authors (github.com/shahafwa/EDJE) train one `nn.Module` whose state dict holds, besides the
reranker, frozen copies of SigLIP2 and two training-only heads. Their reranker maps key for key
onto an [`EDJEModel`] with `adapter_type="paper"` (`KEY_MAP`): `vision_projection.*` (queries
1 x m x d_vis, key/value `Linear`s, `nn.MultiheadAttention`, LayerNorm, MLP `fc1`/`fc2`,
projection) -> `adapter.*`; `language_model.bert.*` (a `BertForMaskedLM` whose vocabulary ends
with `<image>`) -> `joint_encoder.*`; `classification_head.0.*` (a `BertPooler`) and
`classification_head.1.*` (`Linear(d, 1)`) -> `joint_encoder.pooler.*` and `itm_head.*`.

Left out (`DROPPED`), with no home in an `EDJEModel`: `vision_encoder.*` and `clip.*` (frozen
SigLIP2, loaded by name instead), `language_model.cls.*` (the MLM head), `text_projection.*`
(text-embedding recovery) and `text_embeddings.*` (a second name of the word embeddings).

Example (needs the Hub, or a local copy of the weights as the source):

```python
>>> from edje.authors_checkpoint import AUTHORS_REPO, convert_authors_checkpoint
>>> convert_authors_checkpoint(AUTHORS_REPO, "edje-authors")  # doctest: +SKIP
PosixPath('edje-authors')

```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edje._utils import atomic_folder
from edje.authors_facts import (
    AUTHORS_CODE,
    AUTHORS_MAX_CAPTION_LENGTH,
    AUTHORS_REPO,
    AUTHORS_TEXT,
    MINILM_L12_HEADS,
    SIGLIP_LAYER_NORM_EPS,
)
from edje.authors_vision import VisionMismatchError, config_of, vision_facts
from edje.authors_weights import AuthorsCheckpointError, load_weights, locate_weights
from edje.configuration_edje import EDJEConfig
from edje.model_card import render_model_card

# Authors' key (exact) or prefix (ending in ".") -> edje's; the rest of a prefixed key is kept.
KEY_MAP = (
    ("vision_projection.query", "adapter.queries"),
    ("vision_projection.key.", "adapter.key."),
    ("vision_projection.value.", "adapter.value."),
    ("vision_projection.attention.", "adapter.attention."),
    ("vision_projection.layernorm.", "adapter.norm."),
    ("vision_projection.mlp.fc1.", "adapter.mlp.0."),
    ("vision_projection.mlp.fc2.", "adapter.mlp.2."),
    ("vision_projection.projection.", "adapter.proj."),
    ("language_model.bert.embeddings.", "joint_encoder.embeddings."),
    ("language_model.bert.encoder.", "joint_encoder.encoder."),
    ("classification_head.0.", "joint_encoder.pooler."),
    ("classification_head.1.", "itm_head."),
)
# Prefixes with no home in an EDJEModel -> what they are (for the model card).
DROPPED = {
    "vision_encoder.": "the frozen SigLIP2 vision tower (edje loads it by name)",
    "clip.": "a frozen SigLIP2 (first stage, negative mining, text-recovery targets)",
    "language_model.cls.": "the MLM head (training only)",
    "text_projection.": "the text-embedding recovery projection (training only)",
    "text_embeddings.": "a second name of the joint encoder's word embeddings",
}
# Buffers that older transformers versions saved with the weights; never read.
BUFFERS = {
    "language_model.bert.embeddings.position_ids",
    "language_model.bert.embeddings.token_type_ids",
}
# SigLIP has no [CLS]: one position per patch token.
SIGLIP_POSITIONS = tuple(
    f"{tower}.vision_model.embeddings.position_embedding.weight"
    for tower in ("vision_encoder", "clip")
)
WORDS = "language_model.bert.embeddings.word_embeddings.weight"
# Other names of the same tensor (a safetensors file keeps one name of a shared tensor): their
# pair embedding, and BertForMaskedLM's decoder, tied to the word embeddings.
WORDS_ALIAS = "text_embeddings.weight"
TIED_DECODER = "language_model.cls.predictions.decoder.weight"
# What authors_config reads shapes from (edje names).
REQUIRED = (
    "adapter.key.weight",
    "adapter.mlp.0.weight",
    "joint_encoder.embeddings.word_embeddings.weight",
    "joint_encoder.embeddings.position_embeddings.weight",
    "joint_encoder.embeddings.token_type_embeddings.weight",
    "joint_encoder.encoder.layer.0.intermediate.dense.weight",
)


@dataclass
class AuthorsCheckpoint:
    """The authors' reranker weights under edje's key names, and what was left out."""

    state: dict[str, torch.Tensor]
    origin: str
    dropped: dict[str, int] = field(default_factory=dict)
    vision_num_tokens: int | None = None  # from the frozen SigLIP's positions, when saved

    @property
    def dtype(self) -> torch.dtype:
        return self.state["adapter.queries"].dtype


# -- reading ---------------------------------------------------------------------------------


def read_authors_checkpoint(
    source: str | Path, *, filename: str | None = None, revision: str | None = None
) -> AuthorsCheckpoint:
    """Read SOURCE (a weights file, a folder holding one, or a Hub repo id) and map its keys.

    Raises:
        AuthorsCheckpointError: an unreadable or unsafe file, or keys that are neither mapped
            nor known to be dropped (listing them).
    """
    path, origin = locate_weights(source, filename, revision)
    return map_authors_state_dict(load_weights(path), origin=origin)


# -- mapping ---------------------------------------------------------------------------------


def map_authors_state_dict(
    state: dict[str, torch.Tensor], *, origin: str = "state dict"
) -> AuthorsCheckpoint:
    """The authors' state dict under edje's key names; unknown keys raise, listing them."""
    state = dict(state)
    _fold_word_embedding_alias(state)
    mapped, dropped, unknown = {}, {}, []
    for key, tensor in state.items():
        new = _edje_key(key)
        prefix = next((p for p in DROPPED if key.startswith(p)), None)
        if new is not None:
            mapped[new] = tensor
        elif prefix is not None or key in BUFFERS:
            dropped[prefix or "buffers"] = dropped.get(prefix or "buffers", 0) + 1
        else:
            unknown.append(key)
    if unknown:
        raise AuthorsCheckpointError(
            f"edje convert: {origin} has {len(unknown)} keys that are not in the authors' "
            f"checkpoint layout (compressed adapter, BertForMaskedLM, pooler head): "
            f"{sorted(unknown)}. Nothing was written."
        )
    if "adapter.queries" not in mapped:
        raise AuthorsCheckpointError(
            f"edje convert: {origin} has no 'vision_projection.query'; expected the authors' "
            "token-compression checkpoint (the uncompressed 'local' variant is not supported)."
        )
    positions = next((state[k] for k in SIGLIP_POSITIONS if k in state), None)
    return AuthorsCheckpoint(
        state=mapped,
        origin=origin,
        dropped=dropped,
        vision_num_tokens=None if positions is None else positions.shape[0],
    )


def _edje_key(key: str) -> str | None:
    for theirs, ours in KEY_MAP:
        if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
            return ours + key[len(theirs) :]
    return None


def _fold_word_embedding_alias(state: dict[str, torch.Tensor]) -> None:
    """Their pair embedding reads `text_embeddings`, the same module as the word embeddings: a
    file that kept one name of the shared tensor still converts, two that differ are refused.
    The MLM decoder is tied to them too; it is read only when no other name was kept (it is
    dropped otherwise, so never compared)."""
    alias = state.get(WORDS_ALIAS)
    if alias is not None:
        words = state.setdefault(WORDS, alias)
        if words is not alias and not torch.equal(words, alias):
            raise AuthorsCheckpointError(
                f"edje convert: {WORDS_ALIAS} and {WORDS} differ; in the authors' model they "
                "are one tensor, so this is not their checkpoint layout."
            )
    if WORDS not in state and TIED_DECODER in state:
        state[WORDS] = state[TIED_DECODER]


# -- the model -------------------------------------------------------------------------------


def authors_config(
    checkpoint: AuthorsCheckpoint,
    *,
    vision_encoder: str | None = None,
    image_size: int | None = None,
    vision_num_heads: int | None = None,
    text_num_heads: int | None = None,
    **config_kwargs: Any,
) -> EDJEConfig:
    """The `EDJEConfig` of the authors' model, its shapes read from the weights.

    The vision encoder, its image size and heads come from the file where it tells them (the
    adapter's width, the frozen SigLIP's positions), else from the options and the named
    encoder's `config.json` (`edje.authors_vision`; refused when they disagree). The joint
    encoder's heads, which no shape gives, are `text_num_heads`, else the authors' text
    encoder's config's (MiniLM-L12-H384: 12) where it can be read and has the same width. The
    activation and eps follow the authors' code: the adapter's MLP uses the text encoder's
    `hidden_act` (BERT's exact "gelu"), its LayerNorm the vision encoder's eps (SigLIP: 1e-6).
    Captions are cleaned as theirs were (`normalize_captions`).
    """
    s = checkpoint.state
    absent = [key for key in REQUIRED if key not in s]
    if absent:
        raise AuthorsCheckpointError(
            f"edje convert: {checkpoint.origin} lacks {absent} (edje names); expected the "
            "authors' compressed-adapter checkpoint. Nothing was written."
        )
    words = s["joint_encoder.embeddings.word_embeddings.weight"]
    text_config = _text_config(s, text_num_heads)
    try:
        vision = vision_facts(
            s["adapter.key.weight"].shape[1],
            checkpoint.vision_num_tokens,
            vision_encoder=vision_encoder,
            image_size=image_size,
            num_heads=vision_num_heads,
        )
    except VisionMismatchError as error:
        raise AuthorsCheckpointError(str(error)) from None
    values = dict(
        text_config=text_config,
        vision_encoder_name=vision.name,
        vision_hidden_size=s["adapter.key.weight"].shape[1],
        vision_num_tokens=vision.num_tokens,
        vision_num_heads=vision.num_heads,
        vision_image_size=vision.image_size,
        adapter_type="paper",
        num_image_tokens=s["adapter.queries"].shape[1],
        adapter_mlp_size=s["adapter.mlp.0.weight"].shape[0],
        adapter_hidden_act=text_config["hidden_act"],
        adapter_layer_norm_eps=SIGLIP_LAYER_NORM_EPS,
        image_token_id=words.shape[0] - 1,  # `<image>` is the one token appended
        max_caption_length=AUTHORS_MAX_CAPTION_LENGTH,
        normalize_captions=True,  # the authors clean every caption (their `pre_caption`)
        base_text_encoder=AUTHORS_TEXT,
    )
    return EDJEConfig(**{**values, **config_kwargs})


def _text_config(s: dict[str, torch.Tensor], num_heads: int | None) -> dict[str, Any]:
    """The joint encoder's `BertConfig` fields, read from the weights' shapes."""
    words = s["joint_encoder.embeddings.word_embeddings.weight"]
    layers = {int(k.split(".")[3]) for k in s if k.startswith("joint_encoder.encoder.layer.")}
    return dict(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        num_hidden_layers=len(layers),
        num_attention_heads=num_heads or _text_heads(words.shape[1]),
        intermediate_size=s["joint_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=s["joint_encoder.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=s["joint_encoder.embeddings.token_type_embeddings.weight"].shape[0],
        hidden_act="gelu",
    )


def _text_heads(width: int) -> int:
    config = config_of(AUTHORS_TEXT)
    if config is not None and getattr(config, "hidden_size", None) == width:
        return config.num_attention_heads
    return MINILM_L12_HEADS


def load_authors_checkpoint(
    source: str | Path,
    model_class: type,
    *,
    filename: str | None = None,
    revision: str | None = None,
    **config_kwargs: Any,
):
    """A `model_class` (an `EDJEModel`; fp32, eval mode) with the authors' weights;
    `config_kwargs` go to [`authors_config`]. Missing or unexpected keys and wrong shapes raise,
    listing them."""
    checkpoint = read_authors_checkpoint(source, filename=filename, revision=revision)
    return model_from_checkpoint(checkpoint, model_class, **config_kwargs)


def model_from_checkpoint(checkpoint: AuthorsCheckpoint, model_class: type, **config_kwargs):
    """The `model_class` (an `EDJEModel`) holding `checkpoint`, in eval mode.

    The class comes in as an argument: `modeling_edje` reaches this module (through
    `EDJEModel.from_authors_checkpoint`), so this module never imports it back.
    """
    model = model_class(authors_config(checkpoint, **config_kwargs))
    _check_keys(model.state_dict(), checkpoint)
    model.load_state_dict(checkpoint.state, strict=True)
    return model.eval()


def _check_keys(expected: dict[str, torch.Tensor], checkpoint: AuthorsCheckpoint) -> None:
    given = checkpoint.state
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{key}: expected {list(expected[key].shape)}, got {list(given[key].shape)}"
        for key in sorted(set(expected) & set(given))
        if expected[key].shape != given[key].shape
    ]
    if missing or unexpected or shapes:
        raise AuthorsCheckpointError(
            f"edje convert: {checkpoint.origin} does not fill an EDJEModel: missing (edje "
            f"names) {missing}, unexpected {unexpected}, wrong shapes {shapes}. Nothing was "
            "written."
        )


# -- the folder ----------------------------------------------------------------------------


def convert_authors_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path = AUTHORS_TEXT,
    image_processor: str | Path | None = None,
    filename: str | None = None,
    revision: str | None = None,
    model_class: type | None = None,
    **config_kwargs: Any,
) -> Path:
    """Write the authors' checkpoint as an edje folder: config, `model.safetensors`, processor
    (tokenizer with `<image>`, SigLIP2's image processor) and a model card naming the source.

    `tokenizer` and `image_processor` are Hub ids or local folders (defaults: the authors' text
    encoder, and the vision encoder's own processor); `config_kwargs` go to `authors_config`
    (`vision_encoder`, `image_size`, heads). An image processor of another size than the
    vision encoder's is refused. `model_class` is the class written (default: the one
    transformers' `AutoModel` maps "edje" to, `EDJEModel`). Nothing appears at `out` unless
    every step succeeds.
    """
    out = Path(out)
    if out.exists():
        raise AuthorsCheckpointError(
            f"edje convert: {out} already exists; expected a new folder (remove it or choose "
            "another --out)."
        )
    checkpoint = read_authors_checkpoint(source, filename=filename, revision=revision)
    model = model_from_checkpoint(
        checkpoint, model_class or _registered_model_class(), **config_kwargs
    )
    processor = _processor(
        model.config, tokenizer, image_processor or model.config.vision_encoder_name
    )
    model.config.vision_image_processor = processor.image_processor.to_dict()
    with atomic_folder(out) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        card = render_model_card(model, results=_paper_results()) + _source_section(checkpoint)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return out


def _registered_model_class() -> type:
    """The class `AutoModel` builds for an `EDJEConfig` (`import edje` registers `EDJEModel`),
    looked up rather than imported: `modeling_edje` reaches this module, never the reverse."""
    from transformers import MODEL_MAPPING

    return MODEL_MAPPING[EDJEConfig]


def _processor(config: EDJEConfig, tokenizer: str | Path, image_processor: str | Path):
    from transformers import AutoImageProcessor, AutoTokenizer

    from edje.processing_edje import EDJEProcessor

    processor = EDJEProcessor(
        image_processor=AutoImageProcessor.from_pretrained(str(image_processor)),
        tokenizer=AutoTokenizer.from_pretrained(str(tokenizer)),
        num_image_tokens=config.num_image_tokens,
        max_caption_length=config.max_caption_length,
        normalize_captions=config.normalize_captions,
    )
    side = _processor_side(processor.image_processor)
    if side is not None and side != config.vision_image_size:
        raise AuthorsCheckpointError(
            f"edje convert: the image processor {str(image_processor)!r} resizes to {side} px "
            f"but the vision encoder {config.vision_encoder_name} runs at "
            f"{config.vision_image_size} px; give the matching --image-processor or --image-size."
        )
    vocab = config.text_config.vocab_size
    if processor.image_token_id != config.image_token_id or len(processor.tokenizer) != vocab:
        raise AuthorsCheckpointError(
            f"edje convert: tokenizer {str(tokenizer)!r} does not fit the checkpoint: expected "
            f"{vocab} tokens with <image> = {config.image_token_id} (the authors' MiniLM "
            f"uncased vocabulary plus <image>), got {len(processor.tokenizer)} with <image> = "
            f"{processor.image_token_id}."
        )
    return processor


def _processor_side(image_processor) -> int | None:
    size = getattr(image_processor, "size", None) or {}
    return size.get("height") or size.get("shortest_edge")


def _paper_results() -> str:
    return (
        "Reported in the paper (arXiv 2510.06820, Table 1), Flickr30k 1k test, zero-shot, "
        "reranking the top 10 of SigLIP2 L/16:\n\n"
        "| R@1 | first stage | reranked |\n| --- | --- | --- |\n"
        "| text -> image | 82.3 | 87.8 |\n| image -> text | 94.8 | 96.5 |\n\n"
        "Not reproduced by this conversion."
    )


def _source_section(checkpoint: AuthorsCheckpoint) -> str:
    dropped = "\n".join(
        f"- `{prefix}*` ({count} tensors): {DROPPED.get(prefix, 'non-persistent buffers')}"
        for prefix, count in sorted(checkpoint.dropped.items())
    )
    return (
        "\n\n## Source\n\n"
        f"Converted by `edje convert` from the paper authors' checkpoint `{checkpoint.origin}` "
        f"(weights in {str(checkpoint.dtype).removeprefix('torch.')}, stored here in fp32; "
        f"code: {AUTHORS_CODE}). The reranker's weights are theirs, unchanged; left out, "
        f"with no home in an EDJEModel:\n\n{dropped or '- nothing'}\n\n"
        "License: not stated in the parts of the source model page that edje's developers "
        "could read; the authors' training code carries a BSD 3-Clause header. Check the "
        f"source repository (https://huggingface.co/{AUTHORS_REPO}) before redistributing.\n"
    )


__all__ = [
    "AUTHORS_REPO",
    "KEY_MAP",
    "AuthorsCheckpoint",
    "AuthorsCheckpointError",
    "authors_config",
    "convert_authors_checkpoint",
    "load_authors_checkpoint",
    "map_authors_state_dict",
    "model_from_checkpoint",
    "read_authors_checkpoint",
]
