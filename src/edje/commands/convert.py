"""`edje convert`: the paper authors' released checkpoint as an ordinary edje folder."""

from __future__ import annotations

import argparse

from edje.commands import UsageError, count, folder_or_id, output_folder

EXAMPLE = """example:
  edje convert shahafw/edje-vl-image-retrieval-reranker --out edje-authors
  edje convert checkpoint_16.pth --out edje-authors --tokenizer ./MiniLM-L12-H384-uncased \\
      --vision ./siglip2-large-patch16-384   # no Hub needed
  # a checkpoint the authors' code trained on SigLIP2-B/16 at 224 px
  edje convert checkpoint_b16.pth --out edje-b16 --vision google/siglip2-base-patch16-224
  edje rerank --model edje-authors ...                 # then use it as any edje model
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from edje.authors_facts import AUTHORS_TEXT, MINILM_L12_HEADS

    parser = subparsers.add_parser(
        "convert",
        help="convert the paper authors' checkpoint into an edje folder",
        description=(
            "Map the authors' reranker weights (SigLIP2 adapter, MiniLM-L12 joint encoder, ITM "
            "head) onto an EDJEModel with the paper's adapter and write config, "
            "model.safetensors, processor and model card. Reads safetensors, or .pth/.bin with "
            "torch.load(weights_only=True) only; the frozen SigLIP2 copies, MLM head and "
            "text-recovery projection are left out. The vision encoder and its image size come "
            "from the file where it tells them, else from --vision / --image-size and the "
            "vision encoder's config.json; any disagreement is refused."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", type=folder_or_id, help="weights file, folder holding one, or Hub repo id"
    )
    parser.add_argument("--out", type=output_folder, required=True, help="new output folder")
    parser.add_argument("--file", default=None, help="weights file inside a folder or Hub repo")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag, commit)")
    parser.add_argument(
        "--vision",
        default=None,
        metavar="ID_OR_DIR",
        help="the vision encoder it was trained on (default: the SigLIP2 tower of the file's "
        "width and size, google/siglip2-large-patch16-384 for the authors' release)",
    )
    parser.add_argument(
        "--image-size", type=count, default=None, help="the vision encoder's input side"
    )
    parser.add_argument(
        "--tokenizer", default=AUTHORS_TEXT, help=f"tokenizer folder or id ({AUTHORS_TEXT})"
    )
    parser.add_argument(
        "--image-processor", default=None, help="image processor folder or id (the --vision's)"
    )
    parser.add_argument(
        "--text-heads",
        type=count,
        default=None,
        help="joint encoder attention heads (default: the text encoder's config's, else "
        f"{MINILM_L12_HEADS}, MiniLM-L12-H384)",
    )
    parser.add_argument(
        "--vision-heads",
        type=count,
        default=None,
        help="the vision encoder's attention heads (default: from its config or width)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edje.authors_checkpoint import AuthorsCheckpointError, convert_authors_checkpoint

    try:
        out = convert_authors_checkpoint(
            args.source,
            args.out,
            tokenizer=args.tokenizer,
            image_processor=args.image_processor,
            filename=args.file,
            revision=args.revision,
            vision_encoder=args.vision,
            image_size=args.image_size,
            vision_num_heads=args.vision_heads,
            text_num_heads=args.text_heads,
        )
    except AuthorsCheckpointError as error:
        raise UsageError(str(error)) from None  # its messages name `edje convert`
    print(f"wrote {out} (EDJEModel.from_pretrained({str(out)!r}))")
    return 0
