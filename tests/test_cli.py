"""The `edje` command line as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

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
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "model" / "processor_config.json").is_file()
