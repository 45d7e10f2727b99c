"""push_to_hub / from_hub: checks the calls made to huggingface_hub (the Hub is never reached)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import torch

from edje.store import TokenStore


class _RecordingApi:
    calls: ClassVar[list] = []
    remote: ClassVar[Path | None] = None

    def __init__(self, token=None):
        self.calls.append(("HfApi", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))
        for operation in kwargs["operations"]:  # what the commit would write, file by file
            target = self.remote / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = operation.path_or_fileobj
            if isinstance(source, bytes):
                target.write_bytes(source)
            else:
                shutil.copy(source, target)
        return "commit-info"


def test_push_to_hub_and_from_hub_make_the_expected_huggingface_hub_calls(tmp_path, monkeypatch):
    with TokenStore.create(tmp_path / "s", token_shape=(2, 3), shard_size=2) as w:
        w.add(["a", "b"], torch.randn(2, 2, 3))
        w.add(["c"], torch.randn(1, 2, 3))
    (tmp_path / "s" / "shards" / "r000-000009.safetensors.tmp-1").write_bytes(b"junk")
    (tmp_path / "s" / "notes.txt").write_text("not part of the store")
    _RecordingApi.calls, _RecordingApi.remote = [], tmp_path / "remote"
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)

    store = TokenStore.open(tmp_path / "s")
    assert store.push_to_hub("me/tokens", private=True, token="tok") == "commit-info"
    names = [c[0] for c in _RecordingApi.calls]
    assert names == ["HfApi", "create_repo", "create_commit"]
    assert _RecordingApi.calls[0][1] == {"token": "tok"}
    assert _RecordingApi.calls[1][1] == {
        "repo_id": "me/tokens", "repo_type": "dataset", "private": True, "exist_ok": True,
    }  # fmt: skip
    commit = _RecordingApi.calls[2][1]
    assert commit["repo_id"] == "me/tokens" and commit["repo_type"] == "dataset"
    uploaded = sorted(p.relative_to(tmp_path / "remote").as_posix()
                      for p in (tmp_path / "remote").rglob("*") if p.is_file())  # fmt: skip
    assert uploaded == [
        "README.md", "manifest.json",
        "shards/r000-000000.safetensors", "shards/r000-000001.safetensors",
    ]  # fmt: skip
    # The dataset card: no viewer (tensors, not rows), how to load it, what made it.
    card = huggingface_hub.DatasetCard((tmp_path / "remote" / "README.md").read_text())
    assert card.data.viewer is False and "token-store" in card.data.tags
    assert 'TokenStore.from_hub("me/tokens")' in card.text and "3 images" in card.text

    downloads = []

    def fake_snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs))
        return str(tmp_path / "remote")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    remote = TokenStore.from_hub("me/tokens", revision="v1")
    assert downloads[0][0] == "me/tokens"
    assert downloads[0][1]["repo_type"] == "dataset" and downloads[0][1]["revision"] == "v1"
    assert torch.equal(remote.gather(["c", "a"]), store.gather(["c", "a"]))
