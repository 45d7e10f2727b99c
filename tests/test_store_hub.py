"""push_to_hub / from_hub: checks the calls made to huggingface_hub (the Hub is never reached)."""

from __future__ import annotations

import fnmatch
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

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        src = Path(kwargs["folder_path"])
        for f in src.rglob("*"):  # what would be uploaded, by the same allow_patterns rule
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in kwargs["allow_patterns"]):
                (self.remote / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, self.remote / rel)
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
    assert names == ["HfApi", "create_repo", "upload_folder"]
    assert _RecordingApi.calls[0][1] == {"token": "tok"}
    assert _RecordingApi.calls[1][1] == {
        "repo_id": "me/tokens", "repo_type": "dataset", "private": True, "exist_ok": True,
    }  # fmt: skip
    upload = _RecordingApi.calls[2][1]
    assert upload["repo_id"] == "me/tokens" and upload["repo_type"] == "dataset"
    assert upload["folder_path"] == str(tmp_path / "s")
    uploaded = sorted(p.relative_to(tmp_path / "remote").as_posix()
                      for p in (tmp_path / "remote").rglob("*") if p.is_file())  # fmt: skip
    assert uploaded == [
        "manifest.json", "shards/r000-000000.safetensors", "shards/r000-000001.safetensors",
    ]  # fmt: skip

    downloads = []

    def fake_snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs))
        return str(tmp_path / "remote")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    remote = TokenStore.from_hub("me/tokens", revision="v1")
    assert downloads[0][0] == "me/tokens"
    assert downloads[0][1]["repo_type"] == "dataset" and downloads[0][1]["revision"] == "v1"
    assert torch.equal(remote.gather(["c", "a"]), store.gather(["c", "a"]))
