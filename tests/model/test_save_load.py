"""Saving and loading as any transformers model: safetensors only, Auto classes, remote code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModel

from edje import EDJEModel

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
CAPTIONS = ["a small red circle left of a large blue square", "a green star"]


def inputs_for(processor):
    torch.manual_seed(1)
    return processor(text=CAPTIONS, image_tokens=torch.randn(2, 4, 32))


def saved_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_round_trip_restores_identical_logits(tiny_model, tiny_processor, tmp_path):
    inputs = inputs_for(tiny_processor)
    expected = tiny_model(**inputs).logits
    tiny_model.save_pretrained(tmp_path)
    loaded = EDJEModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(**inputs).logits, expected)


def test_auto_model_resolves_edje(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is EDJEModel


def test_saved_folder_holds_safetensors_and_no_pickles(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    files = saved_files(tmp_path)
    assert "model.safetensors" in files
    assert not [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    assert {"config.json", "README.md", "configuration_edje.py", "modeling_edje.py"} <= set(files)


def test_vision_encoder_is_not_saved_unless_asked(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.split(".")[0] in {"adapter", "joint_encoder", "itm_head"} for k in keys)
    assert not (tmp_path / "vision_encoder").exists()


def test_saved_vision_encoder_encodes_pixels_from_the_folder(tiny_model, tiny_processor, tmp_path):
    tiny_model.config.vision_encoder_name = "not/used-after-saving"
    tiny_model.save_pretrained(tmp_path, save_vision_encoder=True)
    assert tiny_model.config.vision_encoder_name == "not/used-after-saving"
    assert (
        json.loads((tmp_path / "config.json").read_text())["vision_encoder_name"]
        == "vision_encoder"
    )
    assert (tmp_path / "vision_encoder" / "model.safetensors").is_file()
    images = [Image.fromarray(np.full((28, 28, 3), 90, dtype=np.uint8))] * 2
    inputs = tiny_processor(text=CAPTIONS, images=images)
    loaded = EDJEModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**inputs).logits, tiny_model(**inputs).logits)
    assert all(not p.requires_grad for p in loaded.vision_encoder.parameters())


def test_model_card_describes_the_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: edje" in card
    assert "| stored tokens per image | 4 x 32 |" in card
    assert "$" not in card.split("```")[0]  # every template field filled


def test_trust_remote_code_loads_without_edje_installed(tiny_model, tiny_processor, tmp_path):
    torch.manual_seed(1)
    tokens = torch.randn(2, 4, 32)
    expected = tiny_model(**tiny_processor(text=CAPTIONS, image_tokens=tokens)).logits
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({"tokens": tokens}, tmp_path / "tokens.safetensors")
    script = f"""
import sys
sys.modules["edje"] = None  # as if edje were not installed
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor
folder = {str(tmp_path)!r}
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
for obj in (model, processor):
    assert "transformers_modules" in type(obj).__module__, type(obj).__module__
tokens = load_file(folder + "/tokens.safetensors")["tokens"]
inputs = processor(text={CAPTIONS!r}, image_tokens=tokens)
model.config.vision_encoder_name = "edje:dinov2-small"  # an offline backbone: edje's alone
try:
    model.vision_encoder
except ValueError as error:
    print("refused:", "pip install edje" in str(error) and "save_vision_encoder" in str(error))
print(model(**inputs).logits.tolist())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: True" in result.stdout  # says what to do, not "Repo id must use ..."
    logits = json.loads(result.stdout.strip().splitlines()[-1])
    assert logits == expected.tolist()


def test_push_to_hub_uploads_exactly_the_saved_files_calls_checked_not_the_hub(
    tiny_model, tmp_path, monkeypatch
):
    """The Hub is unreachable here: this checks the huggingface_hub calls and the files sent."""
    from huggingface_hub import HfApi, RepoUrl

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, saved_files(Path(folder_path))))
        card = (Path(folder_path) / "README.md").read_text()
        calls.append(("card names repo", f'from_pretrained("{repo_id}")' in card))
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert tiny_model.push_to_hub("someone/edje-tiny", private=True) == "commit-url"
    tiny_model.save_pretrained(tmp_path)
    assert calls == [
        ("create_repo", "someone/edje-tiny", {"private": True, "exist_ok": True}),
        ("upload_folder", "someone/edje-tiny", saved_files(tmp_path)),
        ("card names repo", True),
    ]


def test_push_to_hub_takes_transformers_arguments_calls_checked_not_the_hub(
    tiny_model, tmp_path, monkeypatch
):
    """transformers' push_to_hub arguments reach huggingface_hub (mocked: the Hub is unreachable
    here); save_pretrained(compact=True, push_to_hub=True) refuses rather than push nothing."""
    import yaml
    from huggingface_hub import HfApi, RepoUrl

    sent = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        card = (Path(folder_path) / "README.md").read_text()
        sent.update(kwargs, tags=yaml.safe_load(card.split("---")[1])["tags"])
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(
        f"https://huggingface.co/{repo_id}"))  # fmt: skip
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    result = tiny_model.push_to_hub(
        "someone/edje-tiny", commit_message="v1", commit_description="first", tags=["flowers"],
        max_shard_size="10MB", create_pr=True,
    )  # fmt: skip
    assert result == "commit-url"
    assert sent["commit_message"] == "v1" and sent["commit_description"] == "first"
    assert sent["create_pr"] is True and "flowers" in sent["tags"] and "edje" in sent["tags"]
    with pytest.raises(ValueError, match=r"compact=True\) does not push"):
        tiny_model.save_pretrained(tmp_path / "c", compact=True, push_to_hub=True)
    assert not (tmp_path / "c").exists()
