"""Reranked recall on the validation split during training: the number a reranker is for."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from edje.first_stage.base import EmbeddingModel

logger = logging.getLogger(__name__)

T2I, I2T = "image_retrieval_recall@1", "text_retrieval_recall@1"


class ValidationRecall(Callback):
    """After each validation, reranks the data module's validation split as `edje eval` does
    (the first stage's top `k`, then the network's EDJE) and logs R@1 in percent:
    `val/reranked_t2i_r1`, `val/reranked_i2t_r1` and their mean `val/reranked_r1`.

    Pair accuracy against one mined negative (`val/pair_accuracy`) saturates long before the
    ranking among the first stage's top candidates stops improving; on a small set give
    `ExportEDJE(monitor="val/reranked_r1")` to keep the epoch that ranks best.

    Every process ranks the whole split (the same figures on each); with a large validation
    split, validate less often (`trainer.check_val_every_n_epoch`).

    Args:
        k: the rerank depth (`ExportEDJE`'s test evaluation uses 10).
    """

    def __init__(self, k: int = 10):
        if k < 1:
            raise ValueError(f"ValidationRecall: k must be >= 1, got {k}")
        self.k = k
        self._first_stage: _RememberedEmbeddings | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Checked before the first epoch, not after it.
        datamodule = trainer.datamodule
        splits = getattr(datamodule, "splits", None)
        first_stage = getattr(datamodule, "first_stage", None)
        if splits is None or first_stage is None:
            raise ValueError(
                "ValidationRecall: needs a data module with splits and a first stage "
                f"(EDJEDataModule with `first_stage`); got {type(datamodule).__name__} with "
                f"splits {sorted(splits) if splits is not None else None} and first stage "
                f"{first_stage!r}."
            )
        if "validation" not in splits:
            logger.warning(
                "ValidationRecall: the data has no validation split (it has %s): nothing is "
                "ranked, and an export monitoring val/reranked_r1 keeps the final weights.",
                sorted(splits),
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        split = datamodule.splits["validation"]
        recall = self._rerank(pl_module.network.edje, datamodule, split)
        for name, value in recall.items():
            pl_module.log(name, value, batch_size=len(split), sync_dist=True)

    @torch.no_grad()
    def _rerank(self, edje, datamodule, split) -> dict[str, float]:
        from edje.evaluation import evaluate
        from edje.training.export import processor_for

        if self._first_stage is None or self._first_stage.model is not datamodule.first_stage:
            self._first_stage = _RememberedEmbeddings(datamodule.first_stage)
        modes = {module: module.training for module in edje.modules()}
        edje.eval()
        try:
            report = evaluate(
                split, self._first_stage, edje, processor_for(edje, datamodule),
                datamodule.store, k=self.k, ks=(1,), fusion=None,
                device=next(edje.parameters()).device, show_progress_bar=False,
            )  # fmt: skip
        finally:
            for module, training in modes.items():
                module.training = training
        t2i, i2t = (100 * report.reranked_metrics[key] for key in (T2I, I2T))
        return {
            "val/reranked_t2i_r1": t2i,
            "val/reranked_i2t_r1": i2t,
            "val/reranked_r1": (t2i + i2t) / 2,
        }


class _RememberedEmbeddings(EmbeddingModel):
    """A frozen first stage's embeddings of the validation split, computed at the first
    validation and served again after (on a small set they were a third of each epoch's
    ranking). The first stage runs on the device `evaluate` asks for and goes back to its own.
    """

    def __init__(self, model: EmbeddingModel):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: `.to()` must not move it for good
        self.embedding_dim = getattr(model, "embedding_dim", None)
        self.name = getattr(model, "name", type(model).__name__)
        self._target = torch.device("cpu")
        self._remembered: dict[str, tuple[object, torch.Tensor]] = {}

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]  # nn.Module.to's own reading
        if device is not None:
            self._target = device
        return self

    def embed_texts(self, texts, batch_size=256, show_progress_bar=None):
        key = tuple(texts)
        return self._remember("texts", key, lambda: self.model.encode_texts(
            texts, batch_size=batch_size, show_progress_bar=show_progress_bar))  # fmt: skip

    def embed_images(self, images, batch_size=64, show_progress_bar=None):
        # Validation hands the same split each time; its length tells another one apart.
        key = len(images)
        return self._remember("images", key, lambda: self.model.encode_images(
            images, batch_size=batch_size, show_progress_bar=show_progress_bar))  # fmt: skip

    def _remember(self, kind: str, key, embed) -> torch.Tensor:
        if kind in self._remembered and self._remembered[kind][0] == key:
            return self._remembered[kind][1]
        home = getattr(self.model, "device", None)
        self.model.to(self._target)
        try:
            embeddings = embed().cpu()
        finally:
            if home is not None:
                self.model.to(home)
        self._remembered[kind] = (key, embeddings)
        return embeddings
