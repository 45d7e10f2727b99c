"""Sub-commands of the `edje` command line, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returning the exit code).
"""

import argparse


def count(text: str) -> int:
    """An argparse type for sizes and counts: a whole number >= 1, refused by name otherwise
    (a batch size of 0 or -1 must not run and report success)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value
