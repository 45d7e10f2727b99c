"""`EDJEDataModule`'s first stage: a Hub id or folder is used as it is; a linear probe is fitted
only when asked, never where a Hub model resolves, and never on a vision encoder without [CLS]."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from edje.training import EDJEDataModule

SMALL = {"n_train_triplets": 2, "n_train_single": 0, "n_val_triplets": 1, "n_test_triplets": 1}


@pytest.fixture
def no_encoding(monkeypatch, tmp_path):
    """prepare_data without a vision encoder or a store; run from an empty folder."""
    import edje.store.encode
    import edje.training.datamodule as datamodule

    monkeypatch.setattr(datamodule, "load_vision_encoder", lambda *a, **k: (None, None))
    monkeypatch.setattr(
        edje.store.encode, "encode_store", lambda *a, **k: SimpleNamespace(summary=str)
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def module(first_stage, **options):
    return EDJEDataModule("builtin", store="raw.store", first_stage=first_stage, builtin=SMALL,
                          **options)  # fmt: skip


def test_a_hub_id_first_stage_is_never_fitted_or_saved(no_encoding, monkeypatch):
    def fit(self, train):
        raise AssertionError("a probe was fitted")

    monkeypatch.setattr(EDJEDataModule, "_fit_first_stage", fit)
    module("google/siglip2-large-patch16-384").prepare_data()
    assert os.listdir(no_encoding) == []  # nothing written where the Hub id would resolve


def test_a_probe_folder_that_names_a_cached_hub_model_is_refused(no_encoding, monkeypatch):
    from huggingface_hub import constants

    cache = no_encoding / "hub"
    snapshot = cache / "models--acme--clip" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--acme--clip" / "refs").mkdir()
    (cache / "models--acme--clip" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ValueError, match="'acme/clip' is a model on the Hub; set fit_first_stage"):
        module("acme/clip", fit_first_stage=True).prepare_data()
    assert not (no_encoding / "acme").exists()


def test_a_probe_folder_named_like_a_hub_id_is_not_refused_where_the_hub_cannot_be_reached(
    monkeypatch,
):
    """`--data.first_stage sets/people.first_stage` on a machine without the Hub (and without
    HF_HUB_OFFLINE): the real client's connection error means no Hub model to shadow."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    from edje.training.datamodule import refuse_probe_folder

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unreachable = HfApi(endpoint="http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(huggingface_hub, "repo_exists", unreachable.repo_exists)
    with pytest.raises(Exception) as refused:  # what the client raises without the Hub
        unreachable.repo_exists("sets/people.first_stage")
    assert not isinstance(refused.value, ValueError)
    refuse_probe_folder("sets/people.first_stage", EDJEDataModule("builtin").vision)  # no raise


def test_a_probe_is_refused_on_a_vision_encoder_without_cls(no_encoding):
    from transformers import SiglipVisionConfig

    SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64).save_pretrained(no_encoding / "siglip")  # fmt: skip
    data = module("probe", fit_first_stage=True, vision=str(no_encoding / "siglip"))
    with pytest.raises(ValueError, match=r"\[CLS\] token, and .*siglip.* has none"):
        data.prepare_data()
    assert not (no_encoding / "probe").exists()


def test_fitting_needs_a_folder_name():
    with pytest.raises(ValueError, match="fit_first_stage=True fits a probe into the folder"):
        EDJEDataModule("builtin", first_stage=None, fit_first_stage=True)
