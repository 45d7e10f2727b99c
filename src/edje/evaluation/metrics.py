"""Retrieval recall@k for image-text retrieval, both ways, with ties counted against the query.

Names follow clip_benchmark: `image_retrieval_recall@k` is text -> image (each caption has
exactly one correct image), `text_retrieval_recall@k` is image -> text (a hit when ANY of
the image's captions is in the top k: a hit rate per image, as in the EDJE paper). Values are
fractions (0-1), on clip_benchmark's scale, so results merge with its own; tables and plots
show them as percentages, as papers report them.

Ties never count in the query's favour. Two rules (argument `ties`):

- `"worst"` (default): the correct item goes after every wrong item that scores the same,
  so its rank is the number of wrong items scoring `>=` it. A lower bound; a model that
  scores everything equal gets 0 (below chance) for every k < n.
- `"expected"`: the expected recall when ties are broken uniformly at random. A model that
  scores everything equal gets exactly chance, k / n (image -> text: the chance that one of
  the image's captions lands in the top k).

Without ties the two agree. NaN scores raise.

Example:
    >>> import torch
    >>> from edje.evaluation.metrics import recall_at_k
    >>> scores = torch.tensor([[0.9, 0.1], [0.5, 0.5]])  # [n_texts, n_images]
    >>> text_to_image = torch.tensor([0, 1])  # caption 1 ties: a miss at k=1
    >>> recall_at_k(scores, text_to_image, ks=(1,))
    {'image_retrieval_recall@1': 0.5, 'text_retrieval_recall@1': 1.0}
    >>> recall_at_k(scores, text_to_image, ks=(1,), ties="expected")["image_retrieval_recall@1"]
    0.75
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

__all__ = ["pair_accuracy", "recall_at_k", "reranked_recall_at_k"]

T2I_KEY = "image_retrieval_recall@{k}"
I2T_KEY = "text_retrieval_recall@{k}"
TIE_RULES = ("worst", "expected")
Ties = Literal["worst", "expected"]


def recall_at_k(
    scores: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    ties: Ties = "worst",
) -> dict[str, float]:
    """Recall@k both ways from a full score matrix.

    Args:
        scores: `[n_texts, n_images]` similarity of every caption to every image.
        text_to_image: `LongTensor[n_texts]`, the index of each caption's image.
        ks: cut-offs; a k at least the gallery size gives 1.
        ties: `"worst"` or `"expected"` (see the module docstring).

    Returns:
        `{"image_retrieval_recall@k": r, ..., "text_retrieval_recall@k": r, ...}`, r in 0-1.
        Images without any caption are not image -> text queries and are left out of that mean.
    """
    _check_scores(scores, "scores", ndim=2)
    n_texts, n_images = scores.shape
    text_to_image = _check_index(text_to_image, n_texts, n_images, "text_to_image")
    text_to_image = text_to_image.to(scores.device)
    ks, ties = _check_ks(ks), _check_ties(ties)
    t2i = _text_to_image_standing(scores, text_to_image)
    i2t = _image_to_text_standing(scores, text_to_image)
    return {**_recall(t2i, ks, ties, T2I_KEY), **_recall(i2t, ks, ties, I2T_KEY)}


def reranked_recall_at_k(
    text_to_image: torch.Tensor,
    *,
    t2i_candidates: torch.Tensor | None = None,
    t2i_scores: torch.Tensor | None = None,
    i2t_candidates: torch.Tensor | None = None,
    i2t_scores: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    ties: Ties = "worst",
) -> dict[str, float]:
    """Recall@k after reranking first-stage candidate lists (k must be <= K).

    A correct item that the first stage did not put among a query's K candidates is a miss.
    Either direction may be left out; only the keys of the given directions are returned.

    Args:
        text_to_image: `LongTensor[n_texts]`, the index of each caption's image.
        t2i_candidates: `LongTensor[n_texts, K]`, image indices proposed for each caption.
        t2i_scores: `[n_texts, K]`, the reranker's score for each of those candidates.
        i2t_candidates: `LongTensor[n_images, K]`, caption indices proposed for each image
            (row i belongs to image i).
        i2t_scores: `[n_images, K]`, the reranker's score for each of those candidates.
        ks: cut-offs, each at most K.
        ties: `"worst"` or `"expected"` (see the module docstring).

    Example:
        >>> import torch
        >>> from edje.evaluation.metrics import reranked_recall_at_k
        >>> t2i = torch.tensor([0, 1])
        >>> cands = torch.tensor([[1, 0], [0, 2]])  # caption 1's image was not retrieved
        >>> reranked_recall_at_k(t2i, t2i_candidates=cands,
        ...                      t2i_scores=torch.tensor([[0.1, 0.9], [0.5, 0.4]]), ks=(1, 2))
        {'image_retrieval_recall@1': 0.5, 'image_retrieval_recall@2': 0.5}
    """
    ks, ties = _check_ks(ks), _check_ties(ties)
    text_to_image = _check_index(text_to_image, len(text_to_image), None, "text_to_image")
    for name, cands, cand_scores in (
        ("t2i", t2i_candidates, t2i_scores),
        ("i2t", i2t_candidates, i2t_scores),
    ):
        if (cands is None) != (cand_scores is None):
            raise ValueError(
                f"reranked_recall_at_k: give both {name}_candidates and {name}_scores, or neither"
            )
    out: dict[str, float] = {}
    if t2i_candidates is not None:
        t2i_candidates = _check_candidates(
            t2i_candidates, t2i_scores, len(text_to_image), None, ks, "t2i"
        )
        positive = t2i_candidates == text_to_image.to(t2i_candidates.device)[:, None]
        out.update(_recall(_candidate_standing(t2i_scores, positive), ks, ties, T2I_KEY))
    if i2t_candidates is not None:
        i2t_candidates = _check_candidates(
            i2t_candidates, i2t_scores, None, len(text_to_image), ks, "i2t"
        )
        out.update(
            _recall(_i2t_standing(text_to_image, i2t_candidates, i2t_scores), ks, ties, I2T_KEY)
        )
    return out


def _i2t_standing(text_to_image: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor):
    """Each image query's standing among its reranked caption candidates; images without
    captions are not queries (they can only be distractors)."""
    n_images, device = len(candidates), candidates.device
    queries = torch.arange(n_images, device=device)[:, None]
    positive = text_to_image.to(device)[candidates] == queries
    standing = _candidate_standing(scores, positive)
    has_caption = torch.bincount(text_to_image, minlength=n_images)[:n_images].to(device) > 0
    return standing.select(has_caption)


def reranked_hits_at_1(
    text_to_image: torch.Tensor,
    t2i_candidates: torch.Tensor,
    t2i_scores: torch.Tensor,
    i2t_candidates: torch.Tensor,
    i2t_scores: torch.Tensor,
) -> torch.Tensor:
    """Per query, 1.0 when the top-scored candidate is a correct one (ties against the query),
    else 0.0: the caption queries, then the image queries with captions. Their mean is R@1
    both ways, the unit `edje.fusion.choose_fusion` compares grid points on, query by query."""
    t2i_positive = t2i_candidates == text_to_image.to(t2i_candidates.device)[:, None]
    t2i = _hit_rate(_candidate_standing(t2i_scores, t2i_positive), 1, "worst")
    n_images = len(i2t_candidates)
    queries = torch.arange(n_images, device=i2t_candidates.device)[:, None]
    i2t_positive = text_to_image.to(i2t_candidates.device)[i2t_candidates] == queries
    has_caption = torch.bincount(text_to_image, minlength=n_images)[:n_images] > 0
    standing = _candidate_standing(i2t_scores, i2t_positive).select(has_caption)
    return torch.cat([t2i.cpu(), _hit_rate(standing, 1, "worst").cpu()])


def pair_accuracy(scores: torch.Tensor) -> float:
    """Share of (caption, wrong image) pairs scored below the caption's own image, in percent.

    `scores` is square `[n, n]`: caption i belongs to image i. Ties count as errors.

    Example:
        >>> import torch
        >>> pair_accuracy(torch.tensor([[2.0, 1.0], [0.5, 0.5]]))
        50.0
    """
    _check_scores(scores, "scores", ndim=2)
    if scores.shape[0] != scores.shape[1]:
        raise ValueError(f"pair_accuracy: scores must be square, got {tuple(scores.shape)}")
    positive = scores.diagonal()[:, None]
    wrong = ~torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    return float((scores < positive)[wrong].float().mean() * 100)


# ---- where each query's best correct item stands among the wrong ones ----


class Standing(NamedTuple):
    """Per query: wrong items scoring above the best correct item (`above`), wrong items
    tied with it (`tied_wrong`) and correct items tied with it (`tied_right`, >= 1)."""

    above: torch.Tensor
    tied_wrong: torch.Tensor
    tied_right: torch.Tensor

    def select(self, mask: torch.Tensor) -> Standing:
        return Standing(*(t[mask] for t in self))


def _text_to_image_standing(scores: torch.Tensor, text_to_image: torch.Tensor) -> Standing:
    positive_score = scores.gather(1, text_to_image[:, None])  # (n_texts, 1)
    above = (scores > positive_score).sum(1)
    tied_wrong = (scores == positive_score).sum(1) - 1  # minus the correct image itself
    return Standing(above, tied_wrong, torch.ones_like(above))


def _image_to_text_standing(scores: torch.Tensor, text_to_image: torch.Tensor) -> Standing:
    """Images are queries, captions the gallery; images without captions are dropped."""
    n_texts, n_images = scores.shape
    rows = torch.arange(n_texts, device=scores.device)
    own = scores[rows, text_to_image]  # each caption's score with its own image
    best = torch.full((n_images,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, text_to_image, own, reduce="amax")  # best correct caption
    tied_right = torch.bincount(text_to_image[own == best[text_to_image]], minlength=n_images)
    above = (scores > best[None, :]).sum(0)  # no correct caption scores above the best one
    tied_wrong = (scores == best[None, :]).sum(0) - tied_right
    has_caption = torch.bincount(text_to_image, minlength=n_images) > 0
    return Standing(above, tied_wrong, tied_right).select(has_caption)


def _candidate_standing(scores: torch.Tensor, positive: torch.Tensor) -> Standing:
    """Rows are queries over their own K candidates; no correct candidate means a miss."""
    best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
    above = ((scores > best) & ~positive).sum(1)
    tied_wrong = ((scores == best) & ~positive).sum(1)
    tied_right = ((scores == best) & positive).sum(1)
    missing = ~positive.any(1)
    # K wrong items "above" puts the query out of reach of every k <= K.
    above = torch.where(missing, scores.shape[1], above)
    return Standing(above, torch.where(missing, 0, tied_wrong), torch.where(missing, 1, tied_right))


def _hit_rate(standing: Standing, k: int, ties: str) -> torch.Tensor:
    above, tied_wrong, tied_right = (t.double() for t in standing)
    if ties == "worst":  # the tied correct items come after all tied wrong ones
        return (above + tied_wrong < k).double()
    # Random tie-break: the top k leaves `free` slots for the tied block; a miss means all
    # of them go to wrong items: C(w, free) / C(w + r, free) = prod_j (w - j) / (w + r - j).
    free = torch.minimum((k - above).clamp(min=0), tied_wrong + 1)
    miss = torch.ones_like(above)
    for j in range(int(free.max().item()) if len(free) else 0):
        factor = (tied_wrong - j) / (tied_wrong + tied_right - j)
        miss = torch.where(j < free, miss * factor, miss)
    return 1.0 - miss


def _recall(standing: Standing, ks: Sequence[int], ties: str, key: str) -> dict[str, float]:
    if len(standing.above) == 0:
        raise ValueError(f"recall: no queries to average for {key.format(k='k')}")
    return {key.format(k=k): _hit_rate(standing, k, ties).mean().item() for k in ks}


# ---- input checks: name the argument, the expected and the given value ----


def _check_scores(scores: torch.Tensor, name: str, ndim: int) -> None:
    if not isinstance(scores, torch.Tensor) or scores.ndim != ndim:
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(f"recall: {name} must be a {ndim}-D tensor, got {shape}")
    if not scores.is_floating_point():
        raise ValueError(f"recall: {name} must be floating point, got {scores.dtype}")
    if torch.isnan(scores).any():
        raise ValueError(f"recall: {name} contains NaN; a NaN score cannot be ranked")


def _check_index(
    index: torch.Tensor, length: int | None, upper: int | None, name: str
) -> torch.Tensor:
    index = torch.as_tensor(index)
    if index.dtype in (torch.bool,) or index.is_floating_point() or index.is_complex():
        raise ValueError(f"recall: {name} must hold integer indices, got {index.dtype}")
    if length is not None and (index.ndim != 1 or len(index) != length):
        raise ValueError(f"recall: {name} must have shape ({length},), got {tuple(index.shape)}")
    if index.numel() and (index.min() < 0 or (upper is not None and index.max() >= upper)):
        raise ValueError(
            f"recall: {name} values must lie in [0, {upper}), "
            f"got min {int(index.min())} max {int(index.max())}"
        )
    return index.long()


def _check_ties(ties: str) -> str:
    if ties not in TIE_RULES:
        raise ValueError(f"recall: ties must be one of {TIE_RULES}, got {ties!r}")
    return ties


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"recall: ks must be positive integers, got {ks}")
    return ks


def _check_candidates(
    candidates: torch.Tensor,
    scores: torch.Tensor,
    n_queries: int | None,
    n_items: int | None,
    ks: list[int],
    name: str,
) -> torch.Tensor:
    _check_scores(scores, f"{name}_scores", ndim=2)
    candidates = _check_index(candidates, None, n_items, f"{name}_candidates")
    if candidates.shape != scores.shape:
        raise ValueError(
            f"recall: {name}_candidates and {name}_scores must have the same shape, "
            f"got {tuple(candidates.shape)} and {tuple(scores.shape)}"
        )
    if n_queries is not None and candidates.shape[0] != n_queries:
        raise ValueError(
            f"recall: {name}_candidates must have one row per query ({n_queries}), "
            f"got {candidates.shape[0]}"
        )
    if max(ks) > candidates.shape[1]:
        raise ValueError(
            f"recall: k={max(ks)} exceeds the {candidates.shape[1]} candidates per query in "
            f"{name}_candidates; reranked recall@k needs k <= K"
        )
    return candidates
