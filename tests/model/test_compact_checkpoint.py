"""Compact checkpoints: only what differs from the pip-installed text encoder, in fp16."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from edje import EDJEModel, EDJEProcessor
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
from edje.compact_checkpoint import COMPACT_WEIGHTS

OPTIONS = dict(vision=OFFLINE_VISION, text=OFFLINE_TEXT, vision_image_size=112)


@pytest.fixture(scope="module")
def fine_tuned():
    """An EDJE on the offline backbones whose last joint layer, adapter and head changed, as
    after training with frozen word embeddings (values kept fp16-representable)."""
    torch.manual_seed(0)
    model = EDJEModel.from_backbones(**OPTIONS, num_image_tokens=4, adapter_mlp_size=64).eval()
    changed = [
        *model.joint_encoder.encoder.layer[-1].parameters(),
        *model.adapter.parameters(),
        *model.itm_head.parameters(),
    ]
    with torch.no_grad():
        for param in changed:
            param.add_(0.01 * torch.randn_like(param)).copy_(param.half().float())
    return model


def test_compact_checkpoint_keeps_only_changed_weights_and_scores_identically(fine_tuned, tmp_path):
    fine_tuned.save_pretrained(tmp_path, compact=True)
    assert not (tmp_path / "model.safetensors").exists()  # transformers alone cannot misload it
    with safe_open(tmp_path / COMPACT_WEIGHTS, "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float16}
    assert not any("word_embeddings" in k or "layer.0." in k for k in keys)
    assert any(k.startswith("joint_encoder.encoder.layer.5.") for k in keys)
    card = (tmp_path / "README.md").read_text()  # says edje is needed, not remote code alone
    assert "compact" in card and "pip install edje" in card and "trust_remote_code" not in card
    full_bytes = sum(t.numel() * 2 for t in fine_tuned.state_dict().values())
    assert (tmp_path / COMPACT_WEIGHTS).stat().st_size < 0.5 * full_bytes

    loaded = EDJEModel.from_pretrained(tmp_path)
    assert not loaded.training, "a compact folder loads in eval mode, as a full one does"
    assert not loaded.config.compact_checkpoint
    processor = EDJEProcessor.from_backbones(**OPTIONS, num_image_tokens=4)
    inputs = processor(
        text=["a red circle", "a small blue square left of a star"],
        image_tokens=torch.randn(2, 4, 384),
    )
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, fine_tuned(**inputs).logits)


def test_saving_replaces_links_planted_at_its_file_names_and_leaves_their_targets(
    fine_tuned, tmp_path
):
    out = tmp_path / "model"
    out.mkdir()
    names = ["README.md", COMPACT_WEIGHTS, f".{COMPACT_WEIGHTS}.tmp"]  # the last: old temp
    for name in names:
        (tmp_path / f"victim-{name}").write_text("the user's file")
        (out / name).symlink_to(tmp_path / f"victim-{name}")
    fine_tuned.save_pretrained(out, compact=True)
    assert all((tmp_path / f"victim-{n}").read_text() == "the user's file" for n in names)
    assert not (out / "README.md").is_symlink() and not (out / COMPACT_WEIGHTS).is_symlink()
    assert EDJEModel.from_pretrained(out) is not None


def test_compact_needs_the_base_encoder_name(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="base_text_encoder is None"):
        tiny_model.save_pretrained(tmp_path, compact=True)


NO_EDJE_SCRIPT = """
import json, sys
sys.modules["edje"] = None  # as if edje were not installed
import numpy as np
from PIL import Image
from transformers import AutoModel, AutoProcessor
out = {}
for kind in ("compact", "full"):
    folder = sys.argv[1] + "/" + kind
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    image = Image.fromarray(np.full((112, 112, 3), 120, dtype=np.uint8))
    inputs = processor(text=["a red circle", "a blue square"], images=[image, image])
    out[kind] = model(**inputs).logits.tolist()
print(json.dumps(out))
"""


def test_compact_and_full_folders_load_and_score_pixels_through_auto_classes_without_edje(
    offline_dinov2_dir, tmp_path
):
    """Backbones named by folder (as Hub ids would be): where edje is not installed, both
    folders load with trust_remote_code=True from the code saved beside the weights, the
    compact one taking the rest from its base text encoder, and score an image."""
    import json
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from edje.backbones import resolve_backbone

    options = dict(
        vision=str(offline_dinov2_dir), text=resolve_backbone(OFFLINE_TEXT), vision_image_size=112
    )
    torch.manual_seed(0)
    model = EDJEModel.from_backbones(**options, num_image_tokens=4, adapter_mlp_size=64).eval()
    with torch.no_grad():  # as after training: the adapter and head moved off their start
        for param in [*model.adapter.parameters(), *model.itm_head.parameters()]:
            param.add_(0.05 * torch.randn_like(param)).copy_(param.half().float())
    processor = EDJEProcessor.from_backbones(**options, num_image_tokens=4)
    image = Image.fromarray(np.full((112, 112, 3), 120, dtype=np.uint8))
    with torch.no_grad():
        inputs = processor(text=["a red circle", "a blue square"], images=[image, image])
        expected = model(**inputs).logits.tolist()
    for kind in ("compact", "full"):
        model.save_pretrained(tmp_path / kind, compact=kind == "compact")
        processor.save_pretrained(tmp_path / kind)
    assert (tmp_path / "compact" / COMPACT_WEIGHTS).is_file()
    assert (tmp_path / "compact" / "compact_checkpoint.py").is_file()
    card = (tmp_path / "compact" / "README.md").read_text()
    assert "trust_remote_code=True" in card  # a base by name: it says it loads without edje
    result = subprocess.run(
        [sys.executable, "-c", NO_EDJE_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["full"] == pytest.approx(expected, abs=1e-5)
    assert scores["compact"] == pytest.approx(expected, abs=1e-2)  # fp16 weights


def test_a_compact_folder_on_an_offline_backbone_says_it_needs_edje_where_edje_is_not_installed(
    fine_tuned, tmp_path
):
    import subprocess
    import sys

    fine_tuned.save_pretrained(tmp_path, compact=True)
    script = (
        "import sys\n"
        "sys.modules['edje'] = None\n"
        "from transformers import AutoModel\n"
        f"AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "pip install edje" in last and OFFLINE_TEXT in last, last
