"""`edje data`: build the icon corpus and check its hold-out."""

from __future__ import annotations

import argparse
import sys

from edje.commands import count, existing_folder, output_folder

EXAMPLE = """examples:
  edje data build icons                     # into ~/.cache/edje/icons (or $EDJE_CACHE/icons)
  edje data build icons --out icons --workers 2
  edje data check                           # every shard's hash; no held-out sample in training
  edje data first-stage                     # the linear probe on the corpus's train shards
  edje eval --first-stage ~/.cache/edje/icons/first_stage --data icons-heldout-style
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build the icon corpus (npm icons and emoji) as shards; check its hold-out",
        description=(
            "`build icons` fetches the pinned npm packages with npm (your registry settings "
            "apply), renders ~400k icons and emoji into WebDataset tar shards (train/, "
            "validation/) and the zero-shot evaluation sets (icons-heldout-*), resumably. "
            "`check` reads every shard of a built corpus against its manifest and hold-out; "
            "`first-stage` fits the offline first stage on its train shards."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="build a corpus (icons)")
    build.add_argument("corpus", choices=["icons"], help="which corpus")
    build.add_argument("--out", type=output_folder, help="folder (default: <edje cache>/icons)")
    build.add_argument("--workers", type=count, help="render processes (default: every core)")
    build.add_argument("--image-size", type=count, default=112, help="pixels a side (112)")
    build.add_argument("--shard-size", type=count, default=5000, help="samples a shard (5000)")
    build.add_argument("--eval-size", type=count, default=1000, help="images an eval set (1000)")
    build.add_argument("--sets", help="only these iconify sets, comma-separated (a quick look)")
    build.set_defaults(func=run_build)
    check = actions.add_parser("check", help="check a built corpus's shards and hold-out")
    check.add_argument("folder", type=existing_folder, nargs="?", help="default: cache/icons")
    check.set_defaults(func=run_check)
    probe = actions.add_parser(
        "first-stage",
        help="fit the offline first stage (linear probe over DINOv2-S and MiniLM) on train/",
    )
    probe.add_argument("folder", type=existing_folder, nargs="?", help="default: cache/icons")
    probe.add_argument("--images", type=count, default=40000, help="train images used (40000)")
    probe.add_argument("--out", type=output_folder, help="default: FOLDER/first_stage")
    probe.set_defaults(func=run_first_stage)


def default_folder() -> str:
    from edje.backbones import cache_dir

    return str(cache_dir() / "icons")


def run_build(args: argparse.Namespace) -> int:
    from edje.data.icon_shards import build_icon_corpus

    out = args.out or default_folder()
    print(
        "edje data build: fetching the pinned npm packages (137 MB the first time) and reading "
        "the icon sets; then rendering (minutes on 2 cores)",
        file=sys.stderr,
    )
    manifest = build_icon_corpus(
        out,
        sets=args.sets.split(",") if args.sets else None,
        image_size=args.image_size,
        shard_size=args.shard_size,
        eval_size=args.eval_size,
        workers=args.workers,
    )
    splits = manifest["splits"]
    print(
        f"{out}: {splits.get('train', 0)} train and {splits.get('validation', 0)} validation "
        f"icons in {len(manifest['shards'])} shards; evaluation sets "
        + ", ".join(f"{name} {n}" for name, n in manifest["eval_sets"].items())
    )
    if manifest["failed"]:
        print(f"{len(manifest['failed'])} icons could not be rendered (manifest.json lists them)")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from edje.data.icon_shards import check_icon_corpus

    folder = args.folder or default_folder()
    counts = check_icon_corpus(folder)
    print(f"{folder}: intact; no held-out sample among {sum(counts.values())} ({counts})")
    return 0


def run_first_stage(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edje.first_stage import LinearProbeEmbedding

    folder = Path(args.folder or default_folder())
    shards = sorted(str(p) for p in (folder / "train").glob("*.tar"))
    if not shards:
        raise ValueError(f"edje data first-stage: no train/*.tar in {folder}")
    probe = LinearProbeEmbedding()
    losses = probe.fit_shards(shards, max_images=args.images, show_progress_bar=True)
    out = probe.save_pretrained(args.out or folder / "first_stage")
    print(f"{out}: linear probe fitted on {args.images} images (final loss {losses[-1]:.3f})")
    return 0
