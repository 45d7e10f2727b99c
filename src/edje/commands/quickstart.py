"""`edje quickstart`: the built-in scenes and the emoji end to end, first stage vs EDJE reranked."""

from __future__ import annotations

import argparse

from edje.commands import add_model_option, count, existing_folder, output_folder

EXAMPLE = """example:
  edje quickstart                        # everything in ./edje-quickstart
  edje quickstart --out /tmp/qs          # run again on the same folder: done steps are reused
  edje quickstart --train                # train EDJE here (minutes on a GPU, hours on a CPU)
  edje quickstart --model my-edje        # rerank with any EDJE trained on these backbones
  edje quickstart --icons outputs/icons  # and zero-shot on the icon corpus's held-out sets
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="the built-in scenes and the emoji end to end: encode, rerank, recall@k",
        description=(
            "Draw the built-in scenes and the emoji, encode their test images once with the "
            "offline DINOv2-S into a token store, rerank each set's first-stage top k with EDJE "
            "and print first stage vs reranked R@1/5/10 both ways, one table per set. Needs no "
            "network."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=output_folder, default="edje-quickstart", help="output folder"
    )
    add_model_option(parser)  # to rerank with (default: the shipped checkpoint)
    parser.add_argument(
        "--train",
        action="store_true",
        help="train EDJE here first (recipes/quickstart.yaml, then quickstart_emoji.yaml)",
    )
    parser.add_argument("--k", type=count, default=10, help="rerank depth (default: 10)")
    parser.add_argument(
        "--icons",
        type=existing_folder,
        metavar="CORPUS",
        help="a built icon corpus (edje data build icons --out CORPUS, then edje data "
        "first-stage CORPUS): also rerank its held-out sets zero-shot (about 4 minutes on 2 "
        "cores)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from edje.quickstart import run_quickstart

    if args.train and not torch.cuda.is_available():
        print(
            "warning: no GPU: training the quickstart EDJE on a CPU takes hours (its 6,500 "
            "steps take 1.6-2.5 s each on 2 cores)",
            flush=True,
        )
    run_quickstart(args.out, model=args.model, train=args.train, k=args.k, icons=args.icons)
    return 0
