"""`edje quickstart` on a reduced built-in set: every step, its files, and reuse on a rerun."""

from __future__ import annotations

import pytest
import torch

from edje import EDJEModel, EDJEProcessor
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
from edje.quickstart import run_quickstart

SMALL = {"n_train_triplets": 6, "n_train_single": 2, "n_val_triplets": 1, "n_test_triplets": 2}


@pytest.fixture(scope="module")
def untrained_edje(tmp_path_factory):
    """An untrained EDJE on the offline backbones at the quickstart's 112 px."""
    folder = tmp_path_factory.mktemp("edje")
    torch.manual_seed(0)
    options = dict(vision=OFFLINE_VISION, text=OFFLINE_TEXT, vision_image_size=112)
    EDJEModel.from_backbones(**options, num_image_tokens=4, adapter_mlp_size=64).save_pretrained(
        folder
    )
    EDJEProcessor.from_backbones(**options, num_image_tokens=4).save_pretrained(folder)
    return folder


def test_quickstart_leaves_store_first_stage_and_report_and_reuses_them(
    untrained_edje, tmp_path, capsys
):
    report = run_quickstart(tmp_path, model=str(untrained_edje), builtin=SMALL, k=5)
    printed = capsys.readouterr().out
    assert "first stage" in printed and "reranked" in printed and "edje search" in printed
    for name in ("report.json", "report.md", "recall_at_k.png", "contact_sheet.png"):
        assert (report / name).is_file(), name
    shards = sorted((tmp_path / "raw.store" / "shards").iterdir())
    stamps = [p.stat().st_mtime_ns for p in shards]
    probe = (tmp_path / "first_stage" / "first_stage.safetensors").stat().st_mtime_ns
    run_quickstart(tmp_path, model=str(untrained_edje), builtin=SMALL, k=5)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # nothing encoded again
    assert (tmp_path / "first_stage" / "first_stage.safetensors").stat().st_mtime_ns == probe
