"""EDJE: the token-compression adapter and the joint encoder that scores (caption, image) pairs.

Data path: pixels -> frozen vision encoder -> raw tokens [B, n, d_vis] -> adapter -> image tokens
[B, m, d] (what a token store keeps) -> joint encoder over `[CLS] caption [SEP] <image> x m [SEP]`
-> pooled [CLS] -> Linear(d -> 1): one match logit per pair.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .compact_checkpoint import EDJESavingMixin, needs_edje
from .configuration_edje import EDJEConfig


def sincos_grid_positions(num_tokens: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine positions `[num_tokens, dim]` for a square patch grid, with a
    leading `[CLS]` at zero when `num_tokens - 1` is square (1D over the tokens otherwise).

    The light adapter starts its value position embedding here rather than at zero, so every
    pooled token says where its content came from from the first step: relations such as
    "left of" then have a path into the joint encoder.

    Example:

    ```python
    >>> sincos_grid_positions(65, 8).shape  # DINOv2 at 112 px: CLS + 8 x 8 patches
    torch.Size([65, 8])

    ```
    """
    side = math.isqrt(max(num_tokens - 1, 0))
    has_cls = side * side == num_tokens - 1
    if not has_cls:
        side = math.isqrt(num_tokens)
    if side * side == num_tokens - has_cls and dim % 4 == 0:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coordinates = [cols.flatten(), rows.flatten()]  # x then y: half the channels each
    else:
        has_cls, coordinates = False, [torch.arange(num_tokens)]
    quarter = dim // (2 * len(coordinates))
    frequencies = 1.0 / 100 ** (torch.arange(quarter) / quarter)
    angles = [c[:, None].float() * frequencies for c in coordinates]
    grid = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=-1)
    grid = F.pad(grid, (0, dim - grid.shape[-1]))
    return torch.cat([torch.zeros(1, dim), grid]) if has_cls else grid


def forward_features(encoder: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The one vision forward (timm's `forward_features`): image-processor outputs ->
    the encoder's `last_hidden_state` `[B, n, d_vis]`.

    Every door runs it (`EDJEModel.encode_images`, the store builder, the first stage's
    features), so raw tokens are the same tensors whichever made them. Tensors move to the
    encoder's device, floating ones to its dtype (a half-precision encoder takes half pixels).

    Args:
        encoder: a vision model whose output has `last_hidden_state` (DINOv2, SigLIP, ...).
        inputs: what the image processor returns (`pixel_values` and any other tensors).
    """
    param = next(encoder.parameters(), None)
    if param is not None:
        inputs = {key: _to_param(value, param) for key, value in inputs.items()}
    return encoder(**inputs).last_hidden_state


def _to_param(value: Any, param: torch.Tensor) -> Any:
    if not torch.is_tensor(value):
        return value
    return value.to(param.device, param.dtype if value.is_floating_point() else None)


class EDJEPaperAdapter(nn.Module):
    """The paper's adapter (`adapter_type="paper"`): compress `n` raw vision tokens into `m`
    tokens of the joint width.

    `m` learned queries and key/value projections (`Linear(d_vis, d_vis)` each) of the raw tokens
    go into `nn.MultiheadAttention(d_vis, num_heads, batch_first=True)`, which applies its own
    q/k/v in-projection and out-projection; then `H + MLP(LayerNorm(H))` with an MLP
    `d_vis -> mlp_dim -> d_vis`; then `Linear(d_vis -> out_dim)`. The authors' released
    checkpoint converts onto it (`EDJEModel.from_authors_checkpoint`).

    Example:

    ```python
    >>> import torch
    >>> adapter = EDJEPaperAdapter(vision_dim=32, out_dim=16, num_queries=4,
    ...     num_heads=2, mlp_dim=64, hidden_act="gelu", layer_norm_eps=1e-6)
    >>> adapter(torch.randn(3, 17, 32)).shape
    torch.Size([3, 4, 16])

    ```
    """

    def __init__(
        self,
        vision_dim: int,
        out_dim: int,
        num_queries: int,
        num_heads: int,
        mlp_dim: int,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, vision_dim))
        self.key = nn.Linear(vision_dim, vision_dim)
        self.value = nn.Linear(vision_dim, vision_dim)
        self.attention = nn.MultiheadAttention(vision_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(vision_dim, eps=layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(vision_dim, mlp_dim), ACT2FN[hidden_act], nn.Linear(mlp_dim, vision_dim)
        )
        self.proj = nn.Linear(vision_dim, out_dim)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(vision_tokens.shape[0], -1, -1)  # (B, m, d_vis)
        k = self.key(vision_tokens)  # (B, n, d_vis)
        v = self.value(vision_tokens)  # (B, n, d_vis)
        h = self.attention(q, k, v, need_weights=False)[0]  # (B, m, d_vis)
        h = h + self.mlp(self.norm(h))  # (B, m, d_vis)
        return self.proj(h)  # (B, m, d)


class EDJELightAdapter(nn.Module):
    """The light adapter (`adapter_type="light"`): compress `n` raw vision tokens into `m`
    tokens of the joint encoder's width.

    `m` learned queries attend over key/value projections of the raw tokens (one multi-head
    cross-attention without in/out projections), then `H + MLP(LayerNorm(H))` with exact GELU
    and eps 1e-5, then a projection to the joint width. Smaller than the paper's adapter; the
    shipped quickstart checkpoint uses it.

    Example:

    ```python
    >>> import torch
    >>> adapter = EDJELightAdapter(vision_dim=32, out_dim=16, num_queries=4,
    ...     num_heads=2, mlp_dim=64)
    >>> adapter(torch.randn(3, 17, 32)).shape
    torch.Size([3, 4, 16])

    ```
    """

    def __init__(
        self,
        vision_dim: int,
        out_dim: int,
        num_queries: int,
        num_heads: int,
        mlp_dim: int,
        qk_norm: bool = False,
        num_positions: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.randn(1, num_queries, vision_dim))
        # Optional extras, not in the paper: q and k LayerNorm, and a learned position per raw
        # token added to the values only (see `sincos_grid_positions` for why).
        self.value_position_embedding = (
            nn.Parameter(sincos_grid_positions(num_positions, vision_dim)[None])
            if num_positions
            else None
        )
        self.query_norm = nn.LayerNorm(vision_dim) if qk_norm else nn.Identity()
        self.key_norm = nn.LayerNorm(vision_dim) if qk_norm else nn.Identity()
        self.key = nn.Linear(vision_dim, vision_dim)
        self.value = nn.Linear(vision_dim, vision_dim)
        self.norm = nn.LayerNorm(vision_dim)
        self.mlp = nn.Sequential(
            nn.Linear(vision_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, vision_dim)
        )
        self.proj = nn.Linear(vision_dim, out_dim)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        batch, _, dim = vision_tokens.shape  # (B, n, d_vis)
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.query_norm(self.queries).expand(batch, -1, -1)  # (B, m, d_vis)
        k = self.key_norm(self.key(vision_tokens))  # (B, n, d_vis)
        v = self.value(vision_tokens)
        if self.value_position_embedding is not None:
            v = v + self.value_position_embedding
        q, k, v = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, m, hs)
        h = h.transpose(1, 2).reshape(batch, -1, dim)  # (B, m, d_vis)
        h = h + self.mlp(self.norm(h))
        return self.proj(h)  # (B, m, d)


class EDJELocalAdapter(nn.Module):
    """The uncompressed local adapter (`adapter_type="local"`): a per-token MLP keeping all `n`
    raw tokens; slower and larger, the paper's distillation teacher.

    Example:

    ```python
    >>> import torch
    >>> EDJELocalAdapter(vision_dim=32, out_dim=16, mlp_dim=64)(torch.randn(3, 17, 32)).shape
    torch.Size([3, 17, 16])

    ```
    """

    def __init__(self, vision_dim: int, out_dim: int, mlp_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(vision_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, out_dim)
        )

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(vision_tokens)  # (B, n, d_vis) -> (B, n, d)


# `adapter_type` -> the class it builds.
ADAPTER_CLASSES = {"paper": EDJEPaperAdapter, "light": EDJELightAdapter, "local": EDJELocalAdapter}
# The names these classes had before `adapter_type` alone picked among them.
PaperTokenCompressionAdapter = EDJEPaperAdapter
TokenCompressionAdapter = EDJELightAdapter
LocalProjector = EDJELocalAdapter


@dataclass
class EDJEOutput(ModelOutput):
    """Output of [`EDJEModel`].

    Args:
        loss: binary cross-entropy of `logits` against `labels`, when labels are given.
        logits: one match logit per pair, shape `[B]`.
        pooled_output: the pooled `[CLS]` state the head reads, shape `[B, d]`.
        image_tokens: the image tokens the joint encoder read, shape `[B, m, d]`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pooled_output: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None


class EDJEPreTrainedModel(PreTrainedModel):
    config_class = EDJEConfig
    config: EDJEConfig
    base_model_prefix = "edje"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, EDJEPaperAdapter):
            init.normal_(module.queries, std=1.0)  # torch.randn, as the authors start them
        elif isinstance(module, nn.MultiheadAttention):  # torch's own init of the in-projection
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, EDJELightAdapter):
            init.normal_(module.queries, std=module.queries.shape[-1] ** -0.5)
            positions = module.value_position_embedding
            if positions is not None:
                init.copy_(positions, sincos_grid_positions(*positions.shape[1:])[None])


class EDJEModel(EDJESavingMixin, EDJEPreTrainedModel):
    """EDJE: scores (caption, image) pairs from stored image tokens.

    `forward` takes the processor's `input_ids`, `attention_mask` and `token_type_ids` with exactly
    one of `image_tokens` (stored, `[B, m, d]`), `vision_tokens` (raw, `[B, n, d_vis]`) or
    `pixel_values`, and returns one logit per pair.

    Example (offline, on the two pip-installed backbones; the model is untrained):

    ```python
    >>> import torch
    >>> from edje import EDJEModel, EDJEProcessor
    >>> from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
    >>> from skimage import data
    >>> from PIL import Image
    >>> model = EDJEModel.from_backbones(vision=OFFLINE_VISION, text=OFFLINE_TEXT)
    >>> processor = EDJEProcessor.from_backbones(vision=OFFLINE_VISION, text=OFFLINE_TEXT)
    >>> inputs = processor(text=["an astronaut"], images=[Image.fromarray(data.astronaut())],
    ...     return_tensors="pt")
    >>> with torch.no_grad():
    ...     model(**inputs).logits.shape
    torch.Size([1])

    ```
    """

    def __init__(self, config: EDJEConfig, vision_encoder: nn.Module | None = None):
        super().__init__(config)
        self.adapter = _build_adapter(config)
        self.joint_encoder = BertModel(config.text_config, add_pooling_layer=True)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 1)
        # Held outside the module tree: frozen, never trained, never saved with EDJE's weights.
        self._vision_encoder: list[nn.Module] = []
        self._vision_source: str | os.PathLike | None = None
        if vision_encoder is not None:
            self.set_vision_encoder(vision_encoder)
        self.post_init()

    # -- vision side -------------------------------------------------------------------------

    @property
    def vision_encoder(self) -> nn.Module:
        """The frozen vision encoder, loaded from `config.vision_encoder_name` on first use."""
        if not self._vision_encoder:
            self._attach(self._load_vision_encoder())  # the encoder the config describes
        return self._vision_encoder[0]

    @property
    def has_vision_encoder(self) -> bool:
        """Whether a vision encoder is attached or loaded (`vision_encoder` loads one)."""
        return bool(self._vision_encoder)

    def set_vision_encoder(self, vision_encoder: nn.Module) -> None:
        """Attach a vision encoder; it is frozen (eval mode, no gradients). A weight hash the
        config recorded is dropped: it described another encoder."""
        self._attach(vision_encoder)
        self.config.vision_encoder_sha256 = None

    def _attach(self, vision_encoder: nn.Module) -> None:
        vision_encoder.eval().requires_grad_(False)
        self._vision_encoder[:] = [vision_encoder]

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, H, W]` -> raw vision tokens `[B, n, d_vis]` from the frozen encoder."""
        encoder = self.vision_encoder
        if next(encoder.parameters()).device != pixel_values.device:
            encoder.to(pixel_values.device)  # the encoder follows the pixels, not the reverse
        return forward_features(encoder, {"pixel_values": pixel_values}).to(self.dtype)

    def compress(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Raw vision tokens `[B, n, d_vis]` -> image tokens `[B, m, d]`, as a token store keeps."""
        expected = (self.config.vision_num_tokens, self.config.vision_hidden_size)
        _check_shape("vision_tokens", vision_tokens, expected, "[B, n, d_vis]")
        return self.adapter(vision_tokens.to(self.dtype))

    def store_fingerprint(self, *, raw: bool = False) -> dict:
        """What makes this model's stored tokens: the vision encoder (name, weight hash), the
        image preprocessing and the adapter's weight hash (or, with `raw=True`, raw tokens).

        A token store records the same; `check_store` compares them. The weight hash is the
        one the config records, or of the encoder already attached; without either it is left
        out and the encoder's name is compared instead: nothing is loaded to check a store.
        """
        return needs_edje("store_fingerprint").store_fingerprint_of(self, raw)

    def check_store(self, store: Any, *, force: bool = False) -> None:
        """Refuse a token store made by another vision encoder, preprocessing or adapter.

        Args:
            store: the `TokenStore` to check.
            force: only warn (for people who know the tokens are compatible).

        Raises:
            ValueError: the store's fingerprint differs from this model's (naming the differing
                fields of both); a warning instead with `force=True`.
        """
        raw = store.fingerprint.get("adapter_sha256") == "raw"
        store.check_fingerprint(self.store_fingerprint(raw=raw), force=force)

    # -- joint encoder -----------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        vision_tokens: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> EDJEOutput:
        """Score each (caption, image) row: returns `EDJEOutput` with `logits` of shape `[B]`."""
        given = {
            name: value
            for name, value in (
                ("image_tokens", image_tokens),
                ("vision_tokens", vision_tokens),
                ("pixel_values", pixel_values),
            )
            if value is not None
        }
        if len(given) != 1:
            raise ValueError(
                "EDJEModel.forward expects exactly one of image_tokens, vision_tokens or "
                f"pixel_values, got {sorted(given) or 'none'}."
            )
        if pixel_values is not None:
            vision_tokens = self.encode_images(pixel_values)
        if vision_tokens is not None:
            image_tokens = self.compress(vision_tokens)
        encoded = self.encode_pairs(
            input_ids, attention_mask, token_type_ids, image_tokens, **kwargs
        )
        logits = self.itm_head(encoded.pooler_output).squeeze(-1)  # (B,)
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return EDJEOutput(
            loss=loss, logits=logits, pooled_output=encoded.pooler_output, image_tokens=image_tokens
        )

    def encode_pairs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        image_tokens: torch.Tensor,
        **kwargs: Any,
    ):
        """The joint encoder's output (hidden states, pooled `[CLS]`) for pair inputs."""
        _check_shape("image_tokens", image_tokens, self.config.image_token_shape, "[B, m, d]")
        if image_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"EDJEModel.forward: {input_ids.shape[0]} captions but {image_tokens.shape[0]} "
                "images; pairs are scored row by row, so the batch sizes must match."
            )
        return self.joint_encoder(
            inputs_embeds=self._embed_pair(input_ids, image_tokens),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            **kwargs,
        )

    def _embed_pair(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings with each `<image>` slot replaced by the image's tokens, in order.

        Position and segment embeddings and the embedding LayerNorm are applied afterwards by the
        joint encoder, as for any other token.
        """
        slots = input_ids == self.config.image_token_id  # (B, L)
        per_row = slots.sum(dim=1)
        m = image_tokens.shape[1]
        if not bool((per_row == m).all()):
            raise ValueError(
                f"EDJEModel: every row of input_ids must hold {m} <image> tokens (id "
                f"{self.config.image_token_id}), got {sorted(set(per_row.tolist()))}. Build inputs "
                "with EDJEProcessor."
            )
        embeds = self.joint_encoder.embeddings.word_embeddings(input_ids)  # (B, L, d)
        return embeds.masked_scatter(slots.unsqueeze(-1), image_tokens.to(embeds.dtype))


def _build_adapter(config: EDJEConfig) -> nn.Module:
    """The adapter `config.adapter_type` names (`ADAPTER_CLASSES`), sized by `config`."""
    sizes = dict(vision_dim=config.vision_hidden_size, out_dim=config.text_config.hidden_size)
    if config.adapter_type == "local":
        return EDJELocalAdapter(**sizes, mlp_dim=config.adapter_mlp_size)
    common = dict(
        **sizes,
        num_queries=config.num_image_tokens,
        num_heads=config.adapter_num_heads,
        mlp_dim=config.adapter_mlp_size,
    )
    if config.adapter_type == "paper":
        return EDJEPaperAdapter(
            **common,
            hidden_act=config.adapter_hidden_act,
            layer_norm_eps=config.adapter_layer_norm_eps,
        )
    positions = config.vision_num_tokens if config.adapter_position_embedding else None
    return EDJELightAdapter(**common, qk_norm=config.adapter_qk_norm, num_positions=positions)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, int], layout: str) -> None:
    if tensor.dim() != 3 or tuple(tensor.shape[1:]) != expected:
        raise ValueError(
            f"EDJEModel: {name} must have shape {layout} = [B, {expected[0]}, {expected[1]}], "
            f"got {list(tensor.shape)}."
        )


__all__ = [
    "ADAPTER_CLASSES",
    "EDJELightAdapter",
    "EDJELocalAdapter",
    "EDJEModel",
    "EDJEOutput",
    "EDJEPaperAdapter",
    "EDJEPreTrainedModel",
    "LocalProjector",
    "PaperTokenCompressionAdapter",
    "TokenCompressionAdapter",
]
