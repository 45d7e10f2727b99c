"""The `edje` command line: one sub-command per module in `edje.commands`.

Quiet by default: transformers' and Lightning's informational lines and weight-loading bars are
off (edje's own progress bars and warnings stay); `-v/--verbose`, anywhere on the line, brings
them back. A user mistake (a bad path, a refused value: argparse's errors, a command's
`edje.commands.UsageError`) is one line on stderr and exit code 2; `--verbose` or
`EDJE_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from edje import __version__, commands, register_auto_classes

VERBOSE_FLAGS = ("-v", "--verbose")
# Mistakes in what a user passed: edje refuses bad input with ValueError (naming what was
# expected), missing or unreadable files and Hub ids end in OSError, and a command whose extra
# is not installed in ImportError (naming it).
USER_ERRORS = (ValueError, OSError, ImportError)


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes as one line naming the command and where its help is, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="edje",
        description="EDJE: encode images once, rerank image-text candidates fast.",
    )
    parser.add_argument("--version", action="version", version=f"edje {__version__}")
    parser.add_argument(
        *VERBOSE_FLAGS,
        action="store_true",
        help="show the libraries' logs and loading bars, and tracebacks (anywhere on the line)",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=OneLineErrors
    )
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in VERBOSE_FLAGS for a in argv)
    argv = [a for a in argv if a not in VERBOSE_FLAGS]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "pass_through", False):  # a command that parses its own arguments
        args.pass_through_args = rest
        if rest in (["--help"], ["-h"]) and getattr(args, "quick_help", None):
            print(args.quick_help, end="")  # its own help, before any heavy import
            return 0
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if not verbose:
        quiet_libraries()
    register_auto_classes()  # deferred by the console script (edje_cli) until a command runs
    return int(args.func(args) or 0)


def quiet_libraries() -> None:
    """Turn off transformers' info logs and weight-loading bars and Lightning's info lines
    ("GPU available", tips); warnings still show."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    # Lightning sets its package loggers to INFO when imported (later, lazily), so the loggers
    # its info lines go through are quieted by name too.
    rank_zero = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_utilities", *rank_zero):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers_logging.set_verbosity_error()
    downloads_show_bars = not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # turns off the Hub's bars too ...
    if downloads_show_bars:
        hub_utils.enable_progress_bars()  # ... which a long download should keep


def run() -> None:
    """The `edje` console entry point: `main`, with user mistakes as one line, exit code 2."""
    argv = sys.argv[1:]
    debug = os.environ.get("EDJE_DEBUG") == "1" or any(a in VERBOSE_FLAGS for a in argv)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("edje: interrupted", file=sys.stderr)
        sys.exit(130)
    except commands.UsageError as error:  # its message names the command: "edje x: ..."
        if debug:
            raise
        print(one_line(error), file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"edje: error: {one_line(error)} (--verbose shows the traceback)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    run()
