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


def test_the_counter_sees_a_long_function_a_long_file_and_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    (package / "a.py").write_text("from pkg import b\n\n\ndef long():\n" + body + "\n" * 440)
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    script = ROOT / "dev" / "code_counts.py"
    counts = subprocess.run(
        [sys.executable, str(script), str(package)], capture_output=True, text=True, check=True
    ).stdout
    assert "functions over 60 lines: 1\n" in counts, counts
    assert "files over 500 lines: 1\n" in counts, counts
    assert "elementary import cycles: 1\n  pkg.a -> pkg.b -> pkg.a\n" in counts, counts
