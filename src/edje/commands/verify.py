"""`edje verify`: read a token store whole and say whether it is intact."""

from __future__ import annotations

import argparse
import sys

from edje.commands import existing_folder

EXAMPLE = """example:
  edje verify photos.store        # exit 0: intact; 1: corrupt, naming the file and images
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check a token store whole: every shard's hash and header, every row and token",
        description=(
            "Open a token store (its manifest checked as every reader does), then read every "
            "shard: its data's sha256 against the manifest, its header against its manifest "
            "entry, every row against its checksum and every token finite. Exit code 0 when "
            "intact, 1 when not."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", type=existing_folder, help="token store folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edje.store import StoreCorruptError, TokenStore

    try:
        store = TokenStore.open(args.store)
        store.verify(progress=None)
    except StoreCorruptError as error:
        print(f"edje verify: {args.store} is corrupt: {error}", file=sys.stderr)
        return 1
    shards = len(store.manifest["shards"])
    failed = f", {len(store.failures)} listed as failed to encode" if store.failures else ""
    print(f"{args.store}: intact: {len(store)} images in {shards} shards{failed}")
    return 0
