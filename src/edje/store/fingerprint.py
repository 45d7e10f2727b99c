"""Fingerprints: what made a token store, so a model can refuse tokens that are not its own."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

__all__ = [
    "RAW_ADAPTER",
    "fingerprint_diff",
    "image_processor_dict",
    "state_dict_sha256",
    "store_fingerprint",
]

# The adapter field of a store of raw vision tokens (no adapter ran).
RAW_ADAPTER = "raw"


def state_dict_sha256(module: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order.

    Stable across runs, devices and processes; any changed weight, dtype or name changes it.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> state_dict_sha256(layer) == state_dict_sha256(layer.state_dict())
        True
    """
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):  # extra state: hash its repr
            digest.update(f"{name}|extra|{tensor!r}\n".encode())
            continue
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def image_processor_dict(image_processor: object) -> dict:
    """The settings of a transformers image processor that change pixels, as plain JSON."""
    if image_processor is None:
        return {}
    if isinstance(image_processor, Mapping):
        raw = dict(image_processor)
    elif hasattr(image_processor, "to_dict"):
        raw = image_processor.to_dict()
    else:
        raise TypeError(
            f"image_processor_dict: expected a transformers image processor or a dict, got "
            f"{type(image_processor).__name__}"
        )
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k != "processor_class"}
    return json.loads(json.dumps(raw, sort_keys=True, default=str))


def store_fingerprint(
    vision_name: str,
    vision_weights_sha256: str | None,
    image_processor: object,
    adapter_sha256: str = RAW_ADAPTER,
    **extra: object,
) -> dict:
    """The fingerprint recorded in a token store's manifest.

    `adapter_sha256` is `state_dict_sha256` of the token-compression adapter, or `"raw"`
    for a store of raw vision tokens. `extra` fields (e.g. `image_size`) are kept as given
    (JSON-able). `edje_version` and `vision_name` are informational:
    `TokenStore.check_fingerprint` does not compare them (the same weights may be named by Hub
    id or folder), except that `vision_name` is compared when `vision_weights_sha256` is None
    (left out: a model folder that records no weight hash, checked without loading its vision
    encoder).

    Example:
        >>> fp = store_fingerprint("facebook/dinov2-small", "ab12", {"size": 224})
        >>> fp["adapter_sha256"], fp["image_processor"]
        ('raw', {'size': 224})
    """
    from edje._version import __version__

    fingerprint = {
        "edje_version": __version__,
        "vision_name": str(vision_name),
        "image_processor": image_processor_dict(image_processor),
        "adapter_sha256": str(adapter_sha256),
        **extra,
    }
    if vision_weights_sha256 is not None:
        fingerprint["vision_weights_sha256"] = str(vision_weights_sha256)
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


# Fields of a fingerprint that say who made a store, not what its tokens are: not compared.
INFORMATIONAL_FIELDS = ("edje_version", "vision_name")


def fingerprint_diff(store: Mapping, expected: Mapping) -> dict[str, tuple[object, object]]:
    """Fields of `expected` (dotted for nested dicts) that the store's fingerprint does not
    hold with the same value: `{field: (store value or None, expected value)}`.

    Fields only the store has are not compared (the expecting side did not ask about them);
    nor are `INFORMATIONAL_FIELDS`, except `vision_name` when `expected` has no weight
    hash: the name is then all that says which vision encoder it means.
    """
    a, b = _flatten(store), _flatten(json.loads(json.dumps(dict(expected), default=str)))
    ignored = set(INFORMATIONAL_FIELDS)
    if "vision_weights_sha256" not in b:
        ignored.discard("vision_name")
    keys = sorted(b.keys() - ignored)
    missing = object()
    diff = {
        k: (a.get(k, missing), b.get(k, missing))
        for k in keys
        if a.get(k, missing) != b.get(k, missing)
    }
    return {k: tuple(None if v is missing else v for v in ab) for k, ab in diff.items()}


def _flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat
