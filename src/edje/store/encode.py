"""Encode images once into a token store, through Lightning (``Trainer.predict``).

Images are cut into fixed batches (batch k = items ``k*B .. k*B+B-1`` in source order), the
batches are dealt to the ranks round-robin, and each rank writes its own shards as batches
arrive; rank 0 indexes all shards into the manifest at the end. A shard holds whole batches,
so a killed run, started again with the same arguments, skips the batches already in completed
shards and recomputes the others with exactly the same batch composition: the result holds the
same tokens as an uninterrupted run.

Several processes (``devices=N``, ``num_nodes``) write into one store folder, which must be on
a file system all of them see; only one encode run may write a store at a time.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from edje._utils import IMAGE_SUFFIXES, image_id, load_rgb, require
from edje.image_tokens import pixel_inputs
from edje.store.fingerprint import (
    RAW_ADAPTER,
    fingerprint_diff,
    state_dict_sha256,
    store_fingerprint,
)
from edje.store.format import remove_temporaries
from edje.store.lock import store_lock
from edje.store.reader import TokenStore
from edje.store.writer import TokenStoreWriter, finalize

# Lightning runs the encoding on any number of devices: the training extra.
_lightning = require("lightning.pytorch", "training", "Encoding images (edje encode)")
LightningModule, Trainer = _lightning.LightningModule, _lightning.Trainer
BasePredictionWriter = require(
    "lightning.pytorch.callbacks", "training", "Encoding images (edje encode)"
).BasePredictionWriter

__all__ = [
    "EncodeResult",
    "compress_store",
    "default_fingerprint",
    "encode_images",
    "find_images",
]

Compressor = Callable[[torch.Tensor], torch.Tensor]  # [B, n, d_vis] -> [B, m, d]


@dataclass
class EncodeResult:
    """What an encode run did. ``ok`` is False when some images could not be decoded."""

    path: Path
    count: int  # images with tokens in the store
    encoded: int  # of which encoded by this run
    skipped: int  # already in the store when the run started
    failures: dict[str, str] = field(default_factory=dict)
    bytes_per_image: int = 0
    seconds: float = 0.0
    rank: int = 0  # the process's global rank (each DDP process gets a result)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"token store {self.path}: {self.count} images, {self.bytes_per_image:,} bytes each "
            f"({self.encoded} encoded now at {self.images_per_second:.1f} images/s, "
            f"{self.skipped} already there)"
        ]
        if self.failures:
            lines.append(f"{len(self.failures)} images could not be encoded:")
            lines += [f"  {k}: {v}" for k, v in list(self.failures.items())[:20]]
            if len(self.failures) > 20:
                lines.append(f"  ... (all listed in {self.path / 'manifest.json'})")
        return "\n".join(lines)


# -- images -----------------------------------------------------------------------------------
def find_images(folder: str | Path) -> list[tuple[str, str]]:
    """``(id, path)`` of the image files under ``folder`` (recursive, sorted); id: the path
    relative to ``folder`` without its suffix (`edje._utils.image_id`), as data folders name
    their images, so a store of the folder serves `edje eval --data` of it."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"encode_images: {root} is not a folder")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    return [(image_id(p.relative_to(root).as_posix()), str(p)) for p in files]


# -- the work, as batches ---------------------------------------------------------------------
class _Batches(torch.utils.data.Dataset):
    """Item k is the k-th fixed batch: ids, processor inputs ``{name: [b, ...]}``, failures."""

    def __init__(self, ids: list[str], refs: list[Any], batches: list[list[int]], processor: Any):
        self.ids, self.refs, self.batches, self.processor = ids, refs, batches, processor

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        ok_ids, images, failures = [], [], {}
        for i in self.batches[k] if k < len(self.batches) else []:  # k == len: an empty batch
            try:
                images.append(load_rgb(self.refs[i]))
                ok_ids.append(self.ids[i])
            except ValueError as e:
                failures[self.ids[i]] = str(e)
        inputs = pixel_inputs(self.processor, images) if images else {}
        return {"ids": ok_ids, "inputs": inputs, "failures": failures}


class _DatasetRefs(Sequence):
    """Lazy image column of a `datasets.Dataset` (not decoded: `load_rgb` does it safely)."""

    def __init__(self, dataset: Any, column: str):
        from datasets import Image as ImageFeature

        if isinstance(dataset.features.get(column), ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(i)][self.column]


def _collect(source: Any, ids: Sequence[str] | None, id_column: str, image_column: str):
    """``source`` -> (ids, image refs), in a fixed order; duplicate ids refused."""
    from edje.data.shards import ShardImages

    if isinstance(source, str | Path) and Path(source).is_dir():
        found = find_images(source)
        out_ids, refs = [i for i, _ in found], [p for _, p in found]
    elif isinstance(source, ShardImages):  # ids: the samples' keys; refs: image bytes
        out_ids, refs = list(source.ids), source
    elif hasattr(source, "features") and hasattr(source, "column_names"):  # datasets.Dataset
        for col in (id_column, image_column):
            if col not in source.column_names:
                raise KeyError(
                    f"encode_images: no column {col!r} in the dataset {source.column_names}"
                )
        out_ids = [image_id(i) for i in source[id_column]]  # "1000092795.jpg" -> "1000092795"
        refs = _DatasetRefs(source, image_column)
    elif isinstance(source, Sequence) and not isinstance(source, str | bytes):
        refs = list(source)
        out_ids = [str(p) for p in refs] if ids is None else [str(i) for i in ids]
    else:
        raise TypeError(
            "encode_images: source must be a folder, a list of image paths, a datasets.Dataset "
            "or ShardImages, "
            f"got {type(source).__name__} {source!r:.80}"
        )
    if ids is not None and len(ids) != len(out_ids):
        raise ValueError(f"encode_images: {len(ids)} ids for {len(out_ids)} images")
    if ids is not None:
        out_ids = [str(i) for i in ids]
    seen, dup = set(), []
    for i in out_ids:
        (dup.append(i) if i in seen else seen.add(i))
    if dup:
        raise ValueError(f"encode_images: duplicate ids refused (nothing written): {dup[:5]}")
    return out_ids, refs


# -- Lightning --------------------------------------------------------------------------------
def rank_batches(num_batches: int, rank: int, world_size: int) -> list[int]:
    """Batches of one rank: every ``world_size``-th from ``rank``; ``[num_batches]`` (one empty
    batch) when there are none, so every rank runs the writer's hooks and meets the barriers."""
    return list(range(rank, num_batches, world_size)) or [num_batches]


class _EncodeModule(LightningModule):
    def __init__(
        self, vision_encoder: torch.nn.Module, compressor: Compressor | None, data, workers
    ):
        super().__init__()
        self.vision_encoder = vision_encoder.eval().requires_grad_(False)
        self.compressor = compressor
        owner = getattr(compressor, "__self__", compressor)  # model.compress -> model
        self.compressor_owner = owner if isinstance(owner, torch.nn.Module) else None
        self.data, self.workers = data, workers

    def predict_dataloader(self):
        mine = rank_batches(len(self.data), self.trainer.global_rank, self.trainer.world_size)
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.data, mine),
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
        )

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        if not batch["ids"]:
            return {**batch, "tokens": None}
        param = next(self.vision_encoder.parameters())
        inputs = {k: _cast(v, param) for k, v in batch["inputs"].items()}
        tokens = self.vision_encoder(**inputs).last_hidden_state  # [B, n, d_vis]
        if self.compressor is not None:
            tokens = self.compressor(tokens)  # [B, m, d]
        return {"ids": batch["ids"], "failures": batch["failures"], "tokens": tokens}


class _StoreWriterCallback(BasePredictionWriter):
    """Each rank writes its own shards as batches arrive; rank 0 writes the manifest."""

    def __init__(self, path: Path, writer_kwargs: dict, total: int, progress: bool):
        super().__init__(write_interval="batch")
        self.path, self.writer_kwargs = path, writer_kwargs
        self.total, self.progress = total, progress  # images to encode (all ranks), show a bar
        self.writer: TokenStoreWriter | None = None
        self.bar = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self.writer = TokenStoreWriter(
            self.path, resume=True, rank=trainer.global_rank, write_manifest=False, clean=False,
            lock=False, **self.writer_kwargs,
        )  # fmt: skip
        if self.progress and trainer.is_global_zero:
            from tqdm.auto import tqdm

            mine = -(-self.total // trainer.world_size)
            desc = (
                "encode" if trainer.world_size == 1 else f"encode (rank 0 of {trainer.world_size})"
            )
            self.bar = tqdm(total=mine, unit="img", desc=desc, dynamic_ncols=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        tokens = prediction["tokens"]
        ids = prediction["ids"]
        m, d = self.writer.token_shape
        tokens = torch.empty(0, m, d) if tokens is None else tokens.float().cpu()
        self.writer.add(ids, tokens, prediction["failures"])
        if self.bar is not None:
            self.bar.update(len(ids) + len(prediction["failures"]))

    def on_predict_end(self, trainer, pl_module) -> None:
        self.writer.close()
        if self.bar is not None:
            self.bar.close()
        trainer.strategy.barrier("edje-encode-shards-written")
        if trainer.is_global_zero:
            w = self.writer
            finalize(self.path, dtype=w.dtype, token_shape=w.token_shape, fingerprint=w.fingerprint)
        trainer.strategy.barrier("edje-encode-manifest-written")


# -- public entry points ----------------------------------------------------------------------
def default_fingerprint(
    vision_encoder: torch.nn.Module, image_processor: Any, compressor: Compressor | None
) -> dict:
    """Fingerprint of a store made by ``vision_encoder`` + ``image_processor`` + ``compressor``.

    ``store_fingerprint(vision name, state_dict_sha256(vision_encoder), image_processor,
    adapter)`` where adapter is ``"raw"`` without a compressor, else `state_dict_sha256` of
    the compressor module, or of ``model.adapter`` for a bound ``model.compress``. It describes
    what actually ran; if the compressor's model has ``store_fingerprint()`` and that disagrees,
    a warning says so (the model would then refuse the store).
    """
    name = (
        getattr(getattr(vision_encoder, "config", None), "_name_or_path", "")
        or type(vision_encoder).__name__
    )
    fingerprint = store_fingerprint(
        name, state_dict_sha256(vision_encoder), image_processor, _adapter_sha256(compressor)
    )
    _warn_if_model_disagrees(compressor, fingerprint)
    return fingerprint


def _warn_if_model_disagrees(compressor: Compressor | None, fingerprint: Mapping) -> None:
    owner = getattr(compressor, "__self__", None)
    if owner is None or not hasattr(owner, "store_fingerprint"):
        return

    expected = owner.store_fingerprint()
    diff = fingerprint_diff(fingerprint, expected)
    if diff:
        fields = ", ".join(f"{k} (encoding {a!r}, model {b!r})" for k, (a, b) in diff.items())
        warnings.warn(
            f"encode_images: these tokens will not match {type(owner).__name__}.store_fingerprint()"
            f": {fields}",
            stacklevel=3,
        )


def _adapter_sha256(compressor: Compressor | None) -> str:
    if compressor is None:
        return RAW_ADAPTER
    owner = getattr(compressor, "__self__", compressor)
    module = getattr(owner, "adapter", owner)  # EDJEModel.compress: hash only its adapter
    if isinstance(module, torch.nn.Module):
        return state_dict_sha256(module)
    raise TypeError(
        "encode_images: cannot fingerprint a compressor that is not a torch module (or a method "
        f"of one): {compressor!r}; pass fingerprint=..."
    )


def _cast(value: Any, param: torch.Tensor) -> Any:
    """Move a processor output to ``param``'s device (and dtype, for floating tensors)."""
    if not torch.is_tensor(value):
        return value
    return value.to(param.device, param.dtype if value.is_floating_point() else None)


def _probe_token_shape(vision_encoder, image_processor, compressor) -> tuple[int, int]:
    inputs = dict(image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt"))
    param = next(vision_encoder.parameters(), None)
    if param is not None:
        inputs = {k: _cast(v, param) for k, v in inputs.items()}
    with torch.no_grad():
        tokens = vision_encoder(**inputs).last_hidden_state
        if compressor is not None:
            tokens = compressor(tokens)
    return int(tokens.shape[1]), int(tokens.shape[2])


def encode_images(
    source: Any,
    out: str | Path,
    *,
    vision_encoder: torch.nn.Module,
    image_processor: Any,
    compressor: Compressor | None = None,
    ids: Sequence[str] | None = None,
    id_column: str = "id",
    image_column: str = "image",
    batch_size: int = 32,
    dtype: str = "float16",
    shard_size: int = 1024,
    fingerprint: Mapping | None = None,
    overwrite: bool = False,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> EncodeResult:
    """Encode ``source`` images into the token store ``out`` (resuming it if it exists).

    ``source``: a folder (image files, recursive; id = relative path), a list of paths (id =
    the path, or ``ids``), a ``datasets.Dataset`` (ids from ``id_column``, images from
    ``image_column``) or `edje.data.shards.ShardImages` (tar shards; id = the sample's key).
    Tokens are ``vision_encoder(**image_processor(images)).last_hidden_state``
    ``[B, n, d_vis]``, through ``compressor`` (``[B, n, d_vis] -> [B, m, d]``, e.g.
    ``EDJEModel.compress``) if given. Images that cannot be decoded are recorded as failures
    (``result.ok`` is False). ``devices``/``num_nodes``/``strategy`` go to the Lightning
    ``Trainer``. ``shard_size`` (rows) is rounded to whole batches.

    Example (offline DINOv2-S; a folder ``photos/`` of images):
        >>> from edje.backbones import OFFLINE_VISION, load_vision_encoder
        >>> model, processor = load_vision_encoder(OFFLINE_VISION, image_size=112)
        >>> result = encode_images("photos/", "photos.raw", vision_encoder=model,
        ...                        image_processor=processor)  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
        token store photos.raw: 3 images, 8,320 bytes each (3 encoded now at 25.1 images/s, ...
    """
    start = time.perf_counter()
    _check_batch_size("encode_images", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"encode_images: num_workers must be 0 or more, got {num_workers!r}")
    out = Path(out)
    all_ids, refs = _collect(source, ids, id_column, image_column)
    if not all_ids:
        where = source if isinstance(source, str | Path) else f"the {type(source).__name__}"
        raise ValueError(
            f"encode_images: no images in {where} (image files end in "
            f"{', '.join(IMAGE_SUFFIXES)}); nothing to encode"
        )
    callback = _StoreWriterCallback(out, {}, 0, progress)
    # The Trainer checks accelerator, devices, strategy and precision: before any folder is made.
    trainer = _trainer(callback, accelerator, devices, num_nodes, strategy, precision)
    if fingerprint is None:
        fingerprint = default_fingerprint(vision_encoder, image_processor, compressor)
    token_shape = _probe_token_shape(vision_encoder, image_processor, compressor)
    writer_kwargs = dict(
        token_shape=token_shape, dtype=dtype, fingerprint=fingerprint, shard_size=shard_size
    )
    # One encode of a store at a time: its first process holds the lock for all of them.
    with store_lock(out) if _first_process() else nullcontext():
        # Every process (DDP re-runs this script) scans before the ranks meet: all see the same.
        scan = TokenStoreWriter(
            out, resume=True, overwrite=overwrite, write_manifest=False, clean=False,
            lock=False, **writer_kwargs,
        )  # fmt: skip
        done = scan.done_ids
        remove_temporaries(out)
        batches = [
            list(range(k, min(k + batch_size, len(all_ids))))
            for k in range(0, len(all_ids), batch_size)
        ]
        batches = [[i for i in b if all_ids[i] not in done] for b in batches]
        batches = [b for b in batches if b]
        total = sum(len(b) for b in batches)
        data = _Batches(all_ids, refs, batches, image_processor)
        callback.writer_kwargs, callback.total = writer_kwargs, total
        module = _EncodeModule(vision_encoder, compressor, data, num_workers)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
            # lightning's use of torch's pytree
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
            trainer.predict(module, return_predictions=False)
        store = TokenStore.open(out)
        return EncodeResult(
            path=out,
            count=len(store),
            encoded=sum(all_ids[i] in store for b in batches for i in b),
            skipped=len(all_ids) - total,
            failures=store.failures,
            bytes_per_image=store.bytes_per_image,
            seconds=time.perf_counter() - start,
            rank=trainer.global_rank,
        )


def _trainer(callback, accelerator, devices, num_nodes, strategy, precision) -> Trainer:
    """The encode's Trainer; options it refuses are a ValueError naming them."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return Trainer(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
            precision=precision, callbacks=[callback], logger=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False, enable_checkpointing=False,
        )  # fmt: skip
    except (MisconfigurationException, TypeError) as error:
        raise ValueError(f"encode_images: {error}") from None


def _first_process() -> bool:
    """Whether this is the process that launched the encode (DDP's other processes get
    LOCAL_RANK / NODE_RANK, or RANK from torchrun, in their environment)."""
    rank = os.environ.get("RANK")
    if rank is not None:
        return rank == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def compress_store(
    raw: TokenStore | str | Path,
    out: str | Path,
    compressor: Compressor,
    *,
    batch_size: int = 256,
    dtype: str = "float16",
    shard_size: int = 1024,
    fingerprint: Mapping | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> EncodeResult:
    """Compress a raw store (``[n, d_vis]`` tokens) into a new store through ``compressor``.

    No vision encoder runs. The fingerprint is the raw store's with ``adapter_sha256`` set from
    the compressor (as `default_fingerprint` does), so it equals the fingerprint of encoding the
    images with the compressor directly. Resumable like `encode_images`; the raw store's
    failures are carried over.

    Example:
        >>> compress_store("photos.raw", "photos.store", model.compress)  # doctest: +SKIP
    """
    start = time.perf_counter()
    _check_batch_size("compress_store", batch_size)
    raw = raw if isinstance(raw, TokenStore) else TokenStore.open(raw)
    if fingerprint is None:
        fingerprint = {**raw.fingerprint, "adapter_sha256": _adapter_sha256(compressor)}
        _warn_if_model_disagrees(compressor, fingerprint)
    ids = raw.ids
    with torch.no_grad():
        probe = compressor(raw.gather_rows([0]).float().to(device)) if len(raw) else None
    m, d = (probe.shape[1], probe.shape[2]) if probe is not None else raw.token_shape
    writer = TokenStoreWriter(
        out, token_shape=(m, d), dtype=dtype, fingerprint=fingerprint, shard_size=shard_size,
        resume=True, overwrite=overwrite,
    )  # fmt: skip
    done = writer.done_ids
    todo = [
        k for k in range(0, len(ids), batch_size) if not done.issuperset(ids[k : k + batch_size])
    ]
    from tqdm.auto import tqdm

    with writer, torch.no_grad():
        for k in tqdm(todo, unit="batch", desc="compress", disable=not progress):
            rows = [r for r in range(k, min(k + batch_size, len(ids))) if ids[r] not in done]
            tokens = compressor(raw.gather_rows(rows).float().to(device))  # [b, m, d]
            writer.add([ids[r] for r in rows], tokens.float().cpu())
        missing = {k: v for k, v in raw.failures.items() if k not in writer.done_ids}
        if missing:
            writer.add_failures(missing)
    store = TokenStore.open(out)
    return EncodeResult(
        path=Path(out),
        count=len(store),
        encoded=sum(min(batch_size, len(ids) - k) for k in todo),
        skipped=len(done),
        failures=store.failures,
        bytes_per_image=store.bytes_per_image,
        seconds=time.perf_counter() - start,
    )


def _check_batch_size(caller: str, batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:  # before any folder is made
        raise ValueError(f"{caller}: batch_size must be a whole number >= 1, got {batch_size!r}")
