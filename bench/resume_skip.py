"""Seconds a streamed run resumed at batch N of an epoch waits for its first batch: the
batches it trained on passed undecoded (`ShardDataModule`'s resume) against each one decoded
and dropped, as a plain loader would, in one process on the same shards.

    python bench/resume_skip.py --shards "outputs/icons/train/{00000..00073}.tar" \\
        --first-stage outputs/icons/first_stage --batches 300
"""

from __future__ import annotations

import argparse
import itertools
import time


def main() -> None:
    import torch

    from edje.training import ShardDataModule

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--first-stage", help="as the recipe mines with (captions embedded)")
    parser.add_argument("--batches", type=int, default=300, help="where the resume starts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=112)
    args = parser.parse_args()
    data = ShardDataModule(
        args.shards, first_stage=args.first_stage, batch_size=args.batch_size,
        shuffle_buffer=5000, num_workers=1, vision_image_size=args.image_size,
    )  # fmt: skip
    data.setup()
    data.load_state_dict({"epoch": 0, "batches": args.batches})
    start = time.perf_counter()
    resumed = next(iter(data.train_dataloader()))
    passed = time.perf_counter() - start

    stream = data.stream(rank=0, world_size=1).shuffle(seed=data.seed, buffer_size=5000)
    stream.set_epoch(0)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=args.batch_size, num_workers=1, collate_fn=data.collate
    )
    start = time.perf_counter()
    batch = next(itertools.islice(loader, args.batches, None))  # the ones before: dropped
    decoded = time.perf_counter() - start
    assert torch.equal(batch["image_key"], resumed["image_key"])  # the same next batch
    print(
        f"resume at batch {args.batches}: first batch after {passed:.1f} s passing the trained "
        f"batches undecoded, {decoded:.1f} s decoding them ({decoded / passed:.1f}x)"
    )


if __name__ == "__main__":
    main()
