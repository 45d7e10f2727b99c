"""The one interface every scoring backend implements, and the reference backend.

A scorer turns (caption, image tokens) pairs into EDJE's match logits. Three call shapes cover
every caller: `score` (one caption, K images: a query's candidates), `score_pairs` (row-by-row
pairs) and `score_queries` (Q captions, each with its own K candidates). Captions are strings
(with a processor) or token ids `[CLS] ... [SEP]`. Outputs are float32 logits, in the order
given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Caption = str | Sequence[int]  # a caption string, or its token ids `[CLS] ... [SEP]`


class Scorer:
    """Base of the backends (`TorchScorer`, `FastScorer`, `OnnxScorer`): the shape checks and
    `score` / `score_queries` in terms of `score_pairs`, which each backend implements.

    Subclasses set `num_image_tokens`, `hidden_size` and `device`.
    """

    num_image_tokens: int
    hidden_size: int
    device: torch.device = torch.device("cpu")

    def score(self, caption: Caption, image_tokens: torch.Tensor) -> torch.Tensor:
        """One caption against K images: `image_tokens [K, m, d]` -> logits `[K]`."""
        self.check_tokens("score", image_tokens, "[K, m, d]", 3)
        return self.score_pairs([caption] * image_tokens.shape[0], image_tokens)

    def score_pairs(self, captions: Sequence[Caption], image_tokens: torch.Tensor) -> torch.Tensor:
        """Row-by-row pairs: `captions[i]` with `image_tokens[i]` (`[N, m, d]`) -> `[N]`."""
        raise NotImplementedError

    def score_queries(
        self, captions: Sequence[Caption], candidate_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Q captions, each against its own K candidates `[Q, K, m, d]` -> logits `[Q, K]`."""
        captions, q, k = self.check_queries(captions, candidate_tokens)
        if q * k == 0:
            return torch.zeros(q, k, device=self.device)
        flat = candidate_tokens.reshape(q * k, *candidate_tokens.shape[2:])
        return self.score_pairs([c for c in captions for _ in range(k)], flat).view(q, k)

    def check_tokens(self, where: str, tokens: torch.Tensor, layout: str, dims: int) -> None:
        """Raise unless `tokens` is a tensor of `dims` dimensions ending in `[m, d]`."""
        who = f"{type(self).__name__}.{where}"
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{who}: image tokens must be a torch.Tensor {layout}.")
        expected = (self.num_image_tokens, self.hidden_size)
        if tokens.dim() != dims or tuple(tokens.shape[-2:]) != expected:
            lead = layout[1:].split(", m")[0]
            raise ValueError(
                f"{who}: image tokens must have shape {layout} = "
                f"[{lead}, {expected[0]}, {expected[1]}], got {list(tokens.shape)}."
            )

    def check_queries(self, captions, candidate_tokens: torch.Tensor) -> tuple[list, int, int]:
        """`score_queries`' checks: `[Q, K, m, d]` tokens and Q captions; `(captions, Q, K)`."""
        self.check_tokens("score_queries", candidate_tokens, "[Q, K, m, d]", 4)
        captions = as_caption_list(captions, type(self).__name__)
        q, k = candidate_tokens.shape[:2]
        if len(captions) != q:
            raise ValueError(
                f"{type(self).__name__}.score_queries: {len(captions)} captions but "
                f"candidate_tokens holds {q} queries (shape {list(candidate_tokens.shape)})."
            )
        return captions, q, k

    def check_pair_count(self, captions: list, image_tokens: torch.Tensor) -> None:
        if len(captions) != image_tokens.shape[0]:
            raise ValueError(
                f"{type(self).__name__}.score_pairs: {len(captions)} captions but "
                f"{image_tokens.shape[0]} image token rows; pairs are scored row by row."
            )


class TorchScorer(Scorer):
    """The reference: `EDJEModel.forward` over the processor's padded pair inputs.

    Args:
        model: an `EDJEModel`; it is moved to `device` and `dtype` (default: its own).
        processor: its `EDJEProcessor` (caption strings only).
    """

    def __init__(self, model, processor, *, dtype=None, device=None):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = self.model.device
        self.num_image_tokens, self.hidden_size = model.config.image_token_shape

    @torch.inference_mode()
    def score_pairs(self, captions: Sequence[Caption], image_tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens("score_pairs", image_tokens, "[N, m, d]", 3)
        captions = as_caption_list(captions, "TorchScorer")
        self.check_pair_count(captions, image_tokens)
        if not captions:
            return torch.zeros(0, device=self.device)
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("TorchScorer: captions must be strings (the processor tokenizes).")
        inputs = self.processor(text=captions, image_tokens=image_tokens).to(self.device)
        inputs["image_tokens"] = inputs["image_tokens"].to(self.model.dtype)
        return self.model(**inputs).logits.float()


def as_caption_list(captions: Sequence[Caption], who: str) -> list[Caption]:
    if isinstance(captions, str):
        raise TypeError(f"{who}: expected a list of captions, got a single str.")
    return list(captions)


__all__ = ["Caption", "Scorer", "TorchScorer"]
