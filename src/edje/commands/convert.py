"""`edje convert`: the paper authors' released checkpoint as an ordinary edje folder."""

from __future__ import annotations

import argparse

from edje.commands import count, folder_or_id, output_folder

EXAMPLE = """example:
  edje convert shahafw/edje-vl-image-retrieval-reranker --out edje-authors
  edje convert checkpoint_16.pth --out edje-authors --tokenizer ./MiniLM-L12-H384-uncased \\
      --image-processor ./siglip2-large-patch16-384   # no Hub needed
  edje rerank --model edje-authors ...                 # then use it as any edje model
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from edje.authors_facts import (
        AUTHORS_TEXT,
        AUTHORS_VISION,
        MINILM_L12_HEADS,
        SIGLIP2_LARGE_HEADS,
    )

    parser = subparsers.add_parser(
        "convert",
        help="convert the paper authors' checkpoint into an edje folder",
        description=(
            "Map the authors' reranker weights (SigLIP2-L/16-384 adapter, MiniLM-L12 joint "
            "encoder, ITM head) onto an EDJEModel with the paper's adapter and write config, "
            "model.safetensors, processor and model card. Reads safetensors, or .pth/.bin with "
            "torch.load(weights_only=True) only; the frozen SigLIP2 copies, MLM head and "
            "text-recovery projection are left out."
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
        "--tokenizer", default=AUTHORS_TEXT, help=f"tokenizer folder or id ({AUTHORS_TEXT})"
    )
    parser.add_argument(
        "--image-processor",
        default=AUTHORS_VISION,
        help=f"image processor folder or id ({AUTHORS_VISION})",
    )
    parser.add_argument(
        "--text-heads",
        type=count,
        default=MINILM_L12_HEADS,
        help=f"joint encoder attention heads (default: {MINILM_L12_HEADS}, MiniLM-L12-H384)",
    )
    parser.add_argument(
        "--vision-heads",
        type=count,
        default=SIGLIP2_LARGE_HEADS,
        help=f"adapter attention heads, the vision encoder's (default: {SIGLIP2_LARGE_HEADS}, "
        "SigLIP2-L)",
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
            vision_num_heads=args.vision_heads,
            text_num_heads=args.text_heads,
        )
    except AuthorsCheckpointError as error:
        raise SystemExit(str(error)) from None
    print(f"wrote {out} (EDJEModel.from_pretrained({str(out)!r}))")
    return 0
