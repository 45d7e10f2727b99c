"""The `edje` command line's one error path (`UsageError`: one line naming the command, exit
code 2) and its shared options (one meaning, one help text, wherever they are taken)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from unittest.mock import patch

import pytest

from edje.cli import build_parser
from edje.commands import UsageError

# One user mistake per command that finds mistakes past argument parsing, each caught before
# any model is loaded: {tmp} is an empty folder (a model folder with nothing beside it).
MISTAKES = {
    "calibrate": (["calibrate", "--model", "owner/hub-model", "--store", "{tmp}", "--captions",
                   "c.txt"], "--model must be a saved EDJE folder"),
    "convert": (["convert", "{tmp}", "--out", "{tmp}/c"], "holds no weights file"),
    "encode": (["encode", "--images", "{tmp}", "--out", "{tmp}/s"], "give --vision"),
    "encode-data": (["encode", "--vision", "v", "--data", "a", "b", "c", "--out", "{tmp}/s"],
                    "--data expects NAME [DATA_DIR], got 'a b c'"),
    "eval": (["eval", "--first-stage", "train-builtin", "--data", "folder", "a", "b", "c"],
             "--data expects NAME [DATA_DIR], got 'folder a b c'"),
    "index": (["index", "--first-stage", "f", "--images", "{tmp}", "--out", "{tmp}/i"],
              "no image files under"),
    "rerank": (["rerank", "--model", "m", "--input", "{tmp}/absent.jsonl", "--output",
                "{tmp}/out.jsonl"], "no input file"),
    "search": (["search", "--model", "{tmp}", "a cat"], "give --first-stage"),
    "serve": (["serve", "--store", "{tmp}"], "give --model and --store, or --quickstart DIR"),
}  # fmt: skip


def _run(argv: list[str]):
    from edje.cli import run

    with pytest.raises(SystemExit) as exit_info, patch.object(sys, "argv", ["edje", *argv]):
        run()
    return exit_info.value.code


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_user_mistake_is_one_line_naming_the_command_and_exit_code_2(
    mistake, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("EDJE_DEBUG", raising=False)
    argv, expected = MISTAKES[mistake]
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"edje {argv[0]}: ") and expected in err[0], err
    assert not any(tmp_path.iterdir())  # nothing made


def test_verbose_or_edje_debug_shows_the_usage_errors_traceback(tmp_path, monkeypatch):
    from edje.cli import run

    argv = ["edje", "rerank", "--model", "m", "--input", str(tmp_path / "absent.jsonl"),
            "--output", str(tmp_path / "out.jsonl")]  # fmt: skip
    with pytest.raises(UsageError, match="no input file"), patch.object(sys, "argv", [*argv, "-v"]):
        run()
    monkeypatch.setenv("EDJE_DEBUG", "1")
    with pytest.raises(UsageError, match="no input file"), patch.object(sys, "argv", argv):
        run()


def test_the_console_entry_exits_2_with_one_line_for_a_usage_error():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("EDJE_DEBUG", None)
    argv = ["eval", "--first-stage", "train-builtin", "--data", "a", "b", "c"]
    result = subprocess.run([sys.executable, "-m", "edje.cli", *argv], capture_output=True,
                            text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "edje eval: --data expects NAME [DATA_DIR], got 'a b c'"
    ]


SHARED = ("--model", "--store", "--first-stage", "--device", "--data", "--backend", "--precision")
SCORING = {"search", "rerank", "eval", "serve"}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A command's listed options by flag (unlisted ones are renamed flags kept for old
    command lines, such as `edje encode --dtype`, now `--store-dtype`)."""
    listed = (a for a in parser._actions if a.help is not argparse.SUPPRESS)
    return {flag: action for action in listed for flag in action.option_strings}


def _commands() -> dict[str, dict[str, argparse.Action]]:
    subparsers = build_parser()._subparsers._group_actions[0]
    return {name: _options(parser) for name, parser in subparsers.choices.items()}


@pytest.mark.parametrize("flag", SHARED)
def test_a_shared_option_has_one_help_text_default_and_type_in_every_command(flag):
    taken = {name: opts[flag] for name, opts in _commands().items() if flag in opts}
    assert len(taken) >= 2, f"{flag} is taken by {sorted(taken)} only"
    described = {
        (a.help, a.default, a.metavar, a.type, a.choices, a.nargs, a.dest, tuple(a.option_strings))
        for a in taken.values()
    }
    assert len(described) == 1, f"{flag} differs across {sorted(taken)}: {described}"


def test_the_scoring_commands_take_backend_and_precision_and_data_means_one_thing():
    commands = _commands()
    for name in SCORING:
        assert {"--backend", "--precision", "--dtype"} <= set(commands[name]), name
    assert {n for n, opts in commands.items() if "--data" in opts} == {"encode", "eval"}
    assert {n for n, opts in commands.items() if "--dtype" in opts} == SCORING  # one meaning


def test_encodes_renamed_flags_still_parse_as_before():
    parser = build_parser()
    base = ["encode", "--images", ".", "--out", "s"]
    old = parser.parse_args([*base, "--dtype", "int8", "--precision", "bf16-mixed"])
    new = parser.parse_args([*base, "--store-dtype", "int8", "--trainer-precision", "bf16-mixed"])
    assert (old.dtype, old.precision) == (new.dtype, new.precision) == ("int8", "bf16-mixed")
    default = parser.parse_args(base)
    assert (default.dtype, default.precision) == ("float16", None)
    assert parser.parse_args(["eval", "--first-stage", "f", "--data", "folder", "x"]).data == [
        "folder",
        "x",
    ]
