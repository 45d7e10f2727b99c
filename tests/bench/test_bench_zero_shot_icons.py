"""bench/zero_shot_icons.py writes its JSON where --out says, making the folder before the
evaluation, so a new folder never costs a run of minutes."""

from __future__ import annotations

import importlib.util
import json
import sys

from tests.helpers.paths import ROOT

BENCH = ROOT / "bench" / "zero_shot_icons.py"
spec = importlib.util.spec_from_file_location("bench_zero_shot_icons", BENCH)
zero_shot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zero_shot)


def test_out_in_a_folder_not_made_yet_holds_the_table(icon_corpus, tmp_path, monkeypatch, capsys):
    from edje.quickstart import shipped_checkpoint

    corpus, _ = icon_corpus
    out = tmp_path / "runs" / "step1000" / "zero_shot.json"
    argv = ["zero_shot_icons.py", "--model", str(shipped_checkpoint()), "--first-stage",
            str(corpus / "first_stage"), "--corpus", str(corpus), "--validation-only",
            "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    zero_shot.main()
    written = json.loads(out.read_text())
    assert list(written["sets"]) == ["icons-validation"] and written["depth"] == 10
    assert "icons-validation" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["zero_shot.json"]  # no temporary left
