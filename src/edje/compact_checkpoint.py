"""Loading and saving an `EDJEModel` (`EDJESavingMixin`: safetensors folders, compact
checkpoints, the Hub), and compact checkpoints themselves: only the weights that differ from
the joint encoder's starting text encoder (an offline backbone or any named one), in fp16.

A model trained from `EDJEModel.from_backbones` with frozen word embeddings keeps its 11.7M
word-embedding weights equal to all-MiniLM-L6-v2's; a compact checkpoint leaves them (and any
other unchanged tensor) out and takes them from the text encoder by name when loading. The
`<image>` rows are left out too: their embeddings are always replaced by image tokens.

Saved folders carry this file as remote code beside `modeling_edje.py`, so it must load where
edje is not installed: edje's own extras (model cards, vision weight hashes) are reached through
one guarded import, and a compact folder loads when its base text encoder is a Hub id or a
folder (an offline backbone, `edje:...`, needs edje).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Self

import torch
from safetensors.torch import load_file, save_file

# transformers does not require imports inside a try block to be installed.
try:
    from edje import model_extras
except ImportError:
    model_extras = None

COMPACT_WEIGHTS = "edje_compact.safetensors"
WORDS = "embeddings.word_embeddings.weight"
# Where `save_pretrained(..., save_vision_encoder=True)` puts the frozen vision tower.
VISION_SUBFOLDER = "vision_encoder"


def needs_edje(feature: str):
    """`edje.model_extras`, or an `ImportError` naming `feature` where edje is not installed."""
    if model_extras is None:
        raise ImportError(f"EDJEModel.{feature} needs the edje package: pip install edje")
    return model_extras


class EDJESavingMixin:
    """Where an [`EDJEModel`] comes from and goes to: `from_pretrained`, `from_backbones`,
    `from_authors_checkpoint`, the vision encoder by name, `save_pretrained`, `push_to_hub`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        folder = Path(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise OSError(
                f"{folder} holds no saved EDJE model: no config.json in it (a saved model is the "
                "folder save_pretrained writes: config.json and model.safetensors)."
            )
        model = _load_compact(cls, pretrained_model_name_or_path, kwargs)
        if model is None:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.eval()  # as transformers loads any model: dropout off until a trainer turns it on
        model._vision_source = pretrained_model_name_or_path
        # Weights memory-mapped from safetensors can sit at unaligned addresses, where CPU kernels
        # take other code paths; aligned copies make a loaded model score bitwise as it was saved.
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()
        return model

    def save_pretrained(
        self,
        save_directory,
        *args,
        save_vision_encoder: bool = False,
        compact: bool = False,
        **kwargs,
    ):
        """Save config, safetensors weights and a model card; the vision encoder only if asked.

        With `save_vision_encoder=True` the frozen encoder goes to `vision_encoder/` beside the
        weights and the saved config names it there, so the folder encodes pixels on its own.
        With `compact=True` only the weights that differ from the base text encoder are kept,
        in fp16 (`edje.compact_checkpoint`); loading then needs edje and that encoder.
        """
        kwargs.pop("safe_serialization", None)  # safetensors only
        if compact and kwargs.get("push_to_hub"):
            raise ValueError(
                "EDJEModel.save_pretrained(compact=True) does not push: a compact folder loads "
                "only where edje is installed. Call push_to_hub(repo_id) (full weights, loads "
                "anywhere with trust_remote_code=True), or upload the compact folder yourself."
            )
        if model_extras is not None:  # store checks then need no encoder
            model_extras.record_vision_sha256(self)  # hashed if loaded, never loaded for it
        if compact:
            return self._save_compact(save_directory)
        if save_vision_encoder:
            self.vision_encoder.save_pretrained(Path(save_directory) / VISION_SUBFOLDER)
            original_name = self.config.vision_encoder_name
            self.config.vision_encoder_name = VISION_SUBFOLDER
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if save_vision_encoder:
                self.config.vision_encoder_name = original_name
        if kwargs.get("is_main_process", True) and model_extras is not None:
            model_extras.write_model_card(self, save_directory)

    @classmethod
    def from_backbones(
        cls, vision: str, text: str, *, vision_image_size: int | None = None, **config_kwargs: Any
    ) -> Self:
        """Build a new, untrained EDJE around a vision encoder and a BERT-family text encoder.

        The joint encoder starts from the text encoder's weights, with one added `<image>` token;
        the adapter and head are freshly initialised. `config_kwargs` go to [`EDJEConfig`].
        `vision` and `text` are Hub ids, local folders or the offline names in `edje.backbones`.
        """
        return needs_edje("from_backbones").build_from_backbones(
            cls, vision, text, vision_image_size=vision_image_size, **config_kwargs
        )

    @classmethod
    def from_authors_checkpoint(cls, source: str | os.PathLike, **kwargs: Any) -> Self:
        """The paper authors' released reranker (their state-dict layout, `.safetensors`, or
        `.pth`/`.bin` read with `weights_only=True`) as an `EDJEModel` with the paper's adapter.

        `source` is a weights file, a folder holding one, or a Hub repo id such as
        `"shahafw/edje-vl-image-retrieval-reranker"`; `kwargs` (`filename`, `revision`,
        `vision_num_heads`, `text_num_heads`, config fields) go to
        `edje.authors_checkpoint.load_authors_checkpoint`. `edje convert` writes the same model
        with its processor and card as a folder.
        """
        extras = needs_edje("from_authors_checkpoint")
        return extras.load_authors_checkpoint(source, model_class=cls, **kwargs)

    def _load_vision_encoder(self) -> torch.nn.Module:
        """The vision encoder `config.vision_encoder_name` names: the one saved beside the
        checkpoint (`VISION_SUBFOLDER`), else by name through edje, else through transformers."""
        name = self.config.vision_encoder_name
        if name is None:
            raise ValueError(
                "EDJEModel: pixel_values need a vision encoder, but config.vision_encoder_name is "
                "None. Pass vision_tokens or image_tokens, or attach one with set_vision_encoder()."
            )
        from transformers import AutoModel

        # A vision encoder saved beside the checkpoint: the vision tower itself, loaded as saved.
        if name == VISION_SUBFOLDER and self._vision_source is not None:
            source = Path(self._vision_source)
            if source.is_dir():
                return AutoModel.from_pretrained(source / VISION_SUBFOLDER)
            return AutoModel.from_pretrained(str(self._vision_source), subfolder=VISION_SUBFOLDER)
        if model_extras is None:
            if name.startswith("edje:"):  # an offline backbone shipped as a Python package
                raise ValueError(
                    f"EDJEModel: the vision encoder {name!r} is one of edje's offline backbones, "
                    "which only edje can load: pip install edje, or save the model with "
                    "save_pretrained(..., save_vision_encoder=True) so the folder holds it. "
                    "Stored tokens (vision_tokens / image_tokens) need no vision encoder."
                )
            return AutoModel.from_pretrained(name)
        return model_extras.vision_encoder_by_name(self.config)

    def _save_compact(self, save_directory) -> None:
        extras = needs_edje("save_pretrained(compact=True)")
        from transformers.dynamic_module_utils import custom_object_save

        # The code beside the weights, as a full folder has it (the modeling file's relative
        # imports come along, this file among them).
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        for obj in (self.config, self):  # the config's and the model's auto_map entries
            custom_object_save(obj, save_directory, config=self.config)
        save_compact(self, save_directory)
        extras.write_model_card(self, save_directory, compact=True)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        save_vision_encoder: bool = False,
    ) -> Any:
        """Upload exactly what `save_pretrained` writes (safetensors, config, code, model card),
        with transformers' `push_to_hub` arguments; `tags` join the card's. Returns the commit
        info. The full weights go up: a compact folder loads only where edje is installed."""
        from huggingface_hub import HfApi

        api = HfApi(token=token if isinstance(token, str) else None)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                folder, save_vision_encoder=save_vision_encoder, max_shard_size=max_shard_size
            )
            if model_extras is not None:
                model_extras.write_model_card(self, folder, repo_id=repo_id, tags=tags)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload EDJE model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


def _load_compact(cls, name_or_path, kwargs: dict):
    """The model of a compact checkpoint (see `save_pretrained(compact=True)`), else None."""
    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "subfolder") if k in kwargs}
    config = kwargs.get("config") or cls.config_class.from_pretrained(name_or_path, **hub)
    if not getattr(config, "compact_checkpoint", False):
        return None
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
    return load_compact_model(cls, name_or_path, config, hub, dtype)


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
