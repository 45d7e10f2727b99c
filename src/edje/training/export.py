"""Export the best EDJE of a run with `save_pretrained`, processor and model card included."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from edje.data.load import hub_datasets
from edje.model_card import write_model_card

logger = logging.getLogger(__name__)


class ExportEDJE(Callback):
    """Saves `network.edje` and its processor to `dirpath` whenever `monitor` improves (or at
    the end of training when there is no validation), ready for `EDJEModel.from_pretrained`.
    At the end of training the exported model is evaluated on the data module's test split
    (first stage vs reranked, R@1/5/10 both ways) and its model card gets the table, the
    command and the seed.

    Args:
        dirpath: the exported model's folder.
        monitor, mode: the validation metric that picks the best model; `monitor=None`
            exports the final weights at the end of training instead.
        evaluate_test: run the test-split evaluation for the model card.
        k: rerank depth of that evaluation.
        compact: save only what differs from the base text encoder, in fp16
            (`EDJEModel.save_pretrained(compact=True)`).
    """

    def __init__(
        self,
        dirpath: str,
        monitor: str | None = "val/pair_accuracy",
        mode: str = "max",
        evaluate_test: bool = True,
        k: int = 10,
        compact: bool = False,
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"ExportEDJE: mode must be 'max' or 'min', got {mode!r}.")
        self.dirpath, self.monitor, self.mode = Path(dirpath), monitor, mode
        self.evaluate_test, self.k, self.compact = evaluate_test, k, compact
        self.best = -math.inf if mode == "max" else math.inf

    def state_dict(self) -> dict:
        return {"best": self.best}  # a resumed run exports only what beats the earlier best

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None:
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
        if self.monitor is None or math.isinf(self.best):  # the final weights are the result
            self.export(trainer, pl_module)
        datamodule = trainer.datamodule
        if self.evaluate_test and trainer.is_global_zero and datamodule is not None:
            from edje.training.hardware import describe_hardware

            devices = trainer.num_devices * trainer.num_nodes
            self.write_card_with_test_results(
                datamodule, describe_hardware(pl_module.device, count=devices)
            )

    def write_card_with_test_results(self, datamodule, hardware: str) -> None:
        """Choose fusion weights on the validation split, evaluate the exported model on the
        test split and fill its model card (command, seed, `hardware`, and a warning first
        when reranking lowers recall)."""
        from edje.modeling_edje import EDJEModel
        from edje.processing_edje import EDJEProcessor

        # Streamed shards (ShardDataModule) have no splits: evaluate with `edje eval` after.
        splits = getattr(datamodule, "splits", None)
        first_stage = getattr(datamodule, "first_stage", None)
        if splits is None or "test" not in splits or first_stage is None:
            logger.info("ExportEDJE: no test split or first stage: the card has no results")
            return
        model = EDJEModel.from_pretrained(self.dirpath).eval()
        processor = EDJEProcessor.from_pretrained(self.dirpath)
        data = datamodule.data if isinstance(datamodule.data, str) else "a DatasetDict"
        hub = hub_datasets(data) if not Path(data).is_dir() else []
        if Path(data).is_dir():  # a folder: its name (a card names no local path)
            data = Path(data).resolve().name
        validation = None
        if "validation" in splits:
            validation = self._choose_fusion(model, processor, splits["validation"], datamodule)
            validation.save(self.dirpath / "evaluation" / "validation", plot=False)
        report = self._evaluate(model, processor, splits["test"], datamodule, data)
        warnings = [r.regressions() for r in (validation, report) if r is not None]
        warning = " ".join(w for w in warnings if w) or None
        if warning:
            logger.warning("ExportEDJE: %s", warning)
        where = f"evaluated on the test split of `{data}`"
        results = f"{report.to_markdown()}\n\n{_provenance(hardware)}; {where}."
        write_model_card(
            model, self.dirpath, results=results, compact=self.compact, warning=warning,
            report=report, datasets=hub,
        )  # fmt: skip
        report.save(self.dirpath / "evaluation", plot=True)
        logger.info("ExportEDJE: test results written to %s/README.md", self.dirpath)

    def _evaluate(self, model, processor, split, datamodule, name: str):
        from edje.evaluation import evaluate

        return evaluate(
            split, datamodule.first_stage, model, processor, datamodule.store, k=self.k,
            dataset_name=name, show_progress_bar=False,
        )  # fmt: skip

    def _choose_fusion(self, model, processor, validation, datamodule):
        """Keep in the saved config the fusion weights that rank the validation split best;
        returns the validation report, fused with them."""
        from edje.evaluation import choose_fusion_weights, with_fusion

        report = self._evaluate(model, processor, validation, datamodule, "validation")
        choice = choose_fusion_weights(report)
        model.config.fusion_edje_weight, model.config.fusion_first_stage_weight = choice.weights
        saved = type(model.config).from_pretrained(self.dirpath)  # keeps the compact flag
        saved.fusion_edje_weight, saved.fusion_first_stage_weight = choice.weights
        saved.save_pretrained(self.dirpath)
        logger.info(
            "ExportEDJE: fusion weights %s (validation mean R@1 %.1f; EDJE alone %.1f, first "
            "stage alone %.1f)",
            choice.weights, choice.score, choice.table[0]["score"], choice.table[1]["score"],
        )  # fmt: skip
        return with_fusion(report, choice.weights)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        edje = pl_module.network.edje
        datamodule = trainer.datamodule
        pairs = getattr(datamodule, "pairs", None) or {}
        if "train" in pairs:  # what edje search shows when a query matches nothing
            edje.config.example_captions = list(dict.fromkeys(pairs["train"].captions))[:3]
        # A bound measured on the weights training started from (`pretrained`) is not these
        # weights': exact mode would trust it. `edje calibrate` measures theirs.
        edje.config.score_error_bounds = None
        edje.save_pretrained(self.dirpath, compact=self.compact)
        if datamodule is not None:
            processor_for(edje, datamodule).save_pretrained(self.dirpath)
        logger.info("exported EDJE (%s = %s) to %s", self.monitor, self.best, self.dirpath)


def _provenance(hardware: str) -> str:
    import sys

    from_cli = bool(sys.argv) and Path(sys.argv[0]).name == "edje"
    command = f"`{' '.join(['edje', *sys.argv[1:]])}`" if from_cli else "the Python API"
    seed = os.environ.get("PL_GLOBAL_SEED", "not set")  # what seed_everything used
    return f"Trained with {command} (seed {seed}) on {hardware}"


def processor_for(edje, datamodule):
    """The `EDJEProcessor` matching a trained model and the data module's tokenizer."""
    import copy

    from edje.backbones import load_image_processor
    from edje.processing_edje import EDJEProcessor

    image_processor = load_image_processor(
        datamodule.vision, image_size=datamodule.vision_image_size
    )
    processor = EDJEProcessor(
        image_processor=image_processor,
        tokenizer=copy.deepcopy(datamodule.tokenizer),
        num_image_tokens=edje.config.tokens_per_image,
        max_caption_length=edje.config.max_caption_length,
        normalize_captions=edje.config.normalize_captions,
    )
    if processor.image_token_id != edje.config.image_token_id:
        raise ValueError(
            f"ExportEDJE: the tokenizer gives <image> id {processor.image_token_id}, the model "
            f"expects {edje.config.image_token_id}; the data module's `text` must be the "
            "network's text encoder."
        )
    return processor
