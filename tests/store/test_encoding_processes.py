"""encode_images in child processes: resume after a real kill -9, and 2-process DDP on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from edje.store import TokenStore
from edje.store.encode import encode_images

# The child runs the same encode as the reference; SIGKILLs itself when told to:
#   after the N-th TokenStoreWriter.add (some shards written, a batch buffered), or
#   at the N-th fsync (a shard's temporary file complete but not yet renamed).
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from transformers import AutoImageProcessor, AutoModel
    from edje.store import writer as store_writer
    from edje.store.encode import encode_images

    model_dir, images, out, devices, kill_mode, kill_at = sys.argv[1:7]
    count = [0]
    def die_at_nth(real):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if kill_mode == "fsync" and count[0] == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            if kill_mode == "add" and count[0] == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper
    if kill_mode == "add":
        store_writer.TokenStoreWriter.add = die_at_nth(store_writer.TokenStoreWriter.add)
    if kill_mode == "fsync":
        os.fsync = die_at_nth(os.fsync)
    torch.manual_seed(1)
    compressor = torch.nn.Linear(32, 16)
    result = encode_images(
        images, out, vision_encoder=AutoModel.from_pretrained(model_dir),
        image_processor=AutoImageProcessor.from_pretrained(model_dir), compressor=compressor,
        batch_size=3, shard_size=6, accelerator="cpu", devices=int(devices),
        strategy="ddp" if int(devices) > 1 else "auto", progress=False,
        fingerprint={"test": "resume"},
    )
    if result.rank == 0:
        print("RESULT " + json.dumps({"encoded": result.encoded, "skipped": result.skipped,
                                      "failures": result.failures}))
    """
)
N_IMAGES = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_vision_encoder, tiny_image_processor):
    root = tmp_path_factory.mktemp("proc")
    tiny_vision_encoder.save_pretrained(root / "model")
    tiny_image_processor.save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
            images / f"{i:02d}.png"
        )
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (root / "encode.py").write_text(SCRIPT)
    torch.manual_seed(1)
    compressor = torch.nn.Linear(32, 16)
    reference = root / "reference"
    encode_images(
        images, reference, vision_encoder=tiny_vision_encoder, image_processor=tiny_image_processor,
        compressor=compressor, batch_size=3, shard_size=6, accelerator="cpu", devices=1,
        progress=False, fingerprint={"test": "resume"},
    )  # fmt: skip
    return root, TokenStore.open(reference)


def _run(root, out, devices=1, kill_mode="none", kill_at=0):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = [
        str(root / "model"),
        str(root / "images"),
        str(out),
        str(devices),
        kill_mode,
        str(kill_at),
    ]
    proc = subprocess.run(
        [sys.executable, str(root / "encode.py"), *args], capture_output=True, text=True, env=env,
        timeout=300, cwd=root,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return proc, json.loads(lines[0][7:]) if lines else None


def _assert_same_store(store: TokenStore, reference: TokenStore) -> None:
    assert sorted(store.ids) == sorted(reference.ids)
    assert store.failures == reference.failures and list(store.failures) == ["broken"]
    assert store.fingerprint == reference.fingerprint
    assert torch.equal(store.gather(reference.ids), reference.gather(reference.ids))
    store.verify()


def test_resume_after_kill_9_twice_gives_the_same_tokens(setup, tmp_path):
    root, reference = setup
    out = tmp_path / "store"
    # 1st run: killed right after the 5th batch is buffered (2 shards of 2 batches on disk).
    killed, _ = _run(root, out, kill_mode="add", kill_at=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "r000-000000.safetensors", "r000-000001.safetensors",
    ]  # fmt: skip
    assert not (out / "manifest.json").exists()
    # 2nd run resumes, and is killed inside its first shard write, before the rename.
    killed, _ = _run(root, out, kill_mode="fsync", kill_at=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in (out / "shards").iterdir())
    temporaries = [n for n in names if ".tmp-" in n]  # a whole shard file, never renamed
    assert len(names) == 3 and len(temporaries) == 1 and "r000-000002" in temporaries[0]
    # 3rd run finishes: the temporary is gone, earlier shards are kept, the tokens are the same.
    resumed, result = _run(root, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert result["skipped"] == 12 and result["encoded"] == N_IMAGES - 12
    assert not any(".tmp-" in p.name for p in (out / "shards").iterdir())
    _assert_same_store(TokenStore.open(out), reference)


def test_two_process_ddp_on_cpu_gives_the_same_store(setup, tmp_path):
    root, reference = setup
    proc, result = _run(root, tmp_path / "ddp", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = TokenStore.open(tmp_path / "ddp")
    ranks = {s["file"].split("/")[1][:4] for s in store.manifest["shards"]}
    assert ranks == {"r000", "r001"}  # both processes wrote shards
    assert result["encoded"] == N_IMAGES and result["failures"] == {
        "broken": reference.failures["broken"]
    }
    _assert_same_store(store, reference)
