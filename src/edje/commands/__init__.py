"""Sub-commands of the `edje` command line, one module each.

Each module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed namespace, returning the exit code). A user mistake found
after parsing is raised as `UsageError`; the options several commands take are declared once
here (`add_model_option`, `add_store_option`, ...), so a flag means the same everywhere.
"""

import argparse


class UsageError(Exception):
    """A user mistake (a refused value, a missing input) found past argument parsing. Its
    message names the command (`edje encode: ...`); `edje.cli.run` prints it as one line and
    exits with code 2, or shows the traceback with `--verbose` / `EDJE_DEBUG=1`."""


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


def add_model_option(parser, required: bool = False) -> None:
    """`--model`: the EDJE model a command scores, encodes or calibrates with."""
    parser.add_argument(
        "--model", type=folder_or_id, required=required, metavar="EDJE_DIR",
        help="EDJE model: a folder (edje fit, convert, quickstart) or Hub id",
    )  # fmt: skip


def add_store_option(parser, required: bool = False) -> None:
    """`--store`: a token store `edje encode` wrote."""
    parser.add_argument(
        "--store", type=existing_folder, required=required, metavar="STORE",
        help="token store folder of the images' tokens (edje encode)",
    )  # fmt: skip


def add_first_stage_option(parser, required: bool = False) -> None:
    """`--first-stage`: the embedding model that retrieves the candidates EDJE reranks."""
    parser.add_argument(
        "--first-stage", type=folder_or_id, required=required, metavar="DIR_OR_ID",
        help="first-stage embedding model: a saved LinearProbeEmbedding folder, or a "
        "CLIP/SigLIP Hub id or folder",
    )  # fmt: skip


def add_device_option(parser) -> None:
    """`--device`: the torch device a command runs its model on."""
    parser.add_argument(
        "--device", default=None, help="torch device: cuda, cuda:1, cpu, ... (default: cuda "
        "if there is one)"
    )  # fmt: skip


def add_data_option(parser, required: bool = False) -> None:
    """`--data NAME [DATA_DIR]`: a data set as `edje.data.load_data` names it (`data_spec`
    reads it)."""
    parser.add_argument(
        "--data", nargs="+", required=required, metavar=("NAME", "DATA_DIR"),
        help="a data set: builtin | emoji | FOLDER | flickr30k [DATA_DIR] | coco [DATA_DIR] | "
        "a Hub data set id OWNER/NAME (see edje.data.load_data; 'folder FOLDER' also works)",
    )  # fmt: skip


def data_spec(spec: list[str], command: str) -> tuple[str, str | None]:
    """`--data`'s values as (name, data_dir): `NAME [DATA_DIR]`, or `folder FOLDER`."""
    named_folder = spec[0] == "folder" and len(spec) > 1
    name, rest = (spec[1], spec[2:]) if named_folder else (spec[0], spec[1:])
    if len(rest) > 1:
        raise UsageError(f"edje {command}: --data expects NAME [DATA_DIR], got {' '.join(spec)!r}")
    return name, (rest[0] if rest else None)


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
