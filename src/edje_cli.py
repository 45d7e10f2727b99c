"""The `edje` console script.

`import edje` registers edje's model type with transformers' Auto classes, which imports torch
and transformers (seconds). The console script imports this module first, and `edje` then
leaves the registration to the command that runs, so `edje --help` and usage errors take a
fraction of a second.
"""


def run() -> None:
    from edje.cli import run as run_command_line

    run_command_line()
