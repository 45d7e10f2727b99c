"""`edje eval`: two-stage retrieval, first stage vs EDJE-reranked, R@1/5/10 both ways."""

from __future__ import annotations

import argparse
import sys

from edje.commands import (
    UsageError,
    add_column_options,
    add_data_option,
    add_device_option,
    add_first_stage_option,
    add_model_option,
    add_scoring_options,
    add_store_option,
    column_options,
    count,
    data_spec,
    output_folder,
    whole_number,
)

EXAMPLE = """examples:
  # the built-in offline set: train the offline first stage on its train split, then evaluate
  edje eval --first-stage train-builtin --save-first-stage probe --data builtin --out eval-builtin
  # a trained EDJE over a saved first stage, Flickr30k 1k test, reranking depths 5..50
  edje eval --model my-edje --first-stage google/siglip2-large-patch16-384 \\
      --data flickr30k --k 10 --extra-k 5 20 50 --out eval-flickr --contact-sheet 8
  # your own folder (metadata.jsonl, or train/ validation/ test/ with one each) with tokens
  # already in a store (edje encode --model my-edje --data photos/ --out photos.store)
  edje eval --model my-edje --first-stage my-probe --data photos/ --store photos.store
  # a Hub data set of images and captions (columns found by name, or --caption-column ...)
  edje eval --model my-edje --first-stage google/siglip2-large-patch16-384 \\
      --data nlphuji/flickr_1k_test_image_text_retrieval --out eval-flickr1k

Writes report.json, report.md and recall_at_k.png (and contact_sheet.png) into --out and
prints the markdown table.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="two-stage retrieval: first stage top-k, EDJE rerank, recall@k both ways",
        description=(
            "Retrieve top-k candidates with a first-stage embedding model both ways (caption -> "
            "images, image -> captions), rerank them with EDJE, and report first-stage and "
            "reranked recall@k side by side (clip_benchmark names, ties against the query). "
            "--first-stage train-builtin fits the offline linear probe on the built-in train "
            "split first."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(parser)
    add_first_stage_option(parser, required=True)
    add_data_option(parser, required=True)
    add_scoring_options(parser)
    parser.add_argument(
        "--split", default="test", help="split to evaluate (default: test; val, dev... too)"
    )
    add_column_options(parser)
    add_store_option(parser)
    parser.add_argument(
        "--force",
        action="store_true",
        help="use --store even if its fingerprint differs from the model's (warns instead)",
    )
    _add_report_options(parser)
    parser.add_argument("--batch-size", type=count, default=256, help="pairs per forward pass")
    add_device_option(parser)
    parser.add_argument("--limit", type=count, default=None, help="evaluate the first N images")
    parser.add_argument(
        "--save-first-stage", metavar="DIR", help="keep the first stage (e.g. train-builtin's)"
    )
    parser.set_defaults(func=run)


def _add_report_options(parser) -> None:
    """The rerank depths and what is written."""
    parser.add_argument("--k", type=count, default=10, help="rerank depth (default: 10)")
    parser.add_argument(
        "--extra-k", type=count, nargs="*", default=[], metavar="K", help="more rerank depths"
    )
    parser.add_argument(
        "--out", type=output_folder, metavar="DIR", help="folder for the report files"
    )
    parser.add_argument(
        "--contact-sheet",
        type=whole_number,
        default=0,
        metavar="N",
        help="picture N queries' top 5",
    )


def load_split(spec: list[str], split: str, caption_column: str | None = None, **columns):
    """The `split` of `--data NAME [DATA_DIR]` (a folder: `FOLDER` or `folder FOLDER`); a
    folder without split folders is evaluated whole. `columns`: `image_column`, `id_column`
    of a Hub data set (`load_data`)."""
    from pathlib import Path

    from edje.data import load_data, load_image_folder
    from edje.data.load import canonical_split, split_folders

    split = canonical_split(split)  # --split val / dev / testing ...
    name, data_dir = data_spec(spec, "eval")
    folder = Path(name)
    if folder.is_dir() and not split_folders(folder):
        if any(columns.values()):
            given = ", ".join(f"--{k.replace('_', '-')}" for k, v in columns.items() if v)
            raise UsageError(f"edje eval: {given}: columns of a Hub data set; {name} is a folder")
        dataset = load_image_folder(folder, split=split, caption_column=caption_column)
        print(
            f"edje eval: {folder} has no train/ validation/ test/ folders; evaluating all "
            f"{len(dataset)} of its images as the {split!r} split",
            file=sys.stderr,
        )
        return dataset
    options = dict(data_dir=data_dir, caption_column=caption_column, **columns)
    try:
        splits = load_data(name, splits=[split], **options)
    except ValueError as error:
        raise UsageError(f"edje eval: {error}") from None
    if split not in splits:
        raise UsageError(
            f"edje eval: {name} has no {split!r} split (it has "
            f"{', '.join(load_data(name, **options))}); pass --split, "
            "or lay the folder out as train/ validation/ test/."
        )
    return splits[split]


def load_first_stage(name: str):
    if name != "train-builtin":
        from edje.first_stage import load_embedding_model

        return load_embedding_model(name)
    from edje.data import make_builtin_dataset
    from edje.first_stage import LinearProbeEmbedding

    probe = LinearProbeEmbedding()
    probe.fit_dataset(make_builtin_dataset()["train"], show_progress_bar=True)
    return probe


def run(args: argparse.Namespace) -> int:
    from edje.evaluation import evaluate
    from edje.scoring.exact import scoring_dtype

    dataset = load_split(args.data, args.split, **column_options(args))
    if args.limit:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    first_stage = load_first_stage(args.first_stage)
    if args.save_first_stage:
        first_stage.save_pretrained(args.save_first_stage)
    model = processor = store = None
    if args.model:
        from edje import EDJEModel, EDJEProcessor

        model = EDJEModel.from_pretrained(args.model).eval()
        processor = EDJEProcessor.from_pretrained(args.model)
    if args.store:
        from edje.store import TokenStore

        store = TokenStore.open(args.store)
    report = evaluate(
        dataset,
        first_stage,
        model,
        processor,
        store,
        k=args.k,
        extra_k=args.extra_k,
        batch_size=args.batch_size,
        device=args.device,
        # recall@1..k reads every candidate's order, so "exact" scores them all in fp32
        backend=args.backend,
        dtype=args.precision and scoring_dtype(args.precision),
        dataset_name=data_spec(args.data, "eval")[0],
        show_progress_bar=True,
        force_store=args.force,
    )
    print(report.to_markdown())
    warning = report.regressions()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.out:
        paths = report.save(args.out, dataset=dataset, contact_sheet=args.contact_sheet)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
