"""The Lightning side of `edje.store.encode.encode_store`: fixed batches dealt to the ranks,
a `LightningModule` that runs the vision forward (and the adapter), and a prediction writer
that writes each rank's shards as batches arrive and, on rank 0, the manifest."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edje._utils import load_rgb, require
from edje.image_tokens import pixel_inputs
from edje.modeling_edje import forward_features
from edje.store.writer import TokenStoreWriter, finalize

# Lightning runs the encoding on any number of devices: the training extra.
_lightning = require("lightning.pytorch", "training", "Encoding images (edje encode)")
LightningModule, Trainer = _lightning.LightningModule, _lightning.Trainer
BasePredictionWriter = require(
    "lightning.pytorch.callbacks", "training", "Encoding images (edje encode)"
).BasePredictionWriter

__all__ = [
    "Batches",
    "EncodeModule",
    "StoreWriterCallback",
    "encode_trainer",
    "first_process",
    "rank_batches",
]


class Batches(torch.utils.data.Dataset):
    """Item k is the k-th fixed batch: ids, processor inputs `{name: [b, ...]}`, failures."""

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


def rank_batches(num_batches: int, rank: int, world_size: int) -> list[int]:
    """Batches of one rank: every `world_size`-th from `rank`; `[num_batches]` (one empty
    batch) when there are none, so every rank runs the writer's hooks and meets the barriers."""
    return list(range(rank, num_batches, world_size)) or [num_batches]


class EncodeModule(LightningModule):
    """Runs `forward_features` and then `compressor` on each batch; `owner` (the model or module
    behind `compressor`) is a submodule so that Lightning moves it to the device."""

    def __init__(
        self,
        vision_encoder: torch.nn.Module,
        compressor: Callable[[torch.Tensor], torch.Tensor] | None,
        owner: torch.nn.Module | None,
        data: Batches,
        workers: int,
    ):
        super().__init__()
        self.vision_encoder = vision_encoder.eval().requires_grad_(False)
        self.compressor, self.compressor_owner = compressor, owner
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
        tokens = forward_features(self.vision_encoder, batch["inputs"])  # [B, n, d_vis]
        if self.compressor is not None:
            tokens = self.compressor(tokens)  # [B, m, d]
        return {"ids": batch["ids"], "failures": batch["failures"], "tokens": tokens}


class StoreWriterCallback(BasePredictionWriter):
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


def encode_trainer(callback, accelerator, devices, num_nodes, strategy, precision) -> Trainer:
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


def first_process() -> bool:
    """Whether this is the process that launched the encode (DDP's other processes get
    LOCAL_RANK / NODE_RANK, or RANK from torchrun, in their environment)."""
    rank = os.environ.get("RANK")
    if rank is not None:
        return rank == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
