"""`edje index`: embed images with a first stage into a saved VectorIndex, for `edje search`."""

from __future__ import annotations

import argparse

from edje.commands import count, existing_folder, folder_or_id

EXAMPLE = """examples:
  # every image under photos/, ids: paths relative to photos/ (as `edje encode --images`)
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
    parser.add_argument(
        "--first-stage",
        type=folder_or_id,
        required=True,
        metavar="DIR_OR_ID",
        help="embedding model",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images", type=existing_folder, metavar="FOLDER", help="folder of image files (recursive)"
    )
    source.add_argument(
        "--store", type=existing_folder, metavar="STORE", help="a token store of raw vision tokens"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="index folder to write")
    parser.add_argument("--factory", default="Flat", help="faiss index_factory string (exact)")
    parser.add_argument("--batch-size", type=count, default=64, help="images per batch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from edje.first_stage import VectorIndex, load_embedding_model

    first_stage = load_embedding_model(args.first_stage)
    if args.store:
        from edje.commands.search import index_from_store
        from edje.store import TokenStore

        index = index_from_store(TokenStore.open(args.store), first_stage)
    else:
        from edje._utils import load_rgb
        from edje.store.encode import find_images

        found = find_images(args.images)
        if not found:
            raise SystemExit(f"edje index: no image files under {args.images}")
        ids, paths = zip(*found, strict=True)
        chunks = []
        for start in range(0, len(paths), 1024):  # decoded images held 1024 at a time
            images = [load_rgb(p) for p in paths[start : start + 1024]]
            chunks.append(first_stage.encode_images(images, batch_size=args.batch_size))
            print(f"embedded {start + len(images)}/{len(paths)} images", flush=True)
        embeddings = torch.cat(chunks)
        index = VectorIndex(embeddings.shape[1], args.factory)
        if not index.index.is_trained:
            index.train(embeddings)
        index.add(embeddings, ids=list(ids))
    index.save(args.out)
    print(f"wrote {index!r} to {args.out}")
    return 0
