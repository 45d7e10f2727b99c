"""EDJE model configuration."""

from __future__ import annotations

import html
import string
import unicodedata
from collections.abc import Sequence
from typing import Any, ClassVar

from transformers import BertConfig, PretrainedConfig
from transformers.activations import ACT2FN

# "paper": the adapter of the paper and its authors' code; "light": edje's smaller one (no
# attention in/out projections, exact GELU, LayerNorm eps 1e-5, optional qk norm and value
# positions), which the shipped quickstart checkpoint uses; "local": no compression.
ADAPTER_TYPES = ("paper", "light", "local")
# What configs saved before `adapter_type` alone chose the adapter carry as `adapter_mode`.
ADAPTER_MODES = ("compressed", "local")
# The token whose input embeddings the image tokens replace in the joint encoder.
IMAGE_TOKEN = "<image>"
# The most parameters a config may ask for (8 GB in float32; the paper's EDJE has about 60M):
# sizes are checked before anything is allocated, so a typo is an error, not minutes of swap.
MAX_PARAMETERS = 2_000_000_000


# Typographic quotes become ASCII ones before punctuation is dropped, as open_clip's ftfy pass
# does ("uncurl quotes"); the rest of ftfy repairs broken Unicode, which well-formed text lacks.
_CURLY_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_caption(caption: str) -> str:
    """The paper's authors' caption cleaning (their `pre_caption`, open_clip's `basic_clean`
    then `canonicalize_text`): HTML entities decoded, `_` read as a space, ASCII punctuation
    removed, lowercased, runs of whitespace made one space, ends stripped.

    Example:

    ```python
    >>> clean_caption("A Dog's  toy_box, &amp; two BALLS .")
    'a dogs toy box two balls'

    ```
    """
    text = unicodedata.normalize("NFC", caption).translate(_CURLY_QUOTES)
    text = html.unescape(html.unescape(text)).strip()
    text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
    return " ".join(text.split())


class EDJEConfig(PretrainedConfig):
    r"""Configuration of an [`EDJEModel`]: the vision encoder it reads, adapter, joint encoder.

    Args:
        text_config (`dict` or `BertConfig`, *optional*):
            The joint encoder (a BERT-style encoder). Its `hidden_size` is the width of the stored
            image tokens; its vocabulary includes the `<image>` token.
        vision_encoder_name (`str`, *optional*):
            The frozen vision encoder the raw tokens come from: a Hub id, a local folder, or one of
            the offline names in `edje.backbones`. Only needed to encode pixels.
        vision_hidden_size (`int`, defaults to 384):
            Width `d_vis` of the raw vision tokens.
        vision_num_tokens (`int`, defaults to 257):
            Number `n` of raw vision tokens per image (CLS, registers and patches).
        vision_num_heads (`int`, defaults to 6):
            Heads of the vision encoder; the adapter's cross-attention uses as many by default.
        vision_image_size (`int`, *optional*):
            Side in pixels the vision encoder was run at.
        vision_image_processor (`dict`, *optional*):
            The image processor's settings (`to_dict()`): with the encoder's name and weights,
            what made the raw tokens, recorded for token-store fingerprints.
        example_captions (`list[str]`, *optional*):
            A few training captions, recorded at export: `edje search` shows them when a query
            scores nothing, as examples of what the model knows.
        vision_encoder_sha256 (`str`, *optional*):
            The hash of the vision encoder's weights (`edje.store.state_dict_sha256`), recorded
            at save so checking a token store against the model needs no vision encoder.
        adapter_type (`str`, defaults to `"paper"`):
            The adapter, one class each: `"paper"` ([`EDJEPaperAdapter`]: `num_image_tokens`
            learned queries, key and value projections, then `nn.MultiheadAttention` with its own
            in/out projections, as in the paper), `"light"` ([`EDJELightAdapter`], edje's
            smaller compressing variant) or `"local"` ([`EDJELocalAdapter`]: a per-token MLP over
            all `n` raw tokens, the uncompressed teacher). Configs saved before this setting
            alone chose carry `adapter_mode` (`"compressed"` or `"local"`); they load the same.
        num_image_tokens (`int`, defaults to 64):
            Tokens `m` stored per image by a compressing adapter. Ignored by `"local"`, which
            keeps every raw token.
        adapter_num_heads (`int`, *optional*):
            Heads of the adapter's cross-attention; defaults to `vision_num_heads`.
        adapter_mlp_size (`int`, defaults to 8192):
            Hidden width of the adapter's MLP.
        adapter_hidden_act (`str`, defaults to `"gelu"`), adapter_layer_norm_eps (`float`, defaults
        to 1e-6):
            The `"paper"` adapter's MLP activation (a transformers `ACT2FN` name) and LayerNorm
            eps. The authors take the activation from the text encoder's config and the eps from
            the vision encoder's (MiniLM: `"gelu"`, SigLIP: 1e-6); `from_backbones` does the
            same. The `"light"` adapter always uses exact GELU and eps 1e-5.
        adapter_qk_norm (`bool`, defaults to `False`):
            `"light"` adapter only: LayerNorm its queries and keys (not in the paper; steadies
            small-data training).
        adapter_position_embedding (`bool`, defaults to `False`):
            `"light"` adapter only: learn a position embedding added to its values, started from
            fixed 2D sine-cosine positions of the patch grid, so each pooled token carries where
            its content lies (not in the paper; it gives relations such as "left of" a path).
        image_token_id (`int`, *optional*):
            Token id of `<image>`: the slots whose input embeddings the image tokens replace.
        sep_token_id (`int`, defaults to 102), mask_token_id (`int`, defaults to 103):
            The tokenizer's `[SEP]` and `[MASK]` ids (BERT's uncased vocabulary by default), for
            building pairs and masking captions in training.
        base_text_encoder (`str`, *optional*):
            The text encoder the joint encoder started from (recorded by `from_backbones`); a
            compact checkpoint stores only what differs from it.
        compact_checkpoint (`bool`, defaults to `False`):
            Set in saved configs whose weights are compact (see `edje.compact_checkpoint`).
        max_caption_length (`int`, defaults to 64):
            Caption tokens kept, `[CLS]` and `[SEP]` included; longer captions are truncated.
        normalize_captions (`bool`, defaults to `False`):
            Pass every caption through [`clean_caption`] (the authors' cleaning: lowercase,
            punctuation removed, whitespace collapsed) before the first stage and EDJE read it.
            On for converted authors' checkpoints, which were trained and evaluated that way.
        fusion_edje_weight (`float`, defaults to 1.0), fusion_first_stage_weight (`float`):
            Score fusion (`edje.fusion`): candidates with first-stage similarities are ranked by
            `fusion_edje_weight * logit + fusion_first_stage_weight * similarity`; chosen on
            validation data at export. `None`: EDJE's logit alone.
        score_error_bounds (`dict`, *optional*):
            Per fast dtype (`"bfloat16"`), the calibration record of exact mode
            (`edje.scoring.exact`): `bound` (the largest |fast logit - fp32 logit| measured on
            `pairs` pairs, times `safety_margin`), `max_abs_diff`, `pairs`, `device`.
            Written by `edje calibrate`; `None`: not measured (exact mode then needs a bound).

    Example:

    ```python
    >>> from edje import EDJEConfig
    >>> config = EDJEConfig(text_config={"hidden_size": 32, "num_hidden_layers": 2,
    ...     "num_attention_heads": 2, "intermediate_size": 64}, vision_hidden_size=32,
    ...     vision_num_tokens=17, vision_num_heads=2, num_image_tokens=4,
    ...     adapter_mlp_size=64, image_token_id=5)
    >>> config.image_token_shape
    (4, 32)

    ```
    """

    model_type = "edje"
    sub_configs: ClassVar[dict[str, type]] = {"text_config": BertConfig}

    def __init__(
        self,
        text_config: dict[str, Any] | BertConfig | None = None,
        vision_encoder_name: str | None = None,
        vision_hidden_size: int = 384,
        vision_num_tokens: int = 257,
        vision_num_heads: int = 6,
        vision_image_size: int | None = None,
        vision_image_processor: dict[str, Any] | None = None,
        vision_encoder_sha256: str | None = None,
        example_captions: list[str] | None = None,
        adapter_type: str = "paper",
        num_image_tokens: int = 64,
        adapter_num_heads: int | None = None,
        adapter_mlp_size: int = 8192,
        adapter_hidden_act: str = "gelu",
        adapter_layer_norm_eps: float = 1e-6,
        adapter_qk_norm: bool = False,
        adapter_position_embedding: bool = False,
        image_token_id: int | None = None,
        sep_token_id: int = 102,
        mask_token_id: int = 103,
        max_caption_length: int = 64,
        normalize_captions: bool = False,
        base_text_encoder: str | None = None,
        compact_checkpoint: bool = False,
        fusion_edje_weight: float = 1.0,
        fusion_first_stage_weight: float | None = None,
        score_error_bounds: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ):
        self.text_config = _bert_config(text_config)
        self.vision_encoder_name = vision_encoder_name
        self.vision_hidden_size = vision_hidden_size
        self.vision_num_tokens = vision_num_tokens
        self.vision_num_heads = vision_num_heads
        self.vision_image_size = vision_image_size
        self.vision_image_processor = vision_image_processor
        self.vision_encoder_sha256 = vision_encoder_sha256
        self.example_captions = example_captions
        self.adapter_type = _legacy_adapter_type(adapter_type, kwargs.pop("adapter_mode", None))
        self.num_image_tokens = num_image_tokens
        self.adapter_num_heads = adapter_num_heads or vision_num_heads
        self.adapter_mlp_size = adapter_mlp_size
        self.adapter_hidden_act = adapter_hidden_act
        self.adapter_layer_norm_eps = adapter_layer_norm_eps
        self.adapter_qk_norm = adapter_qk_norm
        self.adapter_position_embedding = adapter_position_embedding
        self.image_token_id = image_token_id
        self.sep_token_id = sep_token_id
        self.mask_token_id = mask_token_id
        self.max_caption_length = max_caption_length
        self.normalize_captions = normalize_captions
        self.base_text_encoder = base_text_encoder
        self.compact_checkpoint = compact_checkpoint
        self.fusion_edje_weight = fusion_edje_weight
        self.fusion_first_stage_weight = fusion_first_stage_weight
        self.score_error_bounds = score_error_bounds
        super().__init__(**kwargs)
        self._validate()

    def prepare_captions(self, captions: Sequence[str]) -> list[str]:
        """Captions as this model reads them (`normalize_captions`), for the first stage and
        any other reader of the same text."""
        return [clean_caption(c) for c in captions] if self.normalize_captions else list(captions)

    @property
    def adapter_mode(self) -> str:
        """`"local"` for the local adapter, else `"compressed"` (read-only: `adapter_type`
        alone picks the adapter; setting it maps onto `adapter_type`, as old configs load)."""
        return "local" if self.adapter_type == "local" else "compressed"

    @adapter_mode.setter
    def adapter_mode(self, value: str) -> None:
        compressing = "paper" if self.adapter_type == "local" else self.adapter_type
        self.adapter_type = _legacy_adapter_type(compressing, value)

    @property
    def tokens_per_image(self) -> int:
        """Tokens each image contributes to the joint encoder (`m`, or `n` for the local
        adapter)."""
        return self.vision_num_tokens if self.adapter_type == "local" else self.num_image_tokens

    @property
    def image_token_shape(self) -> tuple[int, int]:
        """Shape of one image's stored tokens: `(tokens_per_image, joint hidden size)`."""
        return (self.tokens_per_image, self.text_config.hidden_size)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # Where the text encoder's config was read from: often a local path (the offline
        # package's folder), which a saved file must not carry; base_text_encoder names it.
        out["text_config"].pop("_name_or_path", None)
        return out

    def _validate(self) -> None:
        self._validate_adapter_type()
        if not isinstance(self.normalize_captions, bool):
            raise ValueError(
                f"EDJEConfig: normalize_captions must be a bool, got {self.normalize_captions!r}."
            )
        positive = {
            "vision_hidden_size": self.vision_hidden_size,
            "vision_num_tokens": self.vision_num_tokens,
            "vision_num_heads": self.vision_num_heads,
            "num_image_tokens": self.num_image_tokens,
            "adapter_num_heads": self.adapter_num_heads,
            "adapter_mlp_size": self.adapter_mlp_size,
            "max_caption_length": self.max_caption_length,
        }
        _check_positive_ints(positive)
        if self.vision_hidden_size % self.adapter_num_heads:
            raise ValueError(
                f"EDJEConfig: vision_hidden_size ({self.vision_hidden_size}) must be divisible by "
                f"adapter_num_heads ({self.adapter_num_heads})."
            )
        if self.max_caption_length < 3:
            raise ValueError(
                "EDJEConfig: max_caption_length counts [CLS] and [SEP], so it must be at least 3, "
                f"got {self.max_caption_length}."
            )
        total = self.max_caption_length + self.tokens_per_image + 1
        positions = self.text_config.max_position_embeddings
        if total > positions:
            raise ValueError(
                f"EDJEConfig: a pair takes up to {total} positions (caption "
                f"{self.max_caption_length} + image {self.tokens_per_image} + [SEP]), but the "
                f"joint encoder has max_position_embeddings={positions}."
            )
        self._validate_size()
        vocab = self.text_config.vocab_size
        if self.image_token_id is not None and not 0 <= self.image_token_id < vocab:
            raise ValueError(
                f"EDJEConfig: image_token_id must be in [0, {vocab}) (the joint encoder's "
                f"vocabulary), got {self.image_token_id}."
            )

    def parameter_estimate(self) -> dict[str, int]:
        """About how many parameters the adapter and the joint encoder take, by the sizes that
        drive them (biases and norms left out)."""
        text = self.text_config
        d_vis, width, mlp = self.vision_hidden_size, text.hidden_size, self.adapter_mlp_size
        layer = 4 * width * width + 2 * width * text.intermediate_size
        return {
            "adapter": 6 * d_vis * d_vis + self.num_image_tokens * d_vis + 2 * d_vis * mlp
            + (d_vis + mlp) * width,
            "joint encoder": text.num_hidden_layers * layer
            + (text.vocab_size + text.max_position_embeddings) * width,
        }  # fmt: skip

    def _validate_size(self) -> None:
        text = self.text_config
        sizes = {
            "text_config.hidden_size": text.hidden_size,
            "text_config.intermediate_size": text.intermediate_size,
            "text_config.num_hidden_layers": text.num_hidden_layers,
            "text_config.vocab_size": text.vocab_size,
            "text_config.max_position_embeddings": text.max_position_embeddings,
        }
        _check_positive_ints(sizes)
        parts = self.parameter_estimate()
        total = sum(parts.values())
        if total > MAX_PARAMETERS:
            largest = max(parts, key=parts.get)
            raise ValueError(
                f"EDJEConfig: these sizes make about {total / 1e9:.1f} billion parameters "
                f"({total * 4 / 1e9:.0f} GB in float32, most in the {largest}: adapter_mlp_size="
                f"{self.adapter_mlp_size}, vision_hidden_size={self.vision_hidden_size}, "
                f"hidden_size={text.hidden_size}, intermediate_size={text.intermediate_size}, "
                f"num_hidden_layers={text.num_hidden_layers}, vocab_size={text.vocab_size}); "
                f"edje takes at most {MAX_PARAMETERS / 1e9:g} billion. Is a size mistyped?"
            )

    def _validate_adapter_type(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(
                f"EDJEConfig: adapter_type must be one of {ADAPTER_TYPES}, "
                f"got {self.adapter_type!r}."
            )
        if self.adapter_hidden_act not in ACT2FN:
            raise ValueError(
                "EDJEConfig: adapter_hidden_act must be an activation name of transformers' "
                f"ACT2FN (such as 'gelu' or 'gelu_pytorch_tanh'), got {self.adapter_hidden_act!r}."
            )
        light_only = [
            name
            for name in ("adapter_qk_norm", "adapter_position_embedding")
            if getattr(self, name)
        ]
        if self.adapter_type != "light" and light_only:
            raise ValueError(
                f"EDJEConfig: {', '.join(light_only)} exist only in the light adapter; expected "
                f"adapter_type='light' with them, got adapter_type={self.adapter_type!r}."
            )


def _bert_config(text_config: dict[str, Any] | BertConfig | None) -> BertConfig:
    """The joint encoder's config: MiniLM-H384-shaped by default."""
    if text_config is None:
        return BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    if isinstance(text_config, dict):
        return BertConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
    return text_config


def _legacy_adapter_type(adapter_type: str, adapter_mode: str | None) -> str:
    """`adapter_type`, or `"local"` for a config saved with `adapter_mode="local"` (older
    configs chose local with `adapter_mode` and a compressing adapter with `adapter_type`)."""
    if adapter_mode is None:
        return adapter_type
    if adapter_mode not in ADAPTER_MODES:
        raise ValueError(
            f"EDJEConfig: adapter_mode must be one of {ADAPTER_MODES}, got {adapter_mode!r}."
        )
    return "local" if adapter_mode == "local" else adapter_type


def _check_positive_ints(values: dict) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"EDJEConfig: {name} must be a positive int, got {value!r}.")
