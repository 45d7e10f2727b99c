"""Batches that hold the first stage's confusions, so in-batch hard-negative mining finds them.

With plain shuffling a batch of 64 captions from a few thousand rarely holds the images a
caption is confused with (on the built-in set: its colour-swapped and mirrored siblings), and
the mined "hardest" negative is an easy one. `NeighbourhoodSampler` orders captions in groups:
a random caption, then one caption of each of `group - 1` images the first stage ranks
closest to it (never its own image).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data.distributed import DistributedSampler


class NeighbourhoodSampler(DistributedSampler):
    """Caption indices in neighbourhoods of `group`, `len(captions)` of them an epoch.

    Across `num_replicas` processes, rank `r` takes every `num_replicas`-th index from
    position `r`, so the batch gathered from all ranks at a step is one contiguous run of the
    order and keeps its neighbourhoods whole. (A `DistributedSampler` so that Lightning does
    not wrap it in one that would shuffle the neighbourhoods apart.)

    Args:
        text_embeddings: `[N, D]` first-stage embeddings of the N captions.
        image_embeddings: `[N, D]` first-stage embedding of each caption's image.
        image_keys: `[N]` each caption's image key (captions of one image share it).
        group: captions per neighbourhood (1 = plain shuffling).
        pool: the neighbours of a caption are drawn from its `pool` closest other images.
        seed: with the epoch, fixes the order; the epoch counts the passes over the sampler
            and `set_epoch` (which Lightning calls) sets it.

    Example:

    ```python
    >>> import torch
    >>> emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])  # 0~1, 2~3
    >>> order = list(NeighbourhoodSampler(emb, emb, torch.arange(4), group=2, pool=1))
    >>> [sorted(order[i : i + 2]) in ([0, 1], [2, 3]) for i in (0, 2)]
    [True, True]

    ```
    """

    def __init__(
        self,
        text_embeddings: torch.Tensor,
        image_embeddings: torch.Tensor,
        image_keys: torch.Tensor,
        group: int,
        pool: int = 8,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        # DistributedSampler.__init__ is not called: it needs a process group; this sampler
        # shards by itself.
        self.num_replicas, self.rank = num_replicas, rank
        if group < 1 or pool < 1:
            raise ValueError(
                f"NeighbourhoodSampler: group and pool must be >= 1, got {group} and {pool}."
            )
        self.group, self.seed, self.epoch = group, seed, 0
        keys, self.image_of = torch.unique(image_keys, return_inverse=True)  # caption -> image row
        self.captions_of = [torch.nonzero(self.image_of == i).flatten() for i in range(len(keys))]
        images = torch.zeros(len(keys), image_embeddings.shape[1], dtype=image_embeddings.dtype)
        images.index_copy_(0, self.image_of, image_embeddings)
        pool = min(pool, len(keys) - 1)
        if group > 1 and pool < group - 1:
            raise ValueError(
                f"NeighbourhoodSampler: groups of {group} need at least {group - 1} other images, "
                f"the data has {len(keys)} images."
            )
        self.neighbours = torch.empty(len(image_keys), max(pool, 0), dtype=torch.long)
        for start in range(0, len(image_keys), 4096):  # chunks: N x images can be large
            rows = slice(start, start + 4096)
            similarity = text_embeddings[rows].float() @ images.float().T
            own = self.image_of[rows]
            similarity[torch.arange(len(own)), own] = -math.inf
            self.neighbours[rows] = similarity.topk(max(pool, 0), dim=1).indices

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_of) // self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # a wrapper that never calls set_epoch still gets a new order
        count = len(self.image_of)
        order = []
        for seed_caption in torch.randperm(count, generator=generator).tolist():
            if len(order) >= count:
                break
            order.append(seed_caption)
            if self.group == 1:
                continue
            pool = self.neighbours[seed_caption]
            chosen = pool[torch.randperm(len(pool), generator=generator)[: self.group - 1]]
            for image in chosen.tolist():
                captions = self.captions_of[image]
                pick = torch.randint(len(captions), (1,), generator=generator).item()
                order.append(int(captions[pick]))
        return iter(order[: len(self) * self.num_replicas][self.rank :: self.num_replicas])
