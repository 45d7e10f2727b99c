"""`edje index`: embed images with a first stage into a saved VectorIndex, for `edje search`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edje.commands import (
    UsageError,
    add_first_stage_option,
    add_store_option,
    count,
    existing_folder,
    output_folder,
)

EXAMPLE = """examples:
  # every image under photos/, ids: paths under photos/ without suffix (as `edje encode --images`)
  edje index --first-stage my-probe --images photos/ --out photos.index
  # a store of raw vision tokens (edje encode --vision ...): no pixels decoded again
  edje index --first-stage my-probe --store photos.raw --out photos.index
  # then
  edje search --model my-edje --store photos.store --first-stage my-probe \\
      --index photos.index "a dog"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build the first stage's vector index over images, for edje search",
        description=(
            "Embed every image with a first-stage embedding model and save a FAISS VectorIndex "
            "(index.faiss + ids.json) whose ids are the token store's image ids."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_first_stage_option(parser, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images", type=existing_folder, metavar="FOLDER", help="folder of image files (recursive)"
    )
    add_store_option(source)  # of raw vision tokens: the first stage embeds them
    parser.add_argument(
        "--out", type=output_folder, required=True, metavar="DIR", help="index folder to write"
    )
    parser.add_argument("--factory", default="Flat", help="faiss index_factory string (exact)")
    parser.add_argument("--batch-size", type=count, default=64, help="images per batch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edje.first_stage import VectorIndex, load_embedding_model

    found = _find_images(args.images) if args.images else None  # a bad folder fails at once
    first_stage = load_embedding_model(args.first_stage)
    width = first_stage.encode_texts(["factory check"]).shape[-1]
    VectorIndex(width, args.factory)  # a bad --factory fails now, not after embedding it all
    if args.store:
        from edje.store import TokenStore

        store = TokenStore.open(args.store)
        index = VectorIndex.from_store(
            store, first_stage, factory=args.factory, batch_size=args.batch_size
        )
        failures = {}
    else:
        ids, embeddings, failures = _embed_images(first_stage, found, args.batch_size)
        if not ids:
            raise UsageError(f"edje index: none of the {len(found)} images could be decoded")
        index = VectorIndex(embeddings.shape[1], args.factory)
        if not index.index.is_trained:
            index.train(embeddings)
        index.add(embeddings, ids=ids)
    index.save(args.out)
    print(f"wrote {index!r} to {args.out}")
    _report_failures(failures)
    return 1 if failures else 0


def _find_images(folder: str) -> list:
    from edje.store.encode import find_images

    found = find_images(folder)
    if not found:
        raise UsageError(f"edje index: no image files under {folder}")
    return found


def _report_failures(failures: dict[str, str]) -> None:
    """As `edje encode` lists them: the others are indexed, the exit code says so."""
    if not failures:
        return
    print(f"{len(failures)} images could not be decoded (not indexed):", file=sys.stderr)
    for image_id, reason in list(failures.items())[:20]:
        print(f"  {image_id}: {reason}", file=sys.stderr)
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more", file=sys.stderr)


# Decoded images are box-reduced at once to keep this many pixels on their short side (at
# least twice any first stage's input): the index's embeddings come within 8e-4 of the whole
# pictures' (image tokens, `edje.image_tokens.pixel_inputs`, see them whole).
KEPT_SIDE = 1024
DECODED_AT_ONCE = 16  # images decoded and preprocessed together (a processor makes floats)
PROGRESS_EVERY = 1024


def _embed_images(first_stage, found: list[tuple[str, Any]], batch_size: int):
    """(ids, embeddings, failures by id) of the image files; undecodable ones are skipped.
    A few images are decoded at a time, each reduced as soon as it is decoded: 60 photos of
    12 Mpx held whole at once took 8 GB."""
    import torch

    from edje._utils import load_rgb
    from edje.image_tokens import reduced

    ids, chunks, failures = [], [], {}
    group = min(batch_size, DECODED_AT_ONCE)
    for start in range(0, len(found), group):
        images = []
        for image_id, path in found[start : start + group]:
            try:
                images.append(reduced(load_rgb(path), KEPT_SIDE // 2))
                ids.append(image_id)
            except ValueError as error:
                failures[image_id] = str(error)
        if images:
            chunks.append(first_stage.encode_images(images, batch_size=batch_size))
        done = min(start + group, len(found))
        if done % PROGRESS_EVERY < group or done == len(found):
            print(f"embedded {done}/{len(found)} images", flush=True)
    return ids, (torch.cat(chunks) if chunks else None), failures
