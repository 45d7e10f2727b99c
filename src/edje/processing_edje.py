"""EDJE processor: the joint encoder's tokenizer plus the vision encoder's image processor.

A pair reads `[CLS] caption [SEP] <image> x m [SEP]`: the caption is segment 0, the image slots
and the last `[SEP]` segment 1, padding goes at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

from .configuration_edje import IMAGE_TOKEN, clean_caption

try:  # edje's loaders know the offline backbone names (absent when loaded as remote code)
    from edje.backbones import load_image_processor, resolve_backbone
except ImportError:
    load_image_processor = resolve_backbone = None


class EDJEProcessor(ProcessorMixin):
    """Tokenizes captions into EDJE's pair layout and prepares images or stored image tokens.

    Call it as BLIP's processor: `processor(text=..., images=...)` (pixels, for the vision
    encoder) or `processor(text=..., image_tokens=...)` (stored tokens `[K, m, d]`). Captions and
    images pair row by row; one caption against K images (or one image against K captions) is
    broadcast, and the caption is tokenized once. `processor(images=...)` alone gives the
    `pixel_values` to encode and store.

    Args:
        image_processor: the vision encoder's image processor.
        tokenizer: the joint encoder's tokenizer; `<image>` is added if it lacks it.
        num_image_tokens: image slots per pair (`m`; `n` for a local-mode model).
        max_caption_length: caption tokens kept, `[CLS]` and `[SEP]` included.
        normalize_captions: clean every caption first (`clean_caption`, the authors' rule), as
            the model's config says (`EDJEConfig.normalize_captions`); saved with the processor.

    Example:

    ```python
    >>> import torch
    >>> from edje import EDJEProcessor
    >>> from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
    >>> processor = EDJEProcessor.from_backbones(vision=OFFLINE_VISION, text=OFFLINE_TEXT,
    ...     num_image_tokens=4)
    >>> batch = processor(text="a red circle", image_tokens=torch.zeros(3, 4, 384))
    >>> batch["input_ids"].shape, batch["token_type_ids"][0].tolist()
    (torch.Size([3, 10]), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])

    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 64,
        max_caption_length: int = 64,
        normalize_captions: bool = False,
        **kwargs: Any,
    ):
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.num_image_tokens = num_image_tokens
        self.max_caption_length = max_caption_length
        self.normalize_captions = normalize_captions
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_backbones(
        cls, vision: str, text: str, *, vision_image_size: int | None = None, **kwargs: Any
    ) -> EDJEProcessor:
        """The processor matching `EDJEModel.from_backbones(vision=..., text=...)` (the vision
        encoder's image processor is read from its configs; no weights are loaded)."""
        if load_image_processor is None:
            raise ImportError(
                "EDJEProcessor.from_backbones needs the edje package: pip install edje"
            )
        from transformers import AutoTokenizer

        image_processor = load_image_processor(vision, image_size=vision_image_size)
        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(text))
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        image_tokens: torch.Tensor | Sequence[torch.Tensor] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Build pair inputs: `input_ids`, `attention_mask`, `token_type_ids`, plus
        `pixel_values` or `image_tokens`. Captions longer than `max_caption_length` tokens are
        truncated (documented, not an error). BLIP's processors take images first: `p(image,
        "a cat")` is read as `p(text="a cat", images=image)`."""
        if _is_text(images) and text is not None and not _is_text(text):
            text, images = images, text  # positional (images, text), as BLIP's order
        if (images is None) == (image_tokens is None):
            given = "both" if images is not None else "neither"
            raise ValueError(
                f"EDJEProcessor expects exactly one of images or image_tokens, got {given}."
            )
        if text is None and images is not None:  # images alone: pixels to encode and store
            return BatchFeature(data=self._pixels(images, kwargs), tensor_type=return_tensors)
        captions = _as_caption_list(text)
        if image_tokens is not None:
            if not isinstance(image_tokens, torch.Tensor):
                image_tokens = torch.stack(list(image_tokens))
            if image_tokens.dim() == 2:
                image_tokens = image_tokens.unsqueeze(0)
            num_images, image_data = image_tokens.shape[0], {"image_tokens": image_tokens}
        else:
            image_data = self._pixels(images, kwargs)
            num_images = len(image_data["pixel_values"])
        rows = _pair_count(len(captions), num_images)
        text_data = self.tokenize_pairs(captions, rows)
        if num_images != rows:  # one image against many captions
            image_data = {k: v.expand(rows, *v.shape[1:]) for k, v in image_data.items()}
        return BatchFeature(data={**text_data, **image_data}, tensor_type=return_tensors)

    def _pixels(self, images: Any, kwargs: dict) -> dict[str, torch.Tensor]:
        images = list(images) if isinstance(images, list | tuple) else [images]
        pixels = self.image_processor(images=images, return_tensors="pt", **kwargs)
        return {"pixel_values": pixels["pixel_values"]}

    def tokenize_captions(
        self, captions: list[str], pad_to_max_length: bool = False
    ) -> dict[str, torch.Tensor]:
        """`[CLS] caption [SEP]` ids and attention mask, right-padded (to `max_caption_length`
        when asked, so batches from several processes share one shape)."""
        encoded = self.tokenizer(
            self.prepare_captions(captions),
            truncation=True,
            max_length=self.max_caption_length,
            padding="max_length" if pad_to_max_length else "longest",
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def prepare_captions(self, captions: Sequence[str]) -> list[str]:
        """Captions as the model reads them: cleaned when `normalize_captions` is on."""
        return [clean_caption(c) for c in captions] if self.normalize_captions else list(captions)

    def tokenize_pairs(
        self, captions: list[str], rows: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and segment ids for `rows` pairs (`len(captions)` or, for a
        single caption, any number: it is tokenized once and repeated)."""
        rows = len(captions) if rows is None else rows
        caption = self.tokenize_captions(captions)
        out = append_image_slots(
            caption["input_ids"],
            caption["attention_mask"],
            image_token_id=self.image_token_id,
            sep_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            num_image_tokens=self.num_image_tokens,
        )
        if len(captions) != rows:
            out = {k: v.expand(rows, -1) for k, v in out.items()}
        return out


def append_image_slots(
    caption_ids: torch.Tensor,
    caption_mask: torch.Tensor,
    *,
    image_token_id: int,
    sep_token_id: int,
    pad_token_id: int,
    num_image_tokens: int,
) -> dict[str, torch.Tensor]:
    """Pair inputs from right-padded `[CLS] caption [SEP]` ids: `<image> x m [SEP]` follows each
    caption, segment 1 from the first image slot on, padding at the end.

    Returns:
        `input_ids`, `attention_mask` and `token_type_ids`, each `[N, longest caption + m + 1]`.
    """
    lengths = caption_mask.sum(dim=1, keepdim=True)  # (N, 1)
    m = num_image_tokens
    width = int(lengths.max()) + m + 1
    position = torch.arange(width, device=caption_ids.device).unsqueeze(0)  # (1, L)
    after_caption = position - lengths  # (N, L): 0 at the first image slot
    input_ids = torch.full((len(caption_ids), width), pad_token_id, device=caption_ids.device)
    kept = min(width, caption_ids.shape[1])
    captions = caption_ids[:, :kept].masked_fill(caption_mask[:, :kept] == 0, pad_token_id)
    input_ids[:, :kept] = captions
    input_ids = input_ids.masked_fill((after_caption >= 0) & (after_caption < m), image_token_id)
    input_ids = input_ids.masked_fill(after_caption == m, sep_token_id)
    attention_mask = (after_caption <= m).long()
    token_type_ids = ((after_caption >= 0) & (after_caption <= m)).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }


def _is_text(value: Any) -> bool:
    """A caption or a non-empty list of captions."""
    if isinstance(value, str):
        return True
    return (
        isinstance(value, list | tuple) and bool(value) and all(isinstance(v, str) for v in value)
    )


def _as_caption_list(text: str | Sequence[str] | None) -> list[str]:
    if text is None:
        raise ValueError("EDJEProcessor expects text (a caption or a list of captions), got None.")
    captions = [text] if isinstance(text, str) else list(text)
    if not captions:
        raise ValueError("EDJEProcessor expects at least one caption, got an empty list.")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(
                f"EDJEProcessor: caption {index} must be a str, got {type(caption).__name__}."
            )
        if not caption.strip():
            raise ValueError(f"EDJEProcessor: caption {index} is empty; expected non-blank text.")
    return captions


def _pair_count(num_captions: int, num_images: int) -> int:
    if num_captions == num_images or num_images == 1:
        return num_captions
    if num_captions == 1:
        return num_images
    raise ValueError(
        f"EDJEProcessor pairs captions and images row by row (or broadcasts a single one), but got "
        f"{num_captions} captions and {num_images} images."
    )


__all__ = ["EDJEProcessor", "append_image_slots"]
