"""The `edje` command line as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest.mock import patch

import pytest

from edje.cli import build_parser, main


def test_help_lists_every_command_with_an_example(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "check" in commands
    for name, sub in commands.items():
        assert "example" in (sub.epilog or ""), f"`edje {name} --help` has no example"
    assert main([]) == 2  # no command: help, and a usage exit code
    assert "COMMAND" in capsys.readouterr().out


def test_check_runs_end_to_end_on_the_offline_backbones(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "edje.cli", "check", "--out", str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded model gives identical scores" in result.stdout
    assert "Loading weights" not in result.stderr  # quiet by default: no weight-loading bars
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "model" / "processor_config.json").is_file()


BAD_PATHS = {
    "eval": ["eval", "--model", "/nope/model", "--first-stage", "train-builtin"],
    "encode": ["encode", "--images", "/nope/images", "--out", "{tmp}/store"],
    "rerank": ["rerank", "--model", "/nope/model", "--input", "a.jsonl", "--output", "b.jsonl"],
    "search": ["search", "--model", "/nope/model", "--first-stage", "p", "a red circle"],
    "serve": ["serve", "--model", "./nope/model", "--store", "/nope/store"],
    "index": ["index", "--first-stage", "~/nope/probe", "--images", "x", "--out", "{tmp}/i"],
    "quickstart": ["quickstart", "--model", "/nope/model", "--out", "{tmp}/q"],
    "convert": ["convert", "/nope/weights.safetensors", "--out", "{tmp}/c"],
    "fit": ["fit", "--config", "/nope/recipe.yaml"],
    "verify": ["verify", "/nope/store"],
    "check": ["check", "--out", "/dev/null/nope"],  # under a file: cannot be made
}


@pytest.mark.parametrize("command", sorted(BAD_PATHS))
def test_a_missing_path_is_one_line_on_stderr_and_exit_code_2(command, tmp_path, capsys):
    from edje.cli import run

    argv = [a.format(tmp=tmp_path) for a in BAD_PATHS[command]]
    with pytest.raises(SystemExit) as exit_info, patch.object(sys, "argv", ["edje", *argv]):
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"edje {command}: error: ") and "nope" in err
    assert not any(tmp_path.iterdir())  # nothing made


def test_a_user_mistake_past_the_arguments_is_one_line_and_verbose_shows_the_trace(
    tmp_path, capsys, monkeypatch
):
    from edje.cli import run

    (tmp_path / "model").mkdir()  # a folder, but no saved model in it
    argv = ["edje", "serve", "--model", str(tmp_path / "model"), "--store", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info, patch.object(sys, "argv", argv):
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edje: error: ") and "--verbose" in err[0]
    assert "no config.json" in err[0]  # what is missing, not "no file named model.safetensors"
    monkeypatch.setenv("EDJE_DEBUG", "1")
    with pytest.raises((ValueError, OSError)), patch.object(sys, "argv", argv):
        run()


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )


def test_the_console_script_builds_its_help_without_importing_torch_or_transformers():
    """`edje --help` starts in a fraction of a second: the console script (`edje_cli`) defers
    the Auto-class registration, and no command imports torch to describe itself."""
    result = _python(
        "import sys, edje_cli\n"
        "from edje.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = ('torch', 'transformers', 'lightning', 'datasets')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_command_run_through_the_console_script_registers_edje_with_the_auto_classes():
    result = _python(
        "import edje_cli\n"
        "from edje.cli import main\n"
        "main(['recipes'])\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('edje')).__name__)"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("EDJEConfig")


def test_import_edje_registers_edje_with_the_auto_classes_at_once():
    result = _python(
        "import edje\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('edje')).__name__, edje.EDJEModel.__name__)"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "EDJEConfig EDJEModel"


def test_quiet_libraries_silences_lightning_info_lines_even_when_lightning_is_imported_later():
    """Commands import Lightning lazily, after `quiet_libraries` ran: its package loggers are
    set to INFO at import, so the quieting must hold for the loggers the lines go through."""
    code = (
        "from edje.cli import quiet_libraries; quiet_libraries()\n"
        "import lightning.pytorch as pl\n"
        "pl.Trainer(accelerator='cpu', devices=1, enable_progress_bar=False)\n"
        "print('built')\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "built" in result.stdout
    printed = result.stdout + result.stderr
    assert "GPU available" not in printed and "Tip:" not in printed, printed


def test_fit_help_alone_answers_without_importing_lightning_or_torch():
    """`edje fit --help` is instant: its own help, pointing to the recipe's full option list
    (LightningCLI's, which needs Lightning)."""
    result = _python(
        "import sys, edje_cli\n"
        "from edje.cli import main\n"
        "code = main(['fit', '--help'])\n"
        "heavy = ('torch', 'transformers', 'lightning')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "0 []"
    assert "edje fit --config RECIPE --help" in result.stdout and "example" in result.stdout


@pytest.mark.parametrize("command", ["quickstart", "check"])
def test_an_out_folder_holding_a_users_files_is_left_alone_and_refused_at_once(
    command, tmp_path, capsys
):
    from edje.cli import run

    users = tmp_path / "model" if command == "quickstart" else tmp_path
    users.mkdir(exist_ok=True)
    (users / "README.md").write_text("mine")
    (users / "notes.txt").write_text("mine too")
    argv = ["edje", command, "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_, patch.object(sys, "argv", argv):
        run()
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "edje did not write" in error[0], error
    assert sorted(p.name for p in users.iterdir()) == ["README.md", "notes.txt"]
    assert (users / "README.md").read_text() == "mine"


def test_a_folder_edje_wrote_is_replaced_whole_and_a_foreign_one_is_not(tmp_path):
    from edje._utils import atomic_folder

    with atomic_folder(tmp_path / "out") as partial:
        (partial / "a.txt").write_text("1")
    with atomic_folder(tmp_path / "out") as partial:  # edje's own: replaced
        (partial / "b.txt").write_text("2")
    assert not (tmp_path / "out" / "a.txt").exists() and (tmp_path / "out" / "b.txt").exists()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "c.txt").write_text("3")
    with pytest.raises(FileExistsError), atomic_folder(tmp_path / "theirs"):
        pass
    assert (tmp_path / "theirs" / "c.txt").read_text() == "3"


SERVE = ["serve", "--model", "m", "--store", "{tmp}"]
ENCODE = ["encode", "--images", "{tmp}", "--out", "{tmp}/s"]
SEARCH = ["search", "--model", "m", "--first-stage", "f", "--store", "{tmp}"]
ARGUMENT_MISTAKES = {
    "port": ([*SERVE, "--port", "70000"], "0 to 65535"),
    "contact-sheet": (["eval", "--model", "m", "--contact-sheet", "-1"], ">= 0, got -1"),
    "num-workers": ([*ENCODE, "--num-workers", "-1"], ">= 0, got -1"),
    "surrogate": ([*SEARCH, "a\udc80"], "lone surrogate (U+DC80)"),
}


@pytest.mark.parametrize("mistake", sorted(ARGUMENT_MISTAKES))
def test_an_argument_out_of_range_or_not_text_is_one_line_exit_2_and_makes_nothing(
    mistake, tmp_path, capsys
):
    from edje.cli import run

    argv, expected = ARGUMENT_MISTAKES[mistake]
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info, patch.object(sys, "argv", ["edje", *argv]):
        run()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and expected in error[0], error
    assert not any(tmp_path.iterdir())
