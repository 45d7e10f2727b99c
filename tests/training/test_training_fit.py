"""Training for real on the CPU: a small subset overfits, and the quickstart recipe learns."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from datasets import DatasetDict
from lightning.pytorch import Trainer

from edje import EDJEModel
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
from edje.data import make_builtin_dataset
from edje.evaluation.metrics import pair_accuracy
from edje.training import EDJEDataModule, EDJEForPreTraining, EDJETrainingModule
from edje.training.export import processor_for
from edje.training.hardware import describe_hardware
from tests.helpers.paths import ROOT
from tests.helpers.tiny import make_tiny_config_on_offline_dinov2

RECIPE = "recipes/quickstart.yaml"


@pytest.fixture(scope="module")
def sixty_four_scenes():
    """One scene of each of 64 built-in triplets: 64 images, one caption each."""
    train = make_builtin_dataset(seed=0, n_train_triplets=64, n_train_single=0)["train"]
    train = train.select(range(0, 192, 3))
    return train.map(lambda row: {"captions": row["captions"][:1]})


def test_sixty_four_pairs_overfit_to_95_percent_pair_accuracy(sixty_four_scenes, tmp_path):
    data = EDJEDataModule(
        DatasetDict(train=sixty_four_scenes),
        store=str(tmp_path / "raw.store"),
        first_stage=None,  # random negatives: no first stage needed to memorise
        vision=OFFLINE_VISION,
        vision_image_size=112,
        text=OFFLINE_TEXT,
        batch_size=64,
        max_caption_length=32,
    )
    data.prepare_data()
    data.setup("fit")
    tokenizer_size = len(data.tokenizer) + 1  # + <image>
    config = make_tiny_config_on_offline_dinov2(
        tokenizer_size,
        text_config=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        num_image_tokens=8,
        adapter_mlp_size=128,
        adapter_type="light",
        adapter_qk_norm=True,  # without these two a tiny random model sits at chance longer
        adapter_position_embedding=True,
    )
    torch.manual_seed(0)
    network = EDJEForPreTraining(EDJEModel(config), mlm=False)
    module = EDJETrainingModule(
        network,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        mlm_weight=0,
        text_recovery_weight=0,
        negatives={"random": 1.0},
        warmup_steps=1,
        lr_decay_per_epoch=1.0,
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1000,  # about 100 s on 2 CPU cores
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, datamodule=data)
    edje = network.edje.eval()
    processor = processor_for(edje, data)
    captions = data.pairs["train"].captions
    raw = data.store.gather(data.pairs["train"].image_ids, dtype=torch.float32)
    with torch.no_grad():
        tokens = edje.compress(raw)
        scores = torch.stack(
            [edje(**processor(text=c, image_tokens=tokens)).logits for c in captions]
        )
    # Every caption against all 63 wrong images, not only the negatives it trained on.
    accuracy = pair_accuracy(scores)
    print(f"all-pairs accuracy {accuracy:.1f}% after {trainer.global_step} steps")  # pytest -s
    assert accuracy >= 95.0, f"pair accuracy {accuracy:.1f}% after {trainer.global_step} steps"


def test_quickstart_recipe_trains_and_its_loss_decreases(tmp_path, monkeypatch):
    """The shipped recipe on a reduced built-in set for 40 CPU steps: the path runs end to end
    (store, first stage, training, export) and the loss goes down."""
    from pathlib import Path

    from edje.commands.fit import make_cli

    recipe = ROOT / RECIPE
    monkeypatch.chdir(tmp_path)
    make_cli(
        [
            "--config",
            str(recipe),
            "--data.builtin",
            "{n_train_triplets: 8, n_train_single: 4, n_val_triplets: 2, n_test_triplets: 2}",
            "--data.batch_size",
            "12",
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32",
            "--trainer.max_steps",
            "40",  # ITM alone (the recipe's objective) leaves chance after a few dozen steps
            "--trainer.val_check_interval",
            "20",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            "logs",
            "--trainer.enable_progress_bar",
            "false",
            "--model.warmup_steps",
            "1",
        ]
    )
    with open(next(Path("logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses
    model = Path("outputs/quickstart/model")
    # Exported compact (word embeddings frozen, so only what changed is kept, in fp16).
    weights = model / "edje_compact.safetensors"
    assert weights.is_file() and (model / "processor_config.json").is_file()
    assert weights.stat().st_size < 30 * 2**20
    assert EDJEModel.from_pretrained(model).config.num_image_tokens == 16
    card = (model / "README.md").read_text()
    assert "image_retrieval_recall" in card or "R@1" in card, card
    assert "(seed 0)" in card and (model / "evaluation" / "report.json").is_file()
    # The fusion weights chosen on validation are saved, with the validation report they won.
    chosen = json.loads((model / "evaluation" / "validation" / "report.json").read_text())
    config = EDJEModel.from_pretrained(model).config
    assert chosen["fusion_weights"] == [config.fusion_edje_weight, config.fusion_first_stage_weight]
    assert chosen["dataset"]["split"] == "validation" and chosen["fused_metrics"]
    assert len(config.example_captions) == 3  # what edje search shows when nothing matches
    assert describe_hardware("cpu") in card  # what it trained on
    assert "pip install edje" in card  # compact weights need edje, not remote code alone
