"""Sub-commands of the `edje` command line, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returning the exit code).
"""

import argparse


def count(text: str) -> int:
    """An argparse type for sizes and counts: a whole number >= 1, refused by name otherwise
    (a batch size of 0 or -1 must not run and report success)."""
    return _at_least(text, 1)


def whole_number(text: str) -> int:
    """An argparse type for a number of workers or pictures: a whole number >= 0."""
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
    return value


def port(text: str) -> int:
    """An argparse type for a TCP port: 0 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text}")
    return value


def unicode_problem(text: str) -> str | None:
    """What keeps `text` from being Unicode text a tokenizer takes (a lone surrogate: from a
    JSON `\\ud800` escape, or bytes of a command line that are not UTF-8), or None."""
    for position, character in enumerate(text):
        if "\ud800" <= character <= "\udfff":
            return f"a lone surrogate (U+{ord(character):04X}) at character {position}"
    return None


def caption_text(value: str) -> str:
    """An argparse type for a caption or query: valid Unicode text."""
    problem = unicode_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"not valid Unicode text: {problem}")
    return value


def folder_or_id(text: str) -> str:
    """An argparse type for a folder or Hub id: a path that cannot be a Hub id (absolute, or
    starting with `.` or `~`) must exist, so a typo is named as a missing folder rather than
    as an invalid repository name."""
    from pathlib import Path

    path = Path(text).expanduser()
    if text.startswith(("/", ".", "~")) and not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return str(path) if text.startswith("~") else text


def existing_folder(text: str) -> str:
    """An argparse type for a folder that must exist (images to read, a store to serve)."""
    from pathlib import Path

    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return str(Path(text).expanduser())


def output_folder(text: str) -> str:
    """An argparse type for a folder to write: its nearest existing ancestor must be a folder
    this user can write in, so a bad `--out` fails before minutes of work rather than after."""
    import os
    from pathlib import Path

    path = Path(text).expanduser()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no write permission in {ancestor}")
    return str(path)


PRECISIONS = ("float32", "bfloat16", "float16", "exact")  # edje.scoring.exact.PRECISIONS


def add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """`--backend` and `--precision` (alias `--dtype`): how a command that reranks scores."""
    from edje.scoring import BACKENDS

    parser.add_argument(
        "--backend", choices=BACKENDS, default="fast",
        help="scoring backend (edje.scoring; default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", "--dtype", dest="precision", choices=PRECISIONS, default=None,
        help="scoring precision (default: float32, the model's own answer; bfloat16 is faster "
        "and may swap close candidates; exact: bf16, then fp32 for the candidates that could "
        "change the top k, fp32's answer where only the top k is kept (edje search; edje serve "
        "for requests with top_n and the page's 'show'); where every score is wanted (edje "
        "rerank, eval) exact scores in fp32)",
    )  # fmt: skip


def scoring_options(args: argparse.Namespace) -> dict:
    """`EDJEReranker`'s `backend` and `precision` from `add_scoring_options`' flags."""
    return {"backend": args.backend, "precision": args.precision}


def add_column_options(parser, dataset_defaults: str = "") -> None:
    """`--caption-column`, `--image-column`, `--id-column`: which columns of a `--data` folder
    or Hub data set hold what (`edje.data.load_data`); `dataset_defaults` adds how another
    source of the command reads them."""
    parser.add_argument(
        "--caption-column",
        metavar="NAME",
        help="--data folder's or Hub data set's caption column (default: caption/captions, "
        "else text, sentences or sentence)",
    )
    parser.add_argument(
        "--image-column",
        metavar="NAME",
        help="--data Hub data set's image column (default: image, img, jpg or png)"
        + dataset_defaults.format(default="image"),
    )
    parser.add_argument(
        "--id-column",
        metavar="NAME",
        help="--data Hub data set's image id column, rows with one id being one image (default:"
        " image_id, filename, file_name or img_id, else split/row)"
        + dataset_defaults.format(default="id"),
    )


def column_options(args) -> dict[str, str | None]:
    """What `add_column_options` parsed, as `load_data`'s keyword arguments."""
    names = ("caption_column", "image_column", "id_column")
    return {name: getattr(args, name) for name in names}
