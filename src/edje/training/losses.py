"""EDJE's training objectives as plain functions of tensors (DESIGN.md section 1).

- ITM with hard negatives: each caption against [its image, a negative image] and each image
  against [its caption, a negative caption], 2-way softmax cross-entropy, averaged.
- MLM: caption word pieces masked, image tokens in context.
- Text-embedding recovery: mean(1 - cos) to the embedding model's text embedding.
- Distillation: BCE-with-logits of the student logit against sigmoid(teacher logit); from a
  teacher whose scores only rank (the first stage), ITM's 2-way softmax against the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVE_STRATEGIES = ("hardest", "topk", "random")


def mine_negatives(
    similarity: torch.Tensor,
    forbidden: torch.Tensor,
    strategy: torch.Tensor,
    topk: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One negative column per row of `similarity`, never a `forbidden` one.

    Args:
        similarity: `[R, C]` first-stage similarities of each row's query to every candidate.
        forbidden: `[R, C]` bool, True where a candidate is a positive (same image id, same
            caption text) and must not be the negative.
        strategy: `[R]` long, per row an index into `NEGATIVE_STRATEGIES`: 0 the most similar
            candidate, 1 uniform among the `topk` most similar, 2 uniform among all allowed.
        topk: pool size for strategy 1.

    Returns:
        `[R]` long, the chosen column per row. A row with every candidate forbidden raises.

    Example:

    ```python
    >>> import torch
    >>> sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.7]])
    >>> forbidden = torch.eye(2, 3, dtype=torch.bool)
    >>> mine_negatives(sim, forbidden, strategy=torch.zeros(2, dtype=torch.long)).tolist()
    [1, 2]

    ```
    """
    allowed = ~forbidden
    if not bool(allowed.any(dim=1).all()):
        raise ValueError(
            "mine_negatives: a row has no allowed negative (every candidate shares its image or "
            "caption); batches need at least two distinct images."
        )
    masked = similarity.float().masked_fill(forbidden, float("-inf"))  # (R, C)
    hardest = masked.argmax(dim=1)
    # Uniform picks among a pool: random keys, the pool's columns ranked by key.
    keys = torch.rand(masked.shape, generator=generator).to(masked.device)
    k = min(topk, masked.shape[1])
    pool = torch.zeros_like(forbidden).scatter_(1, masked.topk(k, dim=1).indices, True) & allowed
    from_topk = keys.masked_fill(~pool, -1.0).argmax(dim=1)
    from_all = keys.masked_fill(~allowed, -1.0).argmax(dim=1)
    choices = torch.stack([hardest, from_topk, from_all], dim=1)  # (R, 3)
    return choices.gather(1, strategy.to(choices.device).view(-1, 1)).squeeze(1)


def negative_strategies(
    count: int, mix: dict[str, float], generator: torch.Generator | None = None
) -> torch.Tensor:
    """`[count]` strategy indices drawn with the proportions of `mix` (keys from
    `NEGATIVE_STRATEGIES`), e.g. `{"hardest": 1/3, "topk": 1/3, "random": 1/3}`."""
    unknown = set(mix) - set(NEGATIVE_STRATEGIES)
    if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(
            f"negative mix must weight some of {NEGATIVE_STRATEGIES} with non-negative numbers, "
            f"got {mix}."
        )
    weights = torch.tensor([float(mix.get(name, 0.0)) for name in NEGATIVE_STRATEGIES])
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def itm_loss(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """2-way softmax cross-entropy: each positive logit against its negative's, target 0."""
    logits = torch.stack([positive, negative], dim=1).float()  # (B, 2)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def mask_caption_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of the `maskable` positions (caption word pieces).

    Of the chosen positions 80% become `[MASK]`, 10% a random token, 10% stay. Every row with a
    maskable position gets at least one chosen, so no caption escapes the loss.

    Returns:
        `(masked_ids, labels)` with labels `-100` wherever nothing is predicted.
    """
    shape, device = input_ids.shape, input_ids.device
    # Random draws on the CPU (where `generator` lives), then moved: the same on every device.
    draw = torch.rand(shape, generator=generator).to(device)
    chosen = (draw < probability) & maskable
    # The maskable position with the smallest draw is always chosen.
    first = draw.masked_fill(~maskable, 2.0).argmin(dim=1, keepdim=True)
    chosen |= torch.zeros_like(chosen).scatter_(1, first, True) & maskable
    labels = input_ids.masked_fill(~chosen, -100)
    action = torch.rand(shape, generator=generator).to(device)
    masked_ids = input_ids.clone()
    masked_ids[chosen & (action < 0.8)] = mask_token_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, shape, generator=generator).to(device)
    masked_ids[swap] = random_ids[swap]
    return masked_ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the predicted positions (`labels != -100`)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def text_recovery_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) between predicted and target text embeddings."""
    return (1 - F.cosine_similarity(predicted.float(), target.float(), dim=-1)).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of student logits against the teacher's probabilities."""
    return F.binary_cross_entropy_with_logits(student.float(), torch.sigmoid(teacher.float()))


def ranking_distillation_loss(
    positive: torch.Tensor,
    negative: torch.Tensor,
    teacher_positive: torch.Tensor,
    teacher_negative: torch.Tensor,
) -> torch.Tensor:
    """ITM's 2-way softmax cross-entropy with the teacher's 2-way softmax as soft target: for
    teachers whose scores rank candidates but are no match probability (a contrastive first
    stage's similarity / temperature)."""
    student = torch.stack([positive, negative], dim=1).float()
    target = torch.stack([teacher_positive, teacher_negative], dim=1).float().softmax(dim=1)
    return -(target * student.log_softmax(dim=1)).sum(dim=1).mean()
