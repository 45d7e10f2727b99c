"""The code's size rules hold in `src/edje`: no function over 60 lines, no file over 500 lines,
no import cycle between edje's modules (counted by `dev/code_counts.py`)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.paths import ROOT


def test_no_long_function_no_long_file_and_no_import_cycle_in_src():
    script, package = ROOT / "dev" / "code_counts.py", ROOT / "src" / "edje"
    counts = subprocess.run(
        [sys.executable, str(script), str(package)], capture_output=True, text=True, check=True
    ).stdout
    for rule in ("functions over 60 lines", "files over 500 lines", "elementary import cycles"):
        assert f"{rule}: 0\n" in counts, counts
