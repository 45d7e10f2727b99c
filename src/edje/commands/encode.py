"""`edje encode`: encode images once into a token store (raw, or compressed by an EDJE model)."""

from __future__ import annotations

import argparse
import sys

from edje.commands import (
    UsageError,
    add_column_options,
    add_data_option,
    add_model_option,
    column_options,
    count,
    data_spec,
    existing_folder,
    folder_or_id,
    output_folder,
    whole_number,
)

EXAMPLE = """examples:
  # raw DINOv2 tokens of every image under photos/ (ids: paths under photos/ without suffix)
  edje encode --vision facebook/dinov2-small --images photos/ --out photos.raw
  # the 64 compressed tokens a trained EDJE keeps, fp16, on 4 GPUs
  edje encode --model my-edje --images photos/ --out photos.store --devices 4
  # a data set as edje fit and edje eval read it (a name, or a folder with metadata.jsonl or
  # train/ validation/ test/ folders): every split, ids as they use them ("test/0000")
  edje encode --model my-edje --data photos/ --out photos.store
  # Flickr30k's 1k test images from a local copy of its parquet files (no other split read)
  edje encode --model my-edje --data flickr30k flickr30k/ --split test --out flickr.store
  # a Hub data set of images and captions, as edje fit and eval read it (columns found by name)
  edje encode --model my-edje --data nlphuji/flickr_1k_test_image_text_retrieval \\
      --split test --out flickr1k.store
  # a Hugging Face dataset (Hub id, saved folder or script), ids from its "filename" column
  edje encode --model my-edje --dataset nlphuji/flickr_1k_test_image_text_retrieval \\
      --split test --id-column filename --out flickr.store --store-dtype int8
  # WebDataset / img2dataset tar shards (ids: the samples' keys), on 2 nodes of 8 GPUs each
  edje encode --model my-edje --shards "cc3m/{00000..00331}.tar" --out cc3m.store \\
      --devices 8 --num-nodes 2

Run the same command again after an interruption: images already stored are skipped.
The exit code is 1 when some images could not be decoded (they are listed in the manifest).
"""

STORE_DTYPES = ("float16", "bfloat16", "int8")  # edje.store.encode's dtype


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="encode images once into a token store (resumable, multi-GPU)",
        description=(
            "Run the frozen vision encoder (and, with --model, EDJE's token-compression adapter) "
            "over a folder of images or a dataset, and keep the tokens in a sharded safetensors "
            "token store with a manifest."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_options(parser.add_argument_group("what to encode"))
    _add_store_options(parser.add_argument_group("encoder and store"))
    _add_running_options(parser.add_argument_group("running"))
    parser.set_defaults(func=run)


def _add_source_options(what) -> None:
    source = what.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images", type=existing_folder, metavar="FOLDER", help="folder of image files (recursive)"
    )
    add_data_option(source)
    source.add_argument("--dataset", metavar="NAME_OR_DIR", help="a Hugging Face dataset")
    source.add_argument(
        "--shards",
        nargs="+",
        metavar="PATTERN",
        help='local WebDataset tar shards, braces expanded ("data/{00000..00099}.tar")',
    )
    what.add_argument(
        "--split", help="the split to encode (default: train for --dataset, every split for --data)"
    )
    add_column_options(what, dataset_defaults="; --dataset: {default}")


def _add_store_options(how) -> None:
    how.add_argument(
        "--vision",
        type=folder_or_id,
        metavar="NAME_OR_PATH",
        help="vision encoder (Hub id or folder)",
    )
    add_model_option(how)  # its compressed tokens are stored (raw tokens without it)
    how.add_argument("--image-size", type=count, default=None, help="input side in pixels")
    how.add_argument(
        "--out", type=output_folder, required=True, metavar="STORE", help="store folder to write"
    )
    how.add_argument(
        "--store-dtype", dest="dtype", default="float16", choices=STORE_DTYPES,
        help="how the store keeps the tokens (default: %(default)s)",
    )  # fmt: skip
    # --dtype was the flag's name; elsewhere it is the scoring precision, so it is kept unlisted
    how.add_argument(
        "--dtype", dest="dtype", choices=STORE_DTYPES, default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )  # fmt: skip
    how.add_argument(
        "--shard-size", type=count, default=1024, help="images per shard (default: 1024)"
    )
    how.add_argument("--overwrite", action="store_true", help="replace an existing store")


def _add_running_options(run_group) -> None:
    run_group.add_argument("--batch-size", type=count, default=32)
    run_group.add_argument(
        "--num-workers", type=whole_number, default=2, help="decoding processes per device"
    )
    run_group.add_argument("--devices", default="auto", help="devices per node: N, or auto")
    run_group.add_argument("--num-nodes", type=count, default=1)
    run_group.add_argument("--accelerator", default="auto", help="auto, gpu, cpu, ...")
    run_group.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    run_group.add_argument(
        "--trainer-precision", dest="precision", default=None,
        help="Lightning precision of the forward passes, e.g. bf16-mixed",
    )  # fmt: skip
    # --precision was the flag's name; elsewhere it is the scoring precision: kept unlisted
    run_group.add_argument(
        "--precision", dest="precision", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_source(args: argparse.Namespace):
    if args.images:
        return args.images
    if args.shards:
        from edje.data.shards import ShardImages

        try:
            return ShardImages(args.shards)
        except ValueError as error:
            raise UsageError(f"edje encode: {error}") from None
    import datasets

    if args.data:
        from edje.data import load_data
        from edje.data.load import canonical_split

        name, data_dir = data_spec(args.data, "encode")
        split = args.split and canonical_split(args.split)  # --split val / dev ...
        wanted = [split] if split else None  # only that split's files are read
        columns = column_options(args)
        splits = load_data(name, data_dir=data_dir, splits=wanted, **columns)
        if split and split not in splits:
            every = list(load_data(name, data_dir=data_dir, **columns))
            raise UsageError(f"edje encode: {name} has splits {every}, not {[args.split]}")
        return datasets.concatenate_datasets(list(splits.values()))
    path = args.dataset
    try:
        loaded = datasets.load_from_disk(path)  # a folder written by save_to_disk
    except (FileNotFoundError, ValueError):
        return datasets.load_dataset(path, split=args.split or "train")
    return loaded[args.split or "train"] if isinstance(loaded, datasets.DatasetDict) else loaded


def _load_encoders(args: argparse.Namespace):
    """-> (vision_encoder, image_processor, compressor or None)."""
    from edje.backbones import load_vision_encoder

    if not args.model:
        if not args.vision:
            raise UsageError(
                "edje encode: give --vision NAME_OR_PATH (raw tokens) or --model EDJE_DIR"
            )
        vision, processor = load_vision_encoder(args.vision, image_size=args.image_size)
        return vision, processor, None
    from edje import EDJEModel

    model = EDJEModel.from_pretrained(args.model).eval()
    image_size = args.image_size or model.config.vision_image_size
    if args.vision:
        vision, processor = load_vision_encoder(args.vision, image_size=image_size)
        model.set_vision_encoder(vision)
    else:
        vision, processor = model.vision_encoder, _model_image_processor(args.model, model)
    return vision, processor, model.compress


def _model_image_processor(model_dir: str, model):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir).image_processor
    except (OSError, ValueError, AttributeError):
        from edje.backbones import load_vision_encoder

        name = model.config.vision_encoder_name
        return load_vision_encoder(name, image_size=model.config.vision_image_size)[1]


def run(args: argparse.Namespace) -> int:
    from edje.store.encode import encode_images

    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    source = _load_source(args)  # before the encoders: a bad source fails in a moment
    vision, processor, compressor = _load_encoders(args)
    result = encode_images(
        source,
        args.out,
        vision_encoder=vision,
        image_processor=processor,
        compressor=compressor,
        # --data: ids and images in the columns edje fit and eval read them from
        id_column="image_id" if args.data else args.id_column or "id",
        image_column="image" if args.data else args.image_column or "image",
        batch_size=args.batch_size,
        dtype=args.dtype,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    if result.rank == 0:
        print(result.summary(), file=sys.stderr if result.failures else sys.stdout)
    return 0 if result.ok else 1
