"""`ShardDataModule`: training pairs streamed from image-text tar shards (or a Hub data set),
pixels in the batch.

The online-vision mode: no raw token store is built; `EDJETrainingModule` runs the frozen
vision encoder on each batch's `pixel_values` in the training step (no grad, eval mode, its own
dtype). At the paper's scale this replaces a 16.5 TB raw store (14M images x 576 x 1024 x 2
bytes) with the shards themselves.

Each process reads its share of the shards (`edje.data.shards.stream_shards`: whole shards per
node when they divide evenly, else every n-th sample; DataLoader workers split a node's
shards), shuffled by a buffer with a fixed seed per epoch, and every process yields the same
number of batches, `samples_per_epoch // (world_size * batch_size)`, so no process waits at the
end of an epoch. The order is deterministic, so a run resumed from a mid-epoch checkpoint skips
the batches the checkpoint had trained on and sees exactly the rest of the epoch. A sample
whose image does not decode is left out of its batch, logged and kept in `skipped`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION, resolve_backbone
from edje.configuration_edje import clean_caption
from edje.data.shards import ShardImages, expand_shards, stream_dataset, stream_shards
from edje.training.datamodule import agreeing, stable_key

logger = logging.getLogger(__name__)


class ShardDataModule(LightningDataModule):
    """Caption-image pairs from WebDataset / img2dataset shards, for `EDJETrainingModule`'s
    online-vision mode.

    Args:
        shards: tar shards (local paths or URLs; brace patterns expanded), `key.jpg`/`key.png`
            and `key.txt` per sample.
        dataset: instead of shards, a Hub data set streamed (or a builder over local files,
            e.g. "parquet" with `data_files`), its `split`'s `image_column` and
            `caption_column` (`id_column` for keys, else the image bytes' hash).
        vision, vision_image_size, text, max_caption_length, normalize_captions: the network's
            backbones and caption rule (the image processor and tokenizer come from them);
            `backbones` links them from the module as in `EDJEDataModule`.
        samples_per_epoch: samples in the shards (counted from local shards' headers when not
            given; needed for URLs). The remainder below `world_size * batch_size` is dropped.
        first_stage: an `EmbeddingModel` (or its folder) that embeds texts and raw vision tokens
            (`embed_vision_tokens`): mining's similarities, as in the raw-store mode. None:
            random negatives only.
        shuffle_buffer: samples held for shuffling (0: the shards' order).
    """

    def __init__(
        self,
        shards: str | list[str] | None = None,
        *,
        dataset: str | None = None,
        data_files: str | list[str] | None = None,
        split: str = "train",
        image_column: str = "image",
        caption_column: str = "caption",
        id_column: str | None = None,
        vision: str | None = None,
        vision_image_size: int | None = None,
        text: str | None = None,
        max_caption_length: int | None = None,
        normalize_captions: bool | None = None,
        backbones: dict[str, Any] | None = None,
        batch_size: int = 64,
        samples_per_epoch: int | None = None,
        first_stage=None,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        linked = agreeing(
            backbones or {}, vision=vision, vision_image_size=vision_image_size, text=text,
            max_caption_length=max_caption_length, normalize_captions=normalize_captions,
        )  # fmt: skip
        if (shards is None) == (dataset is None):
            raise ValueError("ShardDataModule: give either shards or dataset, not both.")
        self.shards = expand_shards(shards) if shards is not None else None
        self.dataset = dict(
            path=dataset, data_files=data_files, split=split, image_column=image_column,
            caption_column=caption_column, id_column=id_column,
        )  # fmt: skip
        self.vision = linked.get("vision") or OFFLINE_VISION
        self.vision_image_size = linked.get("vision_image_size")
        self.text = linked.get("text") or OFFLINE_TEXT
        self.max_caption_length = linked.get("max_caption_length") or 64
        self.normalize_captions = bool(linked.get("normalize_captions"))
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, shuffle_buffer
        self.first_stage = first_stage
        self._resume: dict[str, int] = {}  # {"epoch", "batches"} from a checkpoint
        self.skipped: dict[str, str] = {}  # key -> why its image was left out of its batch

    def setup(self, stage: str | None = None) -> None:
        from transformers import AutoTokenizer

        from edje.backbones import load_image_processor
        from edje.first_stage import load_embedding_model

        if self.samples_per_epoch is None:
            self.samples_per_epoch = self._count_samples()
        if isinstance(self.first_stage, str):
            self.first_stage = load_embedding_model(self.first_stage)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(self.text))
        # The processor of the network's vision encoder (its configs only: no weights).
        self.image_processor = load_image_processor(self.vision, image_size=self.vision_image_size)

    def _count_samples(self) -> int:
        if self.shards is None:  # a Hub data set whose card records its size
            import datasets

            options = {k: self.dataset[k] for k in ("path", "data_files")}
            splits = datasets.load_dataset_builder(**options).info.splits or {}
            split = splits.get(self.dataset["split"])
            if split is None or not split.num_examples:
                raise ValueError(
                    f"ShardDataModule: {self.dataset['path']} does not record how many samples "
                    f"its {self.dataset['split']!r} split holds; give samples_per_epoch."
                )
            return split.num_examples
        if any("://" in shard for shard in self.shards):
            raise ValueError("ShardDataModule: give samples_per_epoch for shards read from URLs.")
        return len(ShardImages(self.shards))

    def stream(self, rank: int, world_size: int):
        """This process's share of the samples, as `edje.data.shards` streams them."""
        if self.shards is not None:
            return stream_shards(self.shards, rank=rank, world_size=world_size)
        return stream_dataset(**self.dataset, rank=rank, world_size=world_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each process trains on per epoch."""
        world = self.trainer.world_size if self.trainer else 1
        batches = self.samples_per_epoch // (world * self.batch_size)
        if batches < 1:
            raise ValueError(
                f"ShardDataModule: {self.samples_per_epoch} samples do not make one batch of "
                f"{self.batch_size} on each of {world} processes."
            )
        return batches

    def train_dataloader(self) -> _Epoch:
        return _Epoch(self)

    # -- resuming mid-epoch: Lightning saves and restores this with every checkpoint -----------

    def state_dict(self) -> dict[str, int]:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        # A checkpoint written after a batch's step: that batch is trained on.
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    # -- one sample, one batch -------------------------------------------------------------

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        """A batch of the rows whose image decodes; the others are in `skipped`, `(key,
        reason)` each (one bad image in a shard must not end a run, nor stop its resume)."""
        from edje._utils import load_rgb
        from edje.image_tokens import pixel_inputs

        decoded, skipped = [], []
        for row in rows:
            try:
                decoded.append((row, load_rgb(row["image"]["bytes"])))
            except ValueError as error:
                skipped.append((row["__key__"], str(error)))
        if not decoded:
            raise ValueError(
                f"ShardDataModule: no image of a batch of {len(rows)} decodes "
                f"(e.g. {skipped[0][0]!r}: {skipped[0][1]}); are these image shards?"
            )
        rows = [row for row, _ in decoded]
        captions = [row["caption"] for row in rows]
        if self.normalize_captions:  # as the network reads them (the authors' cleaning)
            captions = [clean_caption(c) for c in captions]
        encoded = self.tokenizer(
            captions,
            truncation=True,
            max_length=self.max_caption_length,
            padding="max_length",
            return_tensors="pt",
        )
        keys = torch.tensor([stable_key(row["__key__"]) for row in rows])
        pixels = pixel_inputs(self.image_processor, [image for _, image in decoded])
        batch = {
            "skipped": skipped,
            "caption_ids": encoded["input_ids"],
            "caption_mask": encoded["attention_mask"],
            "pixel_values": pixels["pixel_values"],
            "image_key": keys,
            "caption_key": keys,  # one caption a sample
        }
        if self.first_stage is not None:
            batch["text_embedding"] = self.first_stage.encode_texts(captions)
        else:  # no mining signal: random negatives only, as EDJEDataModule without one
            batch["text_embedding"] = torch.zeros(len(rows), 1)
        return batch


class _Epoch:
    """The batches of this process for the trainer's current epoch: `batches_per_epoch` of
    them, the first ones skipped when resuming that epoch from a checkpoint."""

    def __init__(self, data: ShardDataModule):
        self.data = data

    def __len__(self) -> int:
        return self.data.batches_per_epoch

    # Lightning asks the loader, not the data module, whether a mid-epoch resume is exact (and
    # warns it is not otherwise): the loader's state is the data module's.
    def state_dict(self) -> dict[str, int]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.data.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        data, trainer = self.data, self.data.trainer
        epoch = trainer.current_epoch if trainer else 0
        stream = data.stream(
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        if data.shuffle_buffer:
            stream = stream.shuffle(seed=data.seed, buffer_size=data.shuffle_buffer)
        stream.set_epoch(epoch)
        # Batches a checkpoint of this epoch trained on are read again (the shuffle's order
        # needs their samples) but not decoded: exact with any number of workers.
        skip = data._resume.get("batches", 0) if data._resume.get("epoch") == epoch else 0
        data._resume = {}
        loader = torch.utils.data.DataLoader(
            stream, batch_size=data.batch_size, num_workers=data.num_workers,
            collate_fn=_CollateAfter(data.collate, skip),
        )  # fmt: skip
        for number, batch in enumerate(loader):
            if number >= len(self):
                return
            if "passed" in batch:
                if batch["passed"] != number:  # the workers' order is not the assumed one
                    raise RuntimeError(
                        f"ShardDataModule: resuming, batch {number} came as batch "
                        f"{batch['passed']}; resume with num_workers=0."
                    )
                continue
            for key, reason in batch.pop("skipped"):
                data.skipped[key] = reason
                logger.warning(
                    "ShardDataModule: skipped sample %r (%d so far): %s",
                    key, len(data.skipped), reason,
                )  # fmt: skip
            if number >= skip:
                yield batch


class _CollateAfter:
    """`collate` for the batches from number `skip` on, a `{"passed": number}` marker for the
    ones before: decoding, resizing and embedding captions are most of a batch's reading
    cost, and a resume late in an epoch would pay them for every batch it passes.

    A DataLoader asks its workers for batches in turn, so worker `w` of `W` makes batches
    `w, w + W, w + 2W, ...` (until one worker's shards run out: `_Epoch` checks each marker's
    number against the order batches come in)."""

    def __init__(self, collate, skip: int):
        self.collate, self.skip, self.made = collate, skip, 0

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        worker = torch.utils.data.get_worker_info()
        number = self.made * (worker.num_workers if worker else 1) + (worker.id if worker else 0)
        self.made += 1
        return {"passed": number} if number < self.skip else self.collate(rows)
