"""Encode images once into a token store, through Lightning (`Trainer.predict`).

Images are cut into fixed batches (batch k = items `k*B .. k*B+B-1` in source order), the
batches are dealt to the ranks round-robin, and each rank writes its own shards as batches
arrive; rank 0 indexes all shards into the manifest at the end. A shard holds whole batches,
so a killed run, started again with the same arguments, skips the batches already in completed
shards and recomputes the others with exactly the same batch composition: the result holds the
same tokens as an uninterrupted run.

Several processes (`devices=N`, `num_nodes`) write into one store folder, which must be on
a file system all of them see; only one encode run may write a store at a time.

Tokens are `forward_features(vision_encoder, image_processor(images))` `[B, n, d_vis]`, then,
with a model, `model.compress` `[B, m, d]`. Images that cannot be decoded are recorded as
failures (`result.ok` is False). `encode_images` is `encode_store` under its older name.

Example (offline DINOv2-S; a folder `photos/` of images):

```python
>>> from edje.backbones import OFFLINE_VISION, load_vision_encoder
>>> vision, processor = load_vision_encoder(OFFLINE_VISION, image_size=112)
>>> result = encode_store("photos/", "photos.raw", vision_encoder=vision,
...                       image_processor=processor)  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
token store photos.raw: 3 images, 8,320 bytes each (3 encoded now at 25.1 images/s, ...

```
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from edje._utils import IMAGE_SUFFIXES
from edje.modeling_edje import forward_features
from edje.store.fingerprint import (
    RAW_ADAPTER,
    fingerprint_diff,
    state_dict_sha256,
    store_fingerprint,
)
from edje.store.format import remove_temporaries
from edje.store.lightning_encode import (
    Batches,
    EncodeModule,
    StoreWriterCallback,
    encode_trainer,
    first_process,
    rank_batches,
)
from edje.store.lock import store_lock
from edje.store.reader import TokenStore
from edje.store.sources import collect, find_images
from edje.store.writer import TokenStoreWriter

__all__ = [
    "EncodeResult",
    "compress_store",
    "default_fingerprint",
    "encode_images",
    "encode_store",
    "find_images",
    "rank_batches",
]

Compressor = Callable[[torch.Tensor], torch.Tensor]  # [B, n, d_vis] -> [B, m, d]


@dataclass
class EncodeResult:
    """What an encode run did. `ok` is False when some images could not be decoded."""

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


# -- public entry points ----------------------------------------------------------------------
def encode_store(
    source: Any,
    out: str | Path,
    *,
    model: Any = None,
    vision_encoder: torch.nn.Module | None = None,
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
    """Encode `source` images into the token store `out`, resuming it (see the module's notes).

    Args:
        source: a folder (recursive; id = relative path), a list of paths (id = the path, or
            `ids`), a `datasets.Dataset` (`id_column`, `image_column`) or `ShardImages`.
        model: the `EDJEModel` whose `compress` makes the stored tokens (the older form
            `compressor=model.compress` means the same); neither: raw tokens.
        vision_encoder: the frozen vision tower, through `forward_features` (default: the
            model's). Lightning runs it: `accelerator` ... `precision` go to its `Trainer`.
    """
    start = time.perf_counter()
    _check_workers(batch_size, num_workers)
    compress, owner, model = _resolve(model, compressor)
    vision_encoder = model.vision_encoder if vision_encoder is None else vision_encoder
    out = Path(out)
    all_ids, refs = _collect_some(source, ids, id_column, image_column)
    callback = StoreWriterCallback(out, {}, 0, progress)
    # The Trainer checks accelerator, devices, strategy and precision: before any folder is made.
    trainer = encode_trainer(callback, accelerator, devices, num_nodes, strategy, precision)
    if fingerprint is None:
        fingerprint = _fingerprint(vision_encoder, image_processor, compress, owner, model)
    writer_kwargs = dict(
        token_shape=_probe_token_shape(vision_encoder, image_processor, compress),
        dtype=dtype, fingerprint=fingerprint, shard_size=shard_size,
    )  # fmt: skip
    # One encode of a store at a time: its first process holds the lock for all of them.
    with store_lock(out) if first_process() else nullcontext():
        batches = _pending(out, overwrite, writer_kwargs, all_ids, batch_size)
        total = sum(len(b) for b in batches)
        callback.writer_kwargs, callback.total = writer_kwargs, total
        data = Batches(all_ids, refs, batches, image_processor)
        _predict(trainer, EncodeModule(vision_encoder, compress, owner, data, num_workers))
        return _result(
            out, start, encoded=[all_ids[i] for b in batches for i in b],
            skipped=len(all_ids) - total, rank=trainer.global_rank,
        )  # fmt: skip


encode_images = encode_store  # the older name, kept for existing code


def compress_store(
    raw: TokenStore | str | Path,
    out: str | Path,
    compressor: Compressor | None = None,
    *,
    model: Any = None,
    batch_size: int = 256,
    dtype: str = "float16",
    shard_size: int = 1024,
    fingerprint: Mapping | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> EncodeResult:
    """Compress a raw store (`[n, d_vis]` tokens) into a new store through `model.compress`
    (or `compressor`, a torch module).

    No vision encoder runs. The fingerprint is the raw store's with `adapter_sha256` set from
    the adapter (as `default_fingerprint` does), so it equals the fingerprint of encoding the
    images with the adapter directly. Resumable like `encode_store`; the raw store's failures
    are carried over.

    Example:

    ```python
    >>> compress_store("photos.raw", "photos.store", model=model)  # doctest: +SKIP

    ```
    """
    start = time.perf_counter()
    _check_batch_size("compress_store", batch_size)
    compress, owner, model = _resolve(model, compressor, caller="compress_store")
    raw = raw if isinstance(raw, TokenStore) else TokenStore.open(raw)
    if fingerprint is None:
        fingerprint = {**raw.fingerprint, "adapter_sha256": _adapter_sha256(compress, owner)}
        _warn_if_model_disagrees(model, fingerprint, stacklevel=3)
    ids = raw.ids
    with torch.no_grad():
        probe = compress(raw.gather_rows([0]).float().to(device)) if len(raw) else None
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
            tokens = compress(raw.gather_rows(rows).float().to(device))  # [b, m, d]
            writer.add([ids[r] for r in rows], tokens.float().cpu())
        missing = {k: v for k, v in raw.failures.items() if k not in writer.done_ids}
        if missing:
            writer.add_failures(missing)
    encoded = sum(min(batch_size, len(ids) - k) for k in todo)
    return _result(out, start, encoded=encoded, skipped=len(done))


def default_fingerprint(
    vision_encoder: torch.nn.Module,
    image_processor: Any,
    compressor: Compressor | None = None,
    *,
    model: Any = None,
) -> dict:
    """Fingerprint of a store made by `vision_encoder` + `image_processor` + the adapter.

    `store_fingerprint(vision name, state_dict_sha256(vision_encoder), image_processor,
    adapter)` where adapter is `"raw"` without `model` or `compressor`, else `state_dict_sha256`
    of `model.adapter` (or of the compressor module). It describes what actually ran; if the
    model's `store_fingerprint()` disagrees, a warning says so (the model would then refuse
    the store).
    """
    compress, owner, model = _resolve(model, compressor)
    return _fingerprint(vision_encoder, image_processor, compress, owner, model)


# -- the adapter: which one, its fingerprint --------------------------------------------------
def _resolve(model: Any, compressor: Compressor | None, caller: str = "encode_images"):
    """`(compress, owner, model)` from the two ways to name the adapter: `model` (an
    `EDJEModel`) or `compressor` (a torch module or a bound method of one). `owner` is the
    module Lightning moves and whose `adapter` (or itself) is hashed; `model` is kept for its
    `store_fingerprint` check."""
    if model is not None and compressor is not None:
        raise ValueError(f"{caller}: pass model= or compressor=, not both")
    bound_to = getattr(compressor, "__self__", None)
    if model is None and hasattr(bound_to, "store_fingerprint"):
        model = bound_to  # compressor=model.compress, the older form of model=model
    if model is not None:
        return model.compress, model, model
    owner = compressor if bound_to is None else bound_to
    return compressor, owner if isinstance(owner, torch.nn.Module) else None, None


def _fingerprint(vision_encoder, image_processor, compress, owner, model) -> dict:
    name = (
        getattr(getattr(vision_encoder, "config", None), "_name_or_path", "")
        or type(vision_encoder).__name__
    )
    fingerprint = store_fingerprint(
        name, state_dict_sha256(vision_encoder), image_processor, _adapter_sha256(compress, owner)
    )
    _warn_if_model_disagrees(model, fingerprint)
    return fingerprint


def _adapter_sha256(compress: Compressor | None, owner: torch.nn.Module | None) -> str:
    if compress is None:
        return RAW_ADAPTER
    if owner is not None:
        return state_dict_sha256(getattr(owner, "adapter", owner))  # a model: its adapter only
    raise TypeError(
        "encode_images: cannot fingerprint a compressor that is not a torch module (or a method "
        f"of one): {compress!r}; pass fingerprint=..."
    )


def _warn_if_model_disagrees(model: Any, fingerprint: Mapping, stacklevel: int = 4) -> None:
    if model is None:
        return
    diff = fingerprint_diff(fingerprint, model.store_fingerprint())
    if diff:
        fields = ", ".join(f"{k} (encoding {a!r}, model {b!r})" for k, (a, b) in diff.items())
        warnings.warn(
            f"encode_images: these tokens will not match {type(model).__name__}.store_fingerprint()"
            f": {fields}",
            stacklevel=stacklevel,  # the caller of the public function
        )


# -- the steps of an encode run ---------------------------------------------------------------
def _check_workers(batch_size: int, num_workers: int) -> None:
    _check_batch_size("encode_images", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"encode_images: num_workers must be 0 or more, got {num_workers!r}")


def _check_batch_size(caller: str, batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:  # before any folder is made
        raise ValueError(f"{caller}: batch_size must be a whole number >= 1, got {batch_size!r}")


def _collect_some(source, ids, id_column: str, image_column: str):
    """`collect`, refusing a source with no images."""
    all_ids, refs = collect(source, ids, id_column, image_column)
    if not all_ids:
        where = source if isinstance(source, str | Path) else f"the {type(source).__name__}"
        raise ValueError(
            f"encode_images: no images in {where} (image files end in "
            f"{', '.join(IMAGE_SUFFIXES)}); nothing to encode"
        )
    return all_ids, refs


def _probe_token_shape(vision_encoder, image_processor, compress) -> tuple[int, int]:
    inputs = dict(image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt"))
    with torch.no_grad():
        tokens = forward_features(vision_encoder, inputs)
        if compress is not None:
            tokens = compress(tokens)
    return int(tokens.shape[1]), int(tokens.shape[2])


def _pending(out: Path, overwrite: bool, writer_kwargs: dict, all_ids: list[str], batch_size: int):
    """The fixed batches (items `k*B .. k*B+B-1`) less the ids the store already holds; empty
    ones go. Every process (DDP re-runs the script) scans before the ranks meet: all see the
    same."""
    scan = TokenStoreWriter(
        out, resume=True, overwrite=overwrite, write_manifest=False, clean=False, lock=False,
        **writer_kwargs,
    )  # fmt: skip
    done = scan.done_ids
    remove_temporaries(out)
    batches = [
        list(range(k, min(k + batch_size, len(all_ids))))
        for k in range(0, len(all_ids), batch_size)
    ]
    batches = [[i for i in b if all_ids[i] not in done] for b in batches]
    return [b for b in batches if b]


def _predict(trainer, module: EncodeModule) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        # lightning's use of torch's pytree
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
        trainer.predict(module, return_predictions=False)


def _result(out, start: float, *, encoded, skipped: int, rank: int = 0) -> EncodeResult:
    """The run's `EncodeResult`, counted from the store as it now is; `encoded`: the number
    of images this run encoded, or their ids (those now in the store count)."""
    store = TokenStore.open(out)
    if not isinstance(encoded, int):
        encoded = sum(i in store for i in encoded)
    return EncodeResult(
        path=Path(out),
        count=len(store),
        encoded=encoded,
        skipped=skipped,
        failures=store.failures,
        bytes_per_image=store.bytes_per_image,
        seconds=time.perf_counter() - start,
        rank=rank,
    )
