"""`edje serve`: the HTTP rerank service (Cohere/Jina shape) over a model and a token store."""

from __future__ import annotations

import argparse

from edje.commands import count, existing_folder, folder_or_id

EXAMPLE = """example:
  edje serve --model my-edje --store my-store --port 8000
  curl -s localhost:8000/v1/rerank -H 'Content-Type: application/json' \\
    -d '{"query": "a dog on a beach", "documents": ["img-17", "img-42"], "top_n": 1}'
  # -> {"model": "my-edje", "results": [{"index": 1, "relevance_score": 0.93}], ...}

documents are image ids in the store ("img-17" or {"image_id": "img-17"}) or base64 images
({"image": "<base64>"}); GET /health shows the batching counters.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from edje.serving.requests import ServeLimits

    defaults = ServeLimits()
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
    parser.add_argument(
        "--model", type=folder_or_id, required=True, help="model folder (with its processor)"
    )
    parser.add_argument(
        "--store",
        type=existing_folder,
        required=True,
        help="token store folder made for this model",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--served-name",
        default=None,
        help="model name in requests and responses (default: --model)",
    )
    parser.add_argument(
        "--max-documents",
        type=count,
        default=defaults.max_documents,
        help="documents per request (default: %(default)s)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=count,
        default=defaults.max_body_bytes,
        help="request body size (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-pairs",
        type=count,
        default=defaults.max_batch_pairs,
        help="(query, image) pairs per forward, across requests (default: %(default)s)",
    )
    parser.add_argument(
        "--max-query-chars",
        type=count,
        default=defaults.max_query_chars,
        help="characters in a request's query (default: %(default)s)",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=count,
        default=defaults.max_request_pixels,
        help="pixels of all base64 images of a request together, from their headers "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-pixels-in-flight",
        type=count,
        default=defaults.max_pixels_in_flight,
        help="base64 pixels decoded and held at once, across requests (default: %(default)s)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout_s,
        help="seconds a connection has to send its request head (default: %(default)s)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout_s,
        help="seconds a request has to send its body (default: %(default)s)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=defaults.max_wait_ms,
        help="how long a forward waits for other requests to join (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if there is one)"
    )
    parser.add_argument(
        "--force", action="store_true", help="use a store made by another encoder (warns)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"edje serve needs {error.name}: pip install 'edje[serving]'") from None
    from edje.rerank import EDJEReranker
    from edje.serving.app import RerankerBackend, ServeLimits, create_app, run_server

    try:
        limits = ServeLimits(
            max_documents=args.max_documents,
            max_body_bytes=args.max_body_bytes,
            max_batch_pairs=args.max_batch_pairs,
            max_wait_ms=args.max_wait_ms,
            max_query_chars=args.max_query_chars,
            max_request_pixels=args.max_request_pixels,
            max_pixels_in_flight=args.max_pixels_in_flight,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
        )
    except ValueError as error:
        raise SystemExit(f"edje serve: {error}") from None
    print(f"loading {args.model} and {args.store}", flush=True)
    reranker = EDJEReranker(
        args.model, store=args.store, device=args.device, force_store=args.force
    )
    name, size = args.served_name or args.model, len(reranker.store)
    app = create_app(RerankerBackend(reranker), model_name=name, limits=limits, store_size=size)
    where = f"http://{args.host}:{args.port}/v1/rerank"
    print(f"serving {name!r} ({size} images, {reranker.device}) on {where}", flush=True)
    run_server(app, host=args.host, port=args.port)
    return 0
