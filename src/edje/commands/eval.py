"""`edje eval`: two-stage retrieval, first stage vs EDJE-reranked, R@1/5/10 both ways."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  # the built-in offline set: train the offline first stage on its train split, then evaluate
  edje eval --first-stage train-builtin --save-first-stage probe --data builtin --out eval-builtin
  # a trained EDJE over a saved first stage, Flickr30k 1k test, reranking depths 5..50
  edje eval --model my-edje --first-stage google/siglip2-large-patch16-384 \\
      --data flickr30k --k 10 --extra-k 5 20 50 --out eval-flickr --contact-sheet 8
  # your own folder (metadata.jsonl) with tokens already in a store (edje encode --model ...)
  edje eval --model my-edje --first-stage my-probe --data folder photos/ --store photos.store

Writes report.json, report.md and recall_at_k.png (and contact_sheet.png) into --out and
prints the markdown table.
"""

DATA_KINDS = ("builtin", "folder", "flickr30k", "coco")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="two-stage retrieval: first stage top-k, EDJE rerank, recall@k both ways",
        description=(
            "Retrieve top-k candidates with a first-stage embedding model both ways (caption -> "
            "images, image -> captions), rerank them with EDJE, and report first-stage and "
            "reranked recall@k side by side (clip_benchmark names, ties against the query)."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="EDJE_DIR", help="EDJE model folder or Hub id")
    parser.add_argument(
        "--first-stage",
        required=True,
        metavar="DIR_OR_ID",
        help="a saved LinearProbeEmbedding folder, a CLIP/SigLIP Hub id or folder, or "
        "'train-builtin' (fit the offline linear probe on the built-in train split first)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar=("KIND", "PATH"),
        help="builtin | folder PATH | flickr30k [DATA_DIR] | coco [DATA_DIR]",
    )
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--store", metavar="STORE", help="token store with every image's tokens")
    parser.add_argument(
        "--force",
        action="store_true",
        help="use --store even if its fingerprint differs from the model's (warns instead)",
    )
    parser.add_argument("--k", type=int, default=10, help="rerank depth (default: 10)")
    parser.add_argument(
        "--extra-k", type=int, nargs="*", default=[], metavar="K", help="more rerank depths"
    )
    parser.add_argument("--out", metavar="DIR", help="folder for the report files")
    parser.add_argument(
        "--contact-sheet", type=int, default=0, metavar="N", help="picture N queries' top 5"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per forward pass")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: auto)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.add_argument(
        "--save-first-stage", metavar="DIR", help="keep the first stage (e.g. train-builtin's)"
    )
    parser.set_defaults(func=run)


def load_data(spec: list[str], split: str):
    """``["builtin"]``, ``["folder", PATH]``, ``["flickr30k", DATA_DIR?]``, ``["coco", ...]``."""
    kind, rest = spec[0], spec[1:]
    if kind not in DATA_KINDS or len(rest) > 1 or (kind == "folder" and not rest):
        raise SystemExit(
            f"edje eval: --data expects one of builtin | folder PATH | flickr30k [DATA_DIR] | "
            f"coco [DATA_DIR], got {' '.join(spec)!r}"
        )
    if kind == "builtin":
        from edje.data import make_builtin_dataset

        return make_builtin_dataset()[split]
    if kind == "folder":
        from edje.data import load_image_folder

        return load_image_folder(rest[0], split=split)
    from edje.data import load_coco_karpathy, load_flickr30k

    loader = load_flickr30k if kind == "flickr30k" else load_coco_karpathy
    return loader(split, data_dir=rest[0] if rest else None)


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

    dataset = load_data(args.data, args.split)
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
        dataset_name=args.data[0] if args.data[0] != "folder" else args.data[1],
        show_progress_bar=True,
        force_store=args.force,
    )
    print(report.to_markdown())
    if args.out:
        paths = report.save(args.out, dataset=dataset, contact_sheet=args.contact_sheet)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
