"""Finding and reading the paper authors' weights file safely: a file, a folder holding one,
or a Hub repo id; safetensors, or a torch pickle read with `weights_only=True` only."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

SAFETENSORS, PICKLED = (".safetensors",), (".pth", ".pt", ".bin")

__all__ = ["PICKLED", "SAFETENSORS", "AuthorsCheckpointError", "load_weights", "locate_weights"]


class AuthorsCheckpointError(ValueError):
    """The source is not the authors' checkpoint layout, or cannot be read safely."""


def locate_weights(
    source: str | Path, filename: str | None, revision: str | None
) -> tuple[Path, str]:
    """The local weights file for SOURCE, and a description of where it came from."""
    local = Path(source)
    if local.is_dir():
        local = local / filename if filename else _weights_in(local)
    if local.is_file():
        return local, str(local)
    if Path(source).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise AuthorsCheckpointError(
            f"edje convert: expected a weights file, a folder holding one, or a Hub repo id "
            f"(owner/name) as SOURCE, got {str(source)!r}: "
            + (f"it holds no {filename}." if Path(source).is_dir() else "no such file or folder.")
        )
    return _download(str(source), filename, revision)


def _weights_in(folder: Path) -> Path:
    """The single weights file of a folder (safetensors first)."""
    for suffixes in (SAFETENSORS, PICKLED):
        found = sorted(p for p in folder.iterdir() if p.suffix in suffixes)
        if len(found) == 1:
            return found[0]
        if found:
            raise AuthorsCheckpointError(
                f"edje convert: {folder} holds several weights files "
                f"{[p.name for p in found]}; expected one: pass the file itself as SOURCE."
            )
    raise AuthorsCheckpointError(
        f"edje convert: {folder} holds no weights file; expected one ending in "
        f"{SAFETENSORS + PICKLED}."
    )


def _download(repo_id: str, filename: str | None, revision: str | None) -> tuple[Path, str]:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename is None:
            patterns = [f"*{suffix}" for suffix in SAFETENSORS + PICKLED]
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
            path = _weights_in(Path(folder))
        else:
            path = Path(hf_hub_download(repo_id, filename, revision=revision))
    except OSError as error:  # huggingface_hub's HTTP and offline errors are OSErrors
        raise AuthorsCheckpointError(
            f"edje convert: could not fetch {repo_id!r} from the Hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}); pass a local copy of the checkpoint as SOURCE."
        ) from error
    return path, f"{repo_id}/{path.name}" + (f"@{revision}" if revision else "")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors, or from a torch pickle with `weights_only=True`: never
    arbitrary unpickling."""
    if path.suffix in SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:  # a malformed header, a truncated file
            raise AuthorsCheckpointError(
                f"edje convert: {path} is not a readable safetensors file ({error})."
            ) from None
    if path.suffix not in PICKLED:
        raise AuthorsCheckpointError(
            f"edje convert: {path.name} is neither safetensors nor a torch checkpoint; expected "
            f"a file ending in {SAFETENSORS + PICKLED}, got {path.suffix or 'no suffix'!r}."
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:  # refused, or not a torch file
        raise AuthorsCheckpointError(
            f"edje convert: refused {path}: torch.load(weights_only=True) would not read it "
            f"({str(error).splitlines()[0]}). edje never unpickles arbitrary objects. If you "
            "trust the file, load it yourself and save its state dict with "
            "safetensors.torch.save_file, then convert that."
        ) from None
    return _state_dict_of(saved, path)


def _state_dict_of(saved: Any, path: Path) -> dict[str, torch.Tensor]:
    """The authors save `{"model": state_dict, "optimizer": ..., "config": ..., "epoch": ...}`."""
    for key in ("model", "state_dict"):
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
            break
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise AuthorsCheckpointError(
            f"edje convert: {path} holds no state dict; expected a dict of tensors, or one under "
            f"'model' or 'state_dict', got {type(saved).__name__}."
        )
    return saved
