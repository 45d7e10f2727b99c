"""`edje search`: first stage top-k, then EDJE reranks them; one query from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edje.commands import (
    UsageError,
    add_device_option,
    add_first_stage_option,
    add_model_option,
    add_scoring_options,
    add_store_option,
    caption_text,
    count,
    scoring_options,
)

EXAMPLE = """examples:
  # caption -> images: a saved index over the store's ids (see `edje index --help`)
  edje search --model my-edje --store photos.store --first-stage my-probe \\
      --index photos.index "a dog catching a frisbee"
  # a store of raw tokens needs no index: the first stage embeds them on the fly
  edje search --model my-edje --store photos.raw --first-stage my-probe --k 50 --top 5 "a dog"
  # image -> captions: the query is an image file, candidates one caption per line
  edje search --images --model my-edje --first-stage my-probe --captions captions.txt dog.jpg

--first-stage embeds the query (and, with --images, the captions); it and --store default to
first_stage/ and raw.store/ beside the model folder, as `edje quickstart` leaves them. --store
holds the images' tokens (caption -> images needs it). --captions reads one caption
per line, or JSONL lines with a "caption" (or "text") field. The table lists rank, image id (or
caption line), EDJE's reranked score and the first stage's score; --json prints the same list.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search a token store with a caption (or captions with an image): top-k, rerank",
        description=(
            "Retrieve the first stage's top-k candidates for QUERY, rerank them with EDJE and "
            "print the best. Caption -> images by default; --images for image -> captions."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "query", type=caption_text, metavar="QUERY", help="a caption (an image path with --images)"
    )
    add_model_option(parser, required=True)
    add_first_stage_option(parser)
    add_store_option(parser)
    parser.add_argument("--index", metavar="DIR", help="a saved VectorIndex over the store's ids")
    parser.add_argument("--images", action="store_true", help="image -> captions (--captions)")
    parser.add_argument("--captions", metavar="FILE", help="candidate captions for --images")
    parser.add_argument("--k", type=count, default=10, help="first-stage candidates (default: 10)")
    parser.add_argument("--top", type=count, default=None, metavar="N", help="print the best N")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device_option(parser)
    add_scoring_options(parser)
    parser.add_argument("--force", action="store_true", help="use a store of another fingerprint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edje.first_stage import load_embedding_model

    beside_the_model(args)
    first_stage = load_embedding_model(args.first_stage)
    if args.device:
        first_stage.to(args.device)
    hits = search_captions(args, first_stage) if args.images else search_images(args, first_stage)
    if args.json:
        print(json.dumps(hits, indent=2))
    else:
        print_table(hits, "caption" if args.images else "image_id")
    if hits and max(h["score"] for h in hits) < TINY:
        print(f"edje search: every score is below {TINY}: {unknown_caption_hint(args)}",
              file=sys.stderr)  # fmt: skip
    return 0


TINY = 0.01  # a sigmoid score this low: EDJE sees no match among the candidates


def beside_the_model(args: argparse.Namespace) -> None:
    """Fill --first-stage / --store from the folder holding the model (`edje quickstart`
    leaves model/, first_stage/ and raw.store/ side by side), saying so. A first_stage/ of
    one first stage per data set (`first_stage/builtin`, ...) is used when it holds one."""
    folder = Path(args.model).parent
    if Path(args.model).is_dir():
        found = {"first_stage": _first_stages(folder / "first_stage"), "store": []}
        if (folder / "raw.store").is_dir():
            found["store"] = [folder / "raw.store"]
        for option, beside in found.items():
            if getattr(args, option) is None and len(beside) == 1:
                setattr(args, option, str(beside[0]))
                flag = option.replace("_", "-")
                print(f"edje search: --{flag} {beside[0]} (beside the model)", file=sys.stderr)
    if args.first_stage is None:
        several = _first_stages(folder / "first_stage") if Path(args.model).is_dir() else []
        choices = f": one of {', '.join(map(str, several))}" if len(several) > 1 else ""
        raise UsageError(
            f"edje search: give --first-stage{choices} (no single first stage beside the "
            f"model in {folder})"
        )


def _first_stages(folder: Path) -> list[Path]:
    """`folder` if it holds a first stage (files), else its sub-folders that do."""
    if not folder.is_dir():
        return []
    if any(p.is_file() for p in folder.iterdir()):
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and any(p.iterdir()))


def unknown_caption_hint(args: argparse.Namespace) -> str:
    """What to try when nothing scores: captions like the ones the model was trained on (the
    export records a few in its config)."""
    config = Path(args.model) / "config.json"
    examples = json.loads(config.read_text()).get("example_captions") if config.is_file() else None
    if examples:
        shown = "; ".join(f"'{c}'" for c in examples[:3])
        return f"the model may not know this kind of caption; it was trained on ones like {shown}."
    return "the model may not know this kind of caption; try one like those it was trained on."


def search_images(args: argparse.Namespace, first_stage) -> list[dict]:
    """Caption -> images: index top-k, then `EDJEReranker.rank_many`."""
    from edje.first_stage import VectorIndex
    from edje.rerank import EDJEReranker
    from edje.store import TokenStore

    if not args.store:
        raise UsageError("edje search: caption -> image search needs --store (the image tokens)")
    store = TokenStore.open(args.store)
    index = (
        VectorIndex.load(args.index, require_ids=True)
        if args.index
        else VectorIndex.from_store(store, first_stage)
    )
    reranker = EDJEReranker(args.model, store=store, device=args.device, force_store=args.force,
                            **scoring_options(args))  # fmt: skip
    query = reranker.model.config.prepare_captions([args.query])
    scores, positions = index.search(first_stage.encode_texts(query), k=args.k)
    hits = reranker.rank_many([args.query], positions, scores, top_k=args.top, ids=index.ids)[0]
    return [{"rank": r, **hit} for r, hit in enumerate(hits, 1)]


def search_captions(args: argparse.Namespace, first_stage) -> list[dict]:
    """Image -> captions: exact top-k over the caption file, then `EDJEReranker.rank` with the
    image as the query."""
    from edje._utils import load_rgb
    from edje.rerank import EDJEReranker

    if not args.captions:
        raise UsageError("edje search --images: give the candidate captions with --captions FILE")
    from edje.data import read_captions

    captions = read_captions(args.captions)
    image = load_rgb(args.query)
    reranker = EDJEReranker(args.model, store=args.store, device=args.device,
                            force_store=args.force, **scoring_options(args))  # fmt: skip
    texts = reranker.model.config.prepare_captions(captions)
    similarity = first_stage.encode_texts(texts) @ first_stage.encode_images([image])[0]
    first_scores, lines = similarity.topk(min(args.k, len(captions)))
    candidates = [captions[i] for i in lines.tolist()]
    hits = reranker.rank(image, candidates, top_k=args.top, first_stage_scores=first_scores)
    return [
        {
            "rank": r,
            "corpus_id": int(lines[hit["corpus_id"]]),
            "caption": candidates[hit["corpus_id"]],
            **{k: v for k, v in hit.items() if k != "corpus_id"},
            "first_stage_rank": hit["corpus_id"],
        }
        for r, hit in enumerate(hits, 1)
    ]


def print_table(hits: list[dict], what: str) -> None:
    if not hits:
        print("no results", file=sys.stderr)
        return
    width = max(len(what), *(len(str(h[what])) for h in hits))
    print(f"{'rank':>4}  {what:<{width}}  {'score':>8}  {'first stage':>11}")
    for hit in hits:
        first = hit.get("first_stage_score")
        first = "" if first is None else f"{first:11.4f}"
        print(f"{hit['rank']:>4}  {hit[what]!s:<{width}}  {hit['score']:8.4f}  {first:>11}")
