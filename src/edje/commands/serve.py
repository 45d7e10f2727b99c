"""`edje serve`: the HTTP rerank service (Cohere/Jina shape) over a model and a token store."""

from __future__ import annotations

import argparse

from edje.commands import (
    UsageError,
    add_device_option,
    add_first_stage_option,
    add_model_option,
    add_scoring_options,
    add_store_option,
    count,
    existing_folder,
    port,
    scoring_options,
)

EXAMPLE = """examples:
  edje serve --quickstart edje-quickstart    # the quickstart's model, store and search page
  edje serve --model my-edje --store my-store --port 8000
  curl -s localhost:8000/v1/rerank -H 'Content-Type: application/json' \\
    -d '{"query": "a dog on a beach", "documents": ["img-17", "img-42"], "top_n": 1}'
  # -> {"model": "my-edje", "results": [{"index": 1, "relevance_score": 0.93}], ...}

documents are image ids in the store ("img-17" or {"image_id": "img-17"}) or base64 images
({"image": "<base64>"}); GET /health shows the batching counters. With --first-stage (or
--quickstart), GET / is a search page: the first stage's top k beside EDJE's reranking.
"""


# --flag, ServeLimits field, type, what it bounds
LIMIT_OPTIONS = [
    ("--max-documents", "max_documents", count, "documents per request"),
    ("--max-body-bytes", "max_body_bytes", count, "request body size"),
    ("--max-batch-pairs", "max_batch_pairs", count,
     "(query, image) pairs per forward, across requests"),
    ("--max-query-chars", "max_query_chars", count, "characters in a request's query"),
    ("--max-request-pixels", "max_request_pixels", count,
     "pixels of all base64 images of a request together, from their headers"),
    ("--max-pixels-in-flight", "max_pixels_in_flight", count,
     "base64 pixels decoded and held at once, across requests"),
    ("--max-body-bytes-in-flight", "max_body_bytes_in_flight", count,
     "request body bytes held at once, across requests"),
    ("--max-wait-ms", "max_wait_ms", float,
     "how long a forward waits for other requests to join"),
    ("--max-forward-ms", "max_forward_ms", float,
     "a forward's target time: how long a request may wait behind a large one"),
    ("--header-timeout", "header_timeout_s", float,
     "seconds a connection has to send its request head"),
    ("--body-timeout", "body_timeout_s", float, "seconds a request has to send its body"),
]  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve POST /v1/rerank (Cohere/Jina shape) over HTTP",
        description=(
            "Load an EDJE model and its token store and answer rerank requests over HTTP: "
            "POST /v1/rerank, GET /health, GET /v1/models. Concurrent requests are scored "
            "together in one forward. Needs the serving extra: pip install 'edje[serving]'."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(parser)
    add_store_option(parser)
    _add_page_options(parser.add_argument_group("search page (GET /)"))
    _add_network_options(parser)
    _add_limit_options(parser.add_argument_group("limits (ServeLimits)"))
    add_device_option(parser)
    add_scoring_options(parser)
    parser.add_argument(
        "--force", action="store_true", help="use a store made by another encoder (warns)"
    )
    parser.set_defaults(func=run)


def _add_page_options(page) -> None:
    page.add_argument(
        "--quickstart",
        type=existing_folder,
        metavar="DIR",
        help="an `edje quickstart` folder: its model, store, first stage, images and captions",
    )
    page.add_argument(
        "--set",
        default="builtin",
        help="which of the quickstart's data sets the page searches (default: %(default)s)",
    )
    add_first_stage_option(page)
    page.add_argument(
        "--index", type=existing_folder, help="saved first-stage index (edje index); "
        "default: built from a raw store"
    )  # fmt: skip
    page.add_argument("--images", type=existing_folder, help="folder of the store's image files")
    page.add_argument("--captions", help="captions for image -> text (one a line, or JSONL)")


def _add_network_options(parser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only)",
    )
    parser.add_argument(
        "--port", type=port, default=8000, help="port to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept requests whose Host header is NAME (repeatable; '*': any). By "
        "default only the address a request came in on (and localhost) is accepted, so a web "
        "page cannot reach this server through DNS rebinding",
    )
    parser.add_argument(
        "--served-model-name",
        "--served-name",
        dest="served_name",
        metavar="NAME",
        help="model name in requests and responses (default: the model folder's name, or the "
        "Hub id; never a local path)",
    )


def _add_limit_options(limits) -> None:
    from edje.serving.requests import ServeLimits

    defaults = ServeLimits()
    for flag, field, kind, what in LIMIT_OPTIONS:
        limits.add_argument(
            flag, dest=field, type=kind, default=getattr(defaults, field), metavar="N",
            help=f"{what} (default: %(default)s)",
        )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UsageError(f"edje serve: needs {error.name}: pip install 'edje[serving]'") from None
    from edje.rerank import EDJEReranker
    from edje.serving.app import RerankerBackend, ServeLimits, create_app, run_server

    try:
        limits = ServeLimits(**{field: getattr(args, field) for _, field, _, _ in LIMIT_OPTIONS})
    except ValueError as error:
        raise UsageError(f"edje serve: {error}") from None
    _fill_from_quickstart(args)
    if not (args.model and args.store):
        raise UsageError("edje serve: give --model and --store, or --quickstart DIR")
    print(f"loading {args.model} and {args.store}", flush=True)
    reranker = EDJEReranker(args.model, store=args.store, device=args.device,
                            force_store=args.force, **scoring_options(args))  # fmt: skip
    name, size = args.served_name or served_name(args.model), len(reranker.store)
    app = create_app(
        RerankerBackend(reranker), model_name=name, limits=limits, store_size=size,
        allowed_hosts=args.allowed_hosts,
    )  # fmt: skip
    where = f"http://{args.host}:{args.port}"
    if args.first_stage:
        from edje.serving.search_page import add_search_page

        add_search_page(app, _collection(args, reranker))
        print(f"search page: {where}/", flush=True)
    print(f"serving {name!r} ({size} images, {reranker.device}) on {where}/v1/rerank (also "
          "/rerank, /v2/rerank)", flush=True)  # fmt: skip
    run_server(app, host=args.host, port=args.port)
    return 0


def _fill_from_quickstart(args: argparse.Namespace) -> None:
    """--quickstart DIR: what `edje quickstart` left in DIR, for the options not given."""
    if not args.quickstart:
        return
    from pathlib import Path

    root = Path(args.quickstart)
    images = root / "images" / args.set
    if not (root / "raw.store").is_dir() or not images.is_dir():
        raise UsageError(
            f"edje serve: {root} is not an `edje quickstart` folder with a {args.set!r} set "
            "(no raw.store or images/ in it); run `edje quickstart --out DIR` first"
        )
    if not (args.model or args.served_name):  # "model" says nothing: the folder's own name
        args.served_name = served_name(root)
    args.model = args.model or str(root / "model")
    args.store = args.store or str(root / "raw.store")
    args.first_stage = args.first_stage or str(root / "first_stage" / args.set)
    args.images = args.images or str(images)
    args.captions = args.captions or str(images / "captions.jsonl")


def served_name(model: str) -> str:
    """The name a model is served under by default: a local folder's own name (a path would
    tell clients where the server keeps its files), else the Hub id as given."""
    from pathlib import Path

    folder = Path(model).expanduser()
    return folder.resolve().name if folder.is_dir() else model


def _collection(args: argparse.Namespace, reranker):
    """What the search page searches: the index's images (or the store's, restricted to the
    image folder's files when one is given)."""
    from edje.data import read_captions
    from edje.first_stage import VectorIndex, load_embedding_model
    from edje.serving.search_page import Collection, image_ids_in

    first_stage = load_embedding_model(args.first_stage)
    if args.index:
        index = VectorIndex.load(args.index, require_ids=True)
    else:
        only = image_ids_in(args.images, reranker.store.ids) if args.images else None
        index = VectorIndex.from_store(reranker.store, first_stage, ids=only)
    captions = read_captions(args.captions) if args.captions else []
    return Collection(reranker, first_stage, index, images=args.images, captions=captions)
