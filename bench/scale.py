"""What the two training modes cost per step, measured at small size on this machine.

Not a test. The raw-store mode reads each image's raw vision tokens from disk; the
online-vision mode (`edje.training.streaming`) runs the frozen vision encoder on the batch's
pixels in the step. Both run the same joint-encoder objectives after that. Measured here:
the vision forward per image and one training step (forward, backward, optimizer) of each mode
on the offline backbones (DINOv2-S, MiniLM-L6); docs/scaling.md extrapolates from these with
the arithmetic it shows.

    python bench/scale.py --image-size 224 --batch-size 16 --out scale.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from edje._utils import atomic_write
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
from edje.training import EDJEForPreTraining, EDJETrainingModule
from edje.training.hardware import describe_hardware


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def stream_rate(folder: Path, shards: int = 8, per_shard: int = 256, side: int = 224) -> dict:
    """Samples/s read from tar shards (random JPEGs of `side` px): `datasets` streaming through
    a DataLoader with 2 workers (what ShardDataModule reads with), and a plain sequential read
    of the same bytes by `ShardImages` (the floor any reader pays)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from edje.data.shards import ShardImages, stream_shards

    rng = np.random.default_rng(0)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                buffer = io.BytesIO()
                pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
                for extension, data in (("jpg", buffer.getvalue()), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{shard:05d}{i:05d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pattern = str(folder / f"{{00000..{shards - 1:05d}}}.tar")
    total = shards * per_shard

    def streamed():
        loader = torch.utils.data.DataLoader(
            stream_shards(pattern), batch_size=None, num_workers=2, collate_fn=len
        )
        assert sum(1 for _ in loader) == total

    def plain():
        samples = ShardImages(pattern)
        assert sum(1 for i in range(len(samples)) if samples[i]) == total

    return {
        "samples": total,
        "jpeg_bytes_mean": sum(len(ShardImages(pattern)[i]) for i in range(32)) / 32,
        "datasets_streaming_samples_per_s": total / seconds(streamed, 1),
        "sequential_read_samples_per_s": total / seconds(plain, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.out:  # before the measurements: a missing folder must not cost them
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    network = EDJEForPreTraining(
        vision=OFFLINE_VISION, text=OFFLINE_TEXT, vision_image_size=args.image_size,
        text_embedding_dim=256, config={"num_image_tokens": 64, "adapter_mlp_size": 1024},
    )  # fmt: skip
    module = EDJETrainingModule(network, negatives={"hardest": 1.0})
    optimizer = torch.optim.AdamW(p for p in network.parameters() if p.requires_grad)
    b, side = args.batch_size, args.image_size
    pixels = torch.randn(b, 3, side, side)
    with torch.no_grad():
        vision_tokens = network.edje.encode_images(pixels).float()
    n, d_vis = vision_tokens.shape[1:]
    common = {
        "caption_ids": torch.randint(1000, 20000, (b, 20)),
        "caption_mask": torch.ones(b, 20, dtype=torch.long),
        "image_key": torch.arange(b),
        "caption_key": torch.arange(b),
        "text_embedding": torch.randn(b, 256),
        "image_embedding": torch.randn(b, 256),
    }

    def step(batch):
        def run():
            optimizer.zero_grad()
            terms, _ = module._losses(batch, train=True)
            module._total(terms).backward()
            optimizer.step()

        return run

    def vision_forward():
        with torch.no_grad():
            network.edje.encode_images(pixels)

    raw = seconds(step({**common, "vision_tokens": vision_tokens}), args.repeats)
    online = seconds(step({**common, "pixel_values": pixels}), args.repeats)
    vision = seconds(vision_forward, args.repeats)
    report = {
        "hardware": describe_hardware(torch.device("cpu")),
        "torch_threads": torch.get_num_threads(),
        "batch_size": b,
        "image_size": side,
        "raw_tokens_per_image": [n, d_vis],
        "raw_store_bytes_per_image_fp16": n * d_vis * 2,
        "step_seconds_raw_store": raw,
        "step_seconds_online_vision": online,
        "vision_forward_seconds_per_image": vision / b,
        "online_over_raw": online / raw,
    }
    with tempfile.TemporaryDirectory() as folder:
        report["reading_tar_shards"] = stream_rate(Path(folder), side=args.image_size)
    print(json.dumps(report, indent=2))
    if args.out:
        text = json.dumps(report, indent=2)
        atomic_write(args.out, lambda temp: Path(temp).write_text(text))
    return report


if __name__ == "__main__":
    main()
