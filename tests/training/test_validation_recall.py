"""ValidationRecall: the reranked R@1 it logs is `edje eval`'s on the validation split, with the
weights of that epoch, and the export can keep the best epoch by it. On the same small data
module: Lightning's second prepare_data, after setup, keeps the fitted first stage."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from edje import EDJEModel
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION, load_image_processor
from edje.data import make_builtin_dataset
from edje.evaluation import evaluate
from edje.first_stage.base import EmbeddingModel
from edje.training import (
    EDJEDataModule,
    EDJEForPreTraining,
    EDJETrainingModule,
    ExportEDJE,
    ValidationRecall,
)
from edje.training.export import processor_for
from tests.helpers.tiny import make_tiny_config_on_offline_dinov2


class Record(Callback):
    """What each validation logged, the weights it ranked with, and whether the network trained
    in train mode after it."""

    def __init__(self):
        self.logged, self.weights, self.train_mode_at_step = [], [], []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.logged.append({k: float(v) for k, v in metrics.items() if "reranked" in k})
            state = pl_module.network.edje.state_dict()
            self.weights.append({k: v.detach().clone() for k, v in state.items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_mode_at_step.append(pl_module.network.edje.training)


@pytest.fixture(scope="module")
def scenes_module(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recall")
    splits = make_builtin_dataset(seed=0, n_train_triplets=12, n_train_single=0,
                                  n_val_triplets=4, n_test_triplets=1)  # fmt: skip
    data = EDJEDataModule(
        splits,
        store=str(tmp / "raw.store"),
        first_stage=str(tmp / "first_stage"),
        fit_first_stage=True,
        vision=OFFLINE_VISION,
        vision_image_size=112,
        text=OFFLINE_TEXT,
        batch_size=16,
        max_caption_length=32,
    )
    data.prepare_data()
    data.setup("fit")
    return data, tmp


def tiny_network(data, seed: int = 0) -> EDJEForPreTraining:
    size = len(data.tokenizer) + 1  # + <image>
    config = make_tiny_config_on_offline_dinov2(
        size,
        num_image_tokens=4,
        adapter_mlp_size=64,
        vision_encoder_name=OFFLINE_VISION,  # what the raw store's fingerprint is checked against
        vision_image_size=112,
        vision_image_processor=load_image_processor(OFFLINE_VISION, image_size=112).to_dict(),
    )
    torch.manual_seed(seed)
    return EDJEForPreTraining(EDJEModel(config), mlm=False)


def mean_r1(report) -> float:
    metrics = report.reranked_metrics
    return 100 * (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2


def test_logged_recall_is_edje_evals_of_each_epochs_weights_and_reaches_the_export(
    scenes_module,
):
    data, tmp = scenes_module
    network = tiny_network(data)
    module = EDJETrainingModule(
        network,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        mlm_weight=0,
        text_recovery_weight=0,
        negatives={"random": 1.0},
        warmup_steps=1,
    )
    record = Record()
    export = ExportEDJE(str(tmp / "model"), monitor="val/reranked_r1", evaluate_test=False)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ValidationRecall(k=5), record, export],
    )
    trainer.fit(module, datamodule=data)

    assert len(record.logged) == 3
    # Training went on in train mode after each validation.
    assert record.train_mode_at_step and all(record.train_mode_at_step)
    # Each epoch's figures are `edje eval`'s code run on that epoch's weights.
    model = EDJEModel(network.edje.config).eval()
    for logged, weights in zip(record.logged, record.weights, strict=True):
        model.load_state_dict(weights)
        report = evaluate(data.splits["validation"], data.first_stage, model,
                          processor_for(model, data), data.store, k=5, ks=(1,), fusion=None,
                          device="cpu", show_progress_bar=False)  # fmt: skip
        metrics = report.reranked_metrics
        assert logged["val/reranked_t2i_r1"] == pytest.approx(
            100 * metrics["image_retrieval_recall@1"], abs=1e-4
        )
        assert logged["val/reranked_r1"] == pytest.approx(mean_r1(report), abs=1e-4)
    # ExportEDJE reads it as its monitor and saved the first epoch with the best value.
    values = [x["val/reranked_r1"] for x in record.logged]
    best = values.index(max(values))
    assert export.best == pytest.approx(values[best])
    saved = EDJEModel.from_pretrained(tmp / "model").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in record.weights[best].items())


def test_recall_is_of_the_weights_given_and_the_network_goes_back_to_train_mode(scenes_module):
    data, _ = scenes_module
    split = data.splits["validation"]
    figures = []
    for seed in (0, 1):
        edje = tiny_network(data, seed).edje.train()
        held = edje.joint_encoder.embeddings.dropout.eval()  # held in eval mode: stays so
        recall = ValidationRecall(k=5)._rerank(edje, data, split)
        assert edje.training and edje.adapter.training and not held.training
        direct = evaluate(split, data.first_stage, edje.eval(), processor_for(edje, data),
                          data.store, k=5, ks=(1,), fusion=None, device="cpu",
                          show_progress_bar=False)  # fmt: skip
        assert recall["val/reranked_r1"] == pytest.approx(mean_r1(direct), abs=1e-4)
        figures.append(recall)
    assert figures[0] != figures[1], "two random networks ranked the split alike"


class CountingFirstStage(EmbeddingModel):
    """The data module's first stage, counting what it embeds and where it is moved."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.embedding_dim, self.name = inner, inner.embedding_dim, inner.name
        self.calls, self.moves = Counter(), []

    def embed_texts(self, texts, batch_size=256, show_progress_bar=None):
        self.calls["texts"] += 1
        return self.inner.encode_texts(texts, batch_size, show_progress_bar)

    def embed_images(self, images, batch_size=64, show_progress_bar=None):
        self.calls["images"] += 1
        return self.inner.encode_images(images, batch_size, show_progress_bar)

    def to(self, *args, **kwargs):
        self.moves.append(torch.device(args[0] if args else kwargs["device"]))
        return super().to(*args, **kwargs)


def test_the_first_stage_embeds_the_split_once_and_goes_back_where_it_was(
    scenes_module, monkeypatch
):
    data, _ = scenes_module
    counting = CountingFirstStage(data.first_stage)
    monkeypatch.setattr(data, "first_stage", counting)
    split, recall = data.splits["validation"], ValidationRecall(k=5)
    figures = [recall._rerank(tiny_network(data, seed).edje, data, split) for seed in (0, 0, 1)]
    assert counting.calls == {"texts": 1, "images": 1}
    # For the images, then the captions: to the device evaluate asks for, then back to its own.
    assert counting.moves == [torch.device("cpu"), counting.device] * 2
    # The remembered embeddings rank as the first stage's own.
    assert figures[0] == figures[1] != figures[2]
    edje = tiny_network(data, 1).edje.eval()
    direct = evaluate(split, counting.inner, edje, processor_for(edje, data), data.store, k=5,
                      ks=(1,), fusion=None, device="cpu", show_progress_bar=False)  # fmt: skip
    assert figures[2]["val/reranked_r1"] == pytest.approx(mean_r1(direct), abs=1e-4)
    # Another first stage is embedded anew.
    other = CountingFirstStage(counting.inner)
    monkeypatch.setattr(data, "first_stage", other)
    recall._rerank(tiny_network(data, 0).edje, data, split)
    assert other.calls == {"texts": 1, "images": 1}


def test_a_data_module_without_a_first_stage_is_refused_before_training():
    datamodule = SimpleNamespace(splits={"train": [], "validation": []}, first_stage=None)
    trainer = SimpleNamespace(datamodule=datamodule)
    with pytest.raises(ValueError, match=r"first stage.*first stage None"):
        ValidationRecall().setup(trainer, pl_module=None, stage="fit")
    trainer = SimpleNamespace(datamodule=None)  # fit with plain dataloaders
    with pytest.raises(ValueError, match=r"got NoneType with splits None"):
        ValidationRecall().setup(trainer, pl_module=None, stage="fit")


def test_data_without_a_validation_split_is_warned_of(caplog):
    datamodule = SimpleNamespace(splits={"train": [], "test": []}, first_stage=object())
    trainer = SimpleNamespace(datamodule=datamodule)
    ValidationRecall().setup(trainer, pl_module=None, stage="fit")
    assert "no validation split (it has ['test', 'train'])" in caplog.text
    assert "keeps the final weights" in caplog.text


def test_k_below_one_is_refused():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        ValidationRecall(k=0)


def test_prepare_data_again_after_setup_keeps_the_fitted_first_stage(scenes_module):
    """Lightning calls prepare_data at fit even when setup already loaded the first stage."""
    data, tmp = scenes_module
    fitted = (tmp / "first_stage").stat().st_mtime_ns
    loaded = data.first_stage
    data.prepare_data()
    assert (tmp / "first_stage").stat().st_mtime_ns == fitted and data.first_stage is loaded
