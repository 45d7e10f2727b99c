"""Fingerprints: stable state-dict hashes and the store fingerprint helper."""

from __future__ import annotations

import json

import torch

from edje import __version__
from edje.store.fingerprint import image_processor_dict, state_dict_sha256, store_fingerprint


def test_state_dict_sha256_is_stable_and_sensitive():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert state_dict_sha256(a) == state_dict_sha256(b) == state_dict_sha256(a.state_dict())
    assert len(state_dict_sha256(a)) == 64
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert state_dict_sha256(a) != state_dict_sha256(b)
    assert state_dict_sha256(a) != state_dict_sha256(a.to(torch.bfloat16))  # dtype counts
    renamed = {"other." + k: v for k, v in a.state_dict().items()}
    assert state_dict_sha256(renamed) != state_dict_sha256(a)  # names count
    reshaped = {k: v.reshape(-1) for k, v in a.state_dict().items()}
    assert state_dict_sha256(reshaped) != state_dict_sha256(a)  # shapes count


def test_state_dict_sha256_is_the_same_in_a_known_case():
    state = {"w": torch.arange(4, dtype=torch.float32).reshape(2, 2), "n": torch.tensor(3)}
    assert state_dict_sha256(state) == state_dict_sha256(dict(reversed(state.items())))


def test_store_fingerprint_is_json_and_carries_the_version(tiny_image_processor):
    fp = store_fingerprint("tiny/dinov2", "abc", tiny_image_processor, "def", image_size=28)
    assert fp["edje_version"] == __version__ and fp["adapter_sha256"] == "def"
    assert fp["vision_name"] == "tiny/dinov2" and fp["image_size"] == 28
    assert fp["image_processor"]["size"] == {"height": 28, "width": 28}
    assert json.loads(json.dumps(fp)) == fp
    assert store_fingerprint("x", "y", {"size": 1})["adapter_sha256"] == "raw"
    assert image_processor_dict(tiny_image_processor) == fp["image_processor"]
