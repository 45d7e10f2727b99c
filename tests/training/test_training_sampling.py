"""`NeighbourhoodSampler`: train batches hold each caption's first-stage neighbours."""

from __future__ import annotations

import pytest
import torch

from edje.training.sampling import NeighbourhoodSampler


def clustered(images: int = 12, captions_per_image: int = 2, clusters: int = 3):
    """Captions whose first-stage embeddings cluster: images i and j are close when
    i % clusters == j % clusters."""
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(clusters, 16), dim=1)
    image_embeddings = centres[torch.arange(images) % clusters] + 0.01 * torch.randn(images, 16)
    image_of = torch.arange(images).repeat_interleave(captions_per_image)
    text = image_embeddings[image_of] + 0.01 * torch.randn(len(image_of), 16)
    return text, image_embeddings[image_of], image_of


def test_each_group_is_a_caption_and_captions_of_its_closest_other_images():
    text, images, image_of = clustered()
    sampler = NeighbourhoodSampler(text, images, image_of * 7 + 3, group=3, pool=3)
    order = list(sampler)
    assert len(order) == len(sampler) == len(image_of)
    for start in range(0, len(order) - 2, 3):
        group = image_of[order[start : start + 3]]
        assert len(set(group.tolist())) == 3  # three different images
        assert (group % 3 == group[0] % 3).all()  # all from the first caption's cluster


def test_the_order_is_fixed_by_seed_and_epoch_and_changes_with_the_epoch():
    text, images, image_of = clustered()
    first = NeighbourhoodSampler(text, images, image_of, group=2, pool=3, seed=1)
    again = NeighbourhoodSampler(text, images, image_of, group=2, pool=3, seed=1)
    epoch_zero = list(first)
    assert list(again) == epoch_zero
    assert list(first) != epoch_zero  # the next pass is the next epoch
    first.set_epoch(0)
    assert list(first) == epoch_zero


def test_across_processes_each_step_gathers_whole_neighbourhoods():
    text, images, image_of = clustered(images=24)
    single = list(NeighbourhoodSampler(text, images, image_of, group=4, pool=4))
    ranks = [
        list(NeighbourhoodSampler(text, images, image_of, group=4, pool=4, num_replicas=2, rank=r))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single) // 2
    per_rank_batch = 4
    for step in range(len(ranks[0]) // per_rank_batch):
        rows = slice(step * per_rank_batch, (step + 1) * per_rank_batch)
        gathered = sorted(ranks[0][rows] + ranks[1][rows])
        assert gathered == sorted(single[step * 8 : (step + 1) * 8])  # two whole groups of 4


def test_lightning_keeps_the_sampler_instead_of_wrapping_it_for_ddp():
    from torch.utils.data.distributed import DistributedSampler

    text, images, image_of = clustered()
    # Lightning replaces a data loader's sampler under DDP unless it is a DistributedSampler.
    assert isinstance(NeighbourhoodSampler(text, images, image_of, group=2), DistributedSampler)


def test_groups_larger_than_the_data_allows_are_refused():
    text, images, image_of = clustered(images=3, clusters=1)
    with pytest.raises(ValueError, match="groups of 4 need at least 3 other images"):
        NeighbourhoodSampler(text, images, image_of, group=4)


def test_datamodule_needs_a_first_stage_to_build_neighbourhoods():
    from edje.training import EDJEDataModule

    with pytest.raises(ValueError, match="give a first_stage"):
        EDJEDataModule("builtin", first_stage=None, neighbourhood_size=4)
