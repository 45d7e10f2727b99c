"""`edje calibrate`: measure a model's bf16-vs-fp32 logit error and store it as exact mode's
bound (`score_error_bounds` in the model folder's config.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edje.commands import (
    UsageError,
    add_device_option,
    add_model_option,
    add_store_option,
    count,
)

EXAMPLE = """examples:
  # an `edje quickstart` folder: its model, its store and its captions
  edje calibrate --model qs/model --store qs/raw.store --captions qs/images/builtin/captions.jsonl

Each of --pairs / --per-caption captions ranks --candidates stored images in bfloat16 (as exact
mode ranks a query's candidates) and its --per-caption best are scored in float32 too
(FastScorer, on --device): the pairs exact mode re-scores, at the top of a ranking. The largest
|difference| x --margin is written into --model's config.json with how it was measured, which
`EDJEReranker(..., precision="exact")` and `--precision exact` read. The bound holds for the
device type it was measured on; at run time exact mode checks it on every candidate it
re-scores and falls back to fp32 (with a warning) where it fails.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="measure the bf16 error bound exact mode needs and store it with the model",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(parser, required=True)
    add_store_option(parser, required=True)
    parser.add_argument("--captions", required=True, metavar="FILE",
                        help="captions, one per line or JSONL with a caption field")  # fmt: skip
    parser.add_argument("--pairs", type=count, default=4096,
                        help="pairs scored both ways: captions x --per-caption")  # fmt: skip
    parser.add_argument("--candidates", type=count, default=1000,
                        help="stored images each caption ranks (all when fewer)")  # fmt: skip
    parser.add_argument("--per-caption", type=count, default=None,
                        help="per caption, its best this many in fp32 (default 64)")  # fmt: skip
    parser.add_argument("--margin", type=float, default=None,
                        help="the largest difference x this is the bound (default 2)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="pair sampling seed")
    add_device_option(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the record, write nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not Path(args.model).is_dir():  # its config.json is written: a folder, not a Hub id
        raise UsageError(f"edje calibrate: --model must be a saved EDJE folder, got {args.model}")

    import torch

    from edje import EDJEModel, EDJEProcessor
    from edje.data import read_captions
    from edje.image_tokens import from_store
    from edje.scoring.exact import CALIBRATION_TOP, SAFETY_MARGIN, calibrate, write_bound
    from edje.store import TokenStore

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EDJEModel.from_pretrained(args.model).to(device).eval()
    processor = EDJEProcessor.from_pretrained(args.model)
    store = TokenStore.open(args.store)
    model.check_store(store)
    captions = model.config.prepare_captions(read_captions(args.captions))
    top = args.per_caption or CALIBRATION_TOP
    g = torch.Generator().manual_seed(args.seed)
    caption_rows = torch.randperm(len(captions), generator=g)[: -(-args.pairs // top)].tolist()
    image_rows = torch.randperm(len(store), generator=g)[: args.candidates]
    with torch.inference_mode():
        tokens = from_store(model, store, image_rows)
    margin = SAFETY_MARGIN if args.margin is None else args.margin
    record = calibrate(model, processor, [captions[i] for i in caption_rows], tokens, top=top,
                       device=device, margin=margin)  # fmt: skip
    print(json.dumps({"bfloat16": record}, indent=2))
    if not args.dry_run:
        print(f"wrote the bound into {write_bound(args.model, record)}")
    return 0
