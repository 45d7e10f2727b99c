"""Compact checkpoints: only the weights that differ from the joint encoder's starting text
encoder (an offline backbone or any named one), in fp16.

A model trained from `EDJEModel.from_backbones` with frozen word embeddings keeps its 11.7M
word-embedding weights equal to all-MiniLM-L6-v2's; a compact checkpoint leaves them (and any
other unchanged tensor) out and takes them from the text encoder by name when loading. The
`<image>` rows are left out too: their embeddings are always replaced by image tokens.

Saved folders carry this file as remote code beside `modeling_edje.py`: where edje is not
installed, a compact folder loads when its base text encoder is a Hub id or a folder (an
offline backbone, `edje:...`, needs edje).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMPACT_WEIGHTS = "edje_compact.safetensors"
WORDS = "embeddings.word_embeddings.weight"


def save_compact(model, folder: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write the config and, in `dtype`, the weights that differ from the base text encoder
    (`model.config.base_text_encoder`, recorded by `from_backbones`). Returns the folder."""
    base_name = model.config.base_text_encoder
    if base_name is None:
        raise ValueError(
            "save_compact: config.base_text_encoder is None; compact checkpoints need the text "
            "encoder the joint encoder started from (EDJEModel.from_backbones records it)."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base, base_vocab = base_joint_state(model.config)
    kept = {}
    for name, tensor in model.state_dict().items():
        key = name.removeprefix("joint_encoder.")
        rows = base_vocab if key == WORDS else None  # added rows are never read
        if name.startswith("joint_encoder.") and key in base and _same(tensor, base[key], rows):
            continue
        kept[name] = tensor.detach().to("cpu", dtype).contiguous()
    metadata = {"format": "pt", "base": base_name}
    _write_new(folder / COMPACT_WEIGHTS, lambda temp: save_file(kept, temp, metadata=metadata))
    config = model.config.to_dict()
    config["compact_checkpoint"] = True
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_new(folder / "config.json", lambda temp: Path(temp).write_text(text))
    return folder


def _write_new(path: Path, write) -> None:
    """`write(temp)` into a new file beside `path`, renamed onto it: a link planted at `path`
    is replaced, never written through. (This module ships inside model folders and loads
    without edje, so it has its own copy of `edje._utils.atomic_write`'s idea.)"""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(temp)
        os.chmod(temp, 0o644)  # readable like the other files of a model folder
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_compact(model_class, config, weights_file: str | Path):
    """An `EDJEModel` from the base encoder's weights overlaid with a compact checkpoint."""
    model = model_class(config)
    base, _ = base_joint_state(config)
    missing, unexpected = model.joint_encoder.load_state_dict(base, strict=False)
    saved = load_file(str(weights_file))
    own = model.state_dict()
    saved = {name: tensor.to(own[name].dtype) for name, tensor in saved.items() if name in own}
    _, unexpected = model.load_state_dict(saved, strict=False)
    absent = {f"joint_encoder.{k}" for k in missing} - set(saved)
    if absent or unexpected:
        raise ValueError(
            f"load_compact: {weights_file} does not complete the model: missing {sorted(absent)}, "
            f"unexpected {sorted(unexpected)}."
        )
    return model


def load_compact_model(cls, name_or_path, config, hub: dict, dtype=None):
    """A compact checkpoint (`save_pretrained(compact=True)`) as a whole `cls` model."""
    local = Path(name_or_path, hub.get("subfolder") or "", COMPACT_WEIGHTS)
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(str(name_or_path), COMPACT_WEIGHTS, **hub)
    config.compact_checkpoint = False  # the loaded model is a whole one
    model = load_compact(cls, config, local)
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def base_joint_state(config) -> tuple[dict[str, torch.Tensor], int]:
    """The base text encoder's state dict, its word embeddings padded to the joint vocabulary
    with zero rows (the `<image>` rows, whose embeddings are never read), and its own
    vocabulary size."""
    state = dict(_base_text_encoder(config.base_text_encoder).state_dict())
    words = state[WORDS]
    extra = config.text_config.vocab_size - words.shape[0]
    if extra > 0:
        state[WORDS] = torch.cat([words, words.new_zeros(extra, words.shape[1])])
    return state, words.shape[0]


def _base_text_encoder(name: str) -> torch.nn.Module:
    try:
        from edje.backbones import load_text_encoder
    except ImportError:  # remote code, where edje is not installed
        if name.startswith("edje:"):
            raise ValueError(
                f"This compact checkpoint keeps only what differs from {name!r}, one of edje's "
                "offline backbones, which only edje can load: pip install edje (or save the "
                "model without compact=True, whose folder loads anywhere)."
            ) from None
        from transformers import AutoModel

        return AutoModel.from_pretrained(name)
    return load_text_encoder(name)[0]


def _same(tensor: torch.Tensor, base: torch.Tensor, rows: int | None) -> bool:
    """Bitwise equal (in the first `rows` rows only, where given)."""
    if tensor.shape != base.shape:
        return False
    return torch.equal(tensor[:rows].to(base.dtype), base[:rows])
