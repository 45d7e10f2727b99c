"""`edje rerank`: score (query, document) pairs from a JSONL file into a JSONL file, streaming."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edje.commands import (
    UsageError,
    add_device_option,
    add_model_option,
    add_scoring_options,
    add_store_option,
    count,
    scoring_options,
    unicode_problem,
)

EXAMPLE = """examples:
  edje rerank --model my-edje --store photos.store --input pairs.jsonl --output scores.jsonl

Input, one JSON object per line (documents: --store ids, else image file paths):
  {"query": "a dog catching a frisbee", "document": "dogs/001.jpg"}
  {"query": "a red bus", "documents": ["bus/01.jpg", "bus/02.jpg", "cars/07.jpg"]}
Output, the same objects in the same order with "score" (or "scores", one per document) added:
  {"query": "a dog catching a frisbee", "document": "dogs/001.jpg", "score": 0.93}

A malformed line (bad JSON, no query, no document, unknown id) stops the run with an error naming
the line number; the output is written to a temporary file renamed at the end, so a failed run
leaves no partial output. Scores are sigmoid probabilities (--logits for raw logits).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rerank",
        help="score query/document pairs from a JSONL file into a JSONL file",
        description=(
            "Stream (query, document) pairs from --input through EDJE in batches and write each "
            "line back with its score to --output, with a progress bar."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(parser, required=True)
    add_store_option(parser)
    parser.add_argument("--input", required=True, metavar="JSONL", help="pairs to score")
    parser.add_argument("--output", required=True, metavar="JSONL", help="where scores go")
    parser.add_argument("--batch-size", type=count, default=32, help="pairs per forward pass")
    parser.add_argument("--logits", action="store_true", help="write logits, not sigmoid scores")
    add_device_option(parser)
    add_scoring_options(parser)
    parser.add_argument("--force", action="store_true", help="use a store of another fingerprint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edje._utils import atomic_write, progress
    from edje.rerank import EDJEReranker

    source = Path(args.input)
    if not source.is_file():
        raise UsageError(f"edje rerank: no input file {source}")
    reranker = EDJEReranker(args.model, store=args.store, device=args.device,
                            force_store=args.force, **scoring_options(args))  # fmt: skip
    with source.open(encoding="utf-8") as file:
        total = sum(1 for line in file if line.strip())
    output = Path(args.output)

    def write(temp: str) -> None:
        with source.open(encoding="utf-8") as lines, open(temp, "w", encoding="utf-8") as out:
            bar = progress(total, False if args.no_progress else None, "edje rerank", "line")
            with bar:
                for batch in _batches(lines, reranker, args.batch_size, source):
                    for record in _score(reranker, batch, args.logits, args.batch_size):
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bar.update(len(batch))

    atomic_write(output, write)
    print(f"wrote {total} lines to {output}")
    return 0


def _batches(lines, reranker, batch_size: int, source: Path):
    """Lists of parsed records holding about `batch_size` pairs; errors name the line."""
    batch, pairs = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line, reranker, f"{source}:{number}")
        batch.append(record)
        pairs += len(record["documents"]) if "documents" in record else 1
        if pairs >= batch_size:
            yield batch
            batch, pairs = [], 0
    if batch:
        yield batch


def _parse(line: str, reranker, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"edje rerank: {where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise UsageError(f"edje rerank: {where}: expected a JSON object, got {line.strip()[:80]}")
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        raise UsageError(f'edje rerank: {where}: "query" must be a non-empty string')
    if ("document" in record) == ("documents" in record):
        raise UsageError(f'edje rerank: {where}: expected exactly one of "document", "documents"')
    documents = record.get("documents", [record.get("document")])
    if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        raise UsageError(f"edje rerank: {where}: documents must be strings (ids or image paths)")
    for field, value in (("query", query), *(("document", d) for d in documents)):
        if problem := unicode_problem(value):
            raise UsageError(f"edje rerank: {where}: the {field} is not valid Unicode: {problem}")
    store = reranker.store
    for document in documents:
        if not (store is not None and document in store) and not Path(document).is_file():
            where_from = f"in the store {store.path}" if store is not None else "(no --store)"
            raise UsageError(
                f"edje rerank: {where}: document {document!r} is neither an image id "
                f"{where_from} nor an image file"
            )
    return record


def _score(reranker, batch: list[dict], logits: bool, batch_size: int) -> list[dict]:
    import torch

    pairs = []
    for record in batch:
        documents = record.get("documents", [record.get("document")])
        pairs.extend((record["query"], d) for d in documents)
    activation = torch.nn.Identity() if logits else None
    scores = reranker.predict(pairs, batch_size=batch_size, activation_fn=activation).tolist()
    out, start = [], 0
    for record in batch:
        if "documents" in record:
            count = len(record["documents"])
            out.append({**record, "scores": scores[start : start + count]})
        else:
            count = 1
            out.append({**record, "score": scores[start]})
        start += count
    return out
