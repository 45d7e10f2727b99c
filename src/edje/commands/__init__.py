"""Sub-commands of the `edje` command line, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returning the exit code).
"""
