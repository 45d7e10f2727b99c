"""`edje quickstart` on a reduced built-in set and the emoji: every step, its files, and reuse
on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edje import EDJEModel, EDJEProcessor
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
from edje.quickstart import DATA_SETS, run_quickstart, shipped_first_stages
from edje.store import TokenStore

EMOJI_TEST_IMAGES = 446  # edje.data.emoji's default split (tests/data/test_data_emoji.py)
SMALL = {"n_train_triplets": 6, "n_train_single": 2, "n_val_triplets": 1, "n_test_triplets": 2}


@pytest.fixture(scope="module")
def untrained_edje(tmp_path_factory):
    """An untrained EDJE on the offline backbones at the quickstart's 112 px."""
    folder = tmp_path_factory.mktemp("edje")
    torch.manual_seed(0)
    options = dict(vision=OFFLINE_VISION, text=OFFLINE_TEXT, vision_image_size=112)
    model = EDJEModel.from_backbones(**options, num_image_tokens=4, adapter_mlp_size=64)
    # One joint layer: scores stay random, and the 446 emoji test images rerank in seconds.
    model.joint_encoder.encoder.layer = model.joint_encoder.encoder.layer[:1]
    model.config.text_config.num_hidden_layers = 1
    model.save_pretrained(folder)
    EDJEProcessor.from_backbones(**options, num_image_tokens=4).save_pretrained(folder)
    return folder


def test_quickstart_leaves_store_first_stage_and_both_reports_and_reuses_them(
    untrained_edje, tmp_path, capsys
):
    report = run_quickstart(tmp_path, model=str(untrained_edje), builtin=SMALL, k=5)
    printed = capsys.readouterr().out
    assert "edje search" in printed and f"edje serve --quickstart {tmp_path}" in printed
    for name in DATA_SETS:  # the pictures and captions the search page shows
        assert (tmp_path / "images" / name / "captions.jsonl").is_file(), name
    for title in DATA_SETS.values():  # both tables printed
        assert f"**data** {title} (test)" in printed, title
    assert printed.count("| reranked (top 5) |") == 2
    for name in DATA_SETS:
        for file in ("report.json", "report.md", "recall_at_k.png", "contact_sheet.png"):
            assert (report / name / file).is_file(), (name, file)
    builtin = json.loads((report / "builtin" / "report.json").read_text())
    emoji = json.loads((report / "emoji" / "report.json").read_text())
    sizes = (builtin["dataset"]["images"], emoji["dataset"]["images"])
    assert sizes == (6, EMOJI_TEST_IMAGES)
    # Only the test images are encoded, over the shipped first stage.
    store = TokenStore.open(tmp_path / "raw.store")
    assert len(store) == sum(sizes)
    for name in DATA_SETS:
        weights = Path(name, "first_stage.safetensors")
        shipped = (shipped_first_stages() / weights).read_bytes()
        assert (tmp_path / "first_stage" / weights).read_bytes() == shipped, name
    shards = sorted((tmp_path / "raw.store" / "shards").iterdir())
    stamps = [p.stat().st_mtime_ns for p in shards]
    copied = tmp_path / "first_stage" / "emoji" / "first_stage.safetensors"
    probe = copied.stat().st_mtime_ns
    run_quickstart(tmp_path, model=str(untrained_edje), builtin=SMALL, k=5)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # nothing encoded again
    assert copied.stat().st_mtime_ns == probe


def test_quickstart_with_a_built_icon_corpus_prints_and_saves_its_zero_shot_table_for_that_run_only(
    untrained_edje, icon_corpus, tmp_path, capsys
):
    corpus, manifest = icon_corpus
    report = run_quickstart(tmp_path, model=str(untrained_edje), builtin=SMALL, k=5, icons=corpus)
    printed = capsys.readouterr().out
    table = (report / "icons" / "zero_shot.md").read_text()
    assert f"**zero-shot** on the icon corpus {corpus}" in printed and table.strip() in printed
    saved = json.loads((report / "icons" / "zero_shot.json").read_text())
    assert saved["depths_tried"] == [5]  # the quickstart's depth, its only choice
    for name, images in manifest["eval_sets"].items():  # validation and the five held out
        assert saved["sets"][name]["dataset"]["images"] == images, name
        assert f"| `{name}` | {images} |" in table, name
    # A later run without --icons does not leave that table beside its own reports...
    run_quickstart(tmp_path, model=str(untrained_edje), builtin=SMALL, k=5)
    assert not (report / "icons").exists()
    # ...and a folder of that name that edje did not write stays.
    (report / "icons").mkdir()
    (report / "icons" / "zero_shot.md").write_text("mine")
    run_quickstart(tmp_path, model=str(untrained_edje), builtin=SMALL, k=5)
    assert (report / "icons" / "zero_shot.md").read_text() == "mine"


def test_quickstart_refuses_an_icon_corpus_without_its_first_stage_before_any_work(tmp_path):
    corpus = tmp_path / "icons"
    corpus.mkdir()
    (corpus / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=f"edje data first-stage {corpus}"):
        run_quickstart(tmp_path / "qs", builtin=SMALL, icons=corpus)
    assert not (tmp_path / "qs").exists()


def test_the_suggested_query_is_a_test_caption_edje_ranks_first_and_the_first_stage_does_not():
    from types import SimpleNamespace

    from PIL import Image

    from edje.data.schema import make_dataset
    from edje.evaluation.report import Candidates
    from edje.quickstart import suggested_query

    dataset = make_dataset([Image.new("RGB", (4, 4))] * 3, ["a", "b", "c"],
                           [["cap a"], ["cap b"], ["cap c"]], "test")  # fmt: skip
    t2i = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 2, 1]])  # first stage: caption 0 right
    rerank = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.4], [2.0, 3.0, 0.0]])
    report = SimpleNamespace(candidates=Candidates(
        t2i=t2i, t2i_first=torch.zeros(3, 3), i2t=t2i, i2t_first=torch.zeros(3, 3),
        t2i_rerank=rerank, i2t_rerank=rerank, text_to_image=torch.arange(3),
    ))  # fmt: skip
    # Captions 1 and 2 are EDJE's wins over the first stage; 2 by the wider margin (1.0 vs 0.1).
    assert suggested_query(report, dataset) == ("cap c", "c", 2)
    report.candidates.t2i_rerank = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0] * 3])
    assert suggested_query(report, dataset) == ("cap a", "a", 1)  # no win: one it keeps right
    report.candidates.t2i_rerank = torch.tensor([[9.0, 0.0, 0.0]] * 3)  # EDJE picks column 0 ...
    report.candidates.t2i = torch.tensor([[1, 0, 2], [0, 1, 2], [0, 1, 2]])  # ... never right
    assert suggested_query(report, dataset) is None
