"""Export the best EDJE of a run with `save_pretrained`, processor and model card included."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

logger = logging.getLogger(__name__)


class ExportEDJE(Callback):
    """Saves `network.edje` and its processor to `dirpath` whenever `monitor` improves (or at
    the end of training when there is no validation), ready for `EDJEModel.from_pretrained`.

    Args:
        dirpath: the exported model's folder.
        monitor, mode: the validation metric that picks the best model.
    """

    def __init__(self, dirpath: str, monitor: str = "val/pair_accuracy", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"ExportEDJE: mode must be 'max' or 'min', got {mode!r}.")
        self.dirpath, self.monitor, self.mode = Path(dirpath), monitor, mode
        self.best = -math.inf if mode == "max" else math.inf

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best = value
            self.export(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if math.isinf(self.best):  # never validated: the final weights are the result
            self.export(trainer, pl_module)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        edje = pl_module.network.edje
        edje.save_pretrained(self.dirpath)
        datamodule = trainer.datamodule
        if datamodule is not None:
            processor_for(edje, datamodule).save_pretrained(self.dirpath)
        logger.info("exported EDJE (%s = %s) to %s", self.monitor, self.best, self.dirpath)


def processor_for(edje, datamodule):
    """The `EDJEProcessor` matching a trained model and the data module's tokenizer."""
    import copy

    from edje.backbones import load_vision_encoder
    from edje.processing_edje import EDJEProcessor

    _, image_processor = load_vision_encoder(
        datamodule.vision, image_size=datamodule.vision_image_size
    )
    processor = EDJEProcessor(
        image_processor=image_processor,
        tokenizer=copy.deepcopy(datamodule.tokenizer),
        num_image_tokens=edje.config.tokens_per_image,
        max_caption_length=edje.config.max_caption_length,
    )
    if processor.image_token_id != edje.config.image_token_id:
        raise ValueError(
            f"ExportEDJE: the tokenizer gives <image> id {processor.image_token_id}, the model "
            f"expects {edje.config.image_token_id}; the data module's `text` must be the "
            "network's text encoder."
        )
    return processor
