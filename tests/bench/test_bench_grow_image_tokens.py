"""bench/grow_image_tokens.py: a run grown from m to more stored tokens resumes at the new size
from its step, its first m queries and their AdamW moments as they were."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from edje import EDJEModel
from edje.training import EDJEForPreTraining, EDJETrainingModule
from tests.helpers.paths import ROOT
from tests.helpers.tiny import make_tiny_config
from tests.training.test_training_module import synthetic_batch

BENCH = ROOT / "bench" / "grow_image_tokens.py"
spec = importlib.util.spec_from_file_location("bench_grow_image_tokens", BENCH)
grow_image_tokens = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grow_image_tokens)


def fit(network, processor, steps: int, root, ckpt_path=None):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    batches = torch.utils.data.DataLoader(
        [synthetic_batch(processor, seed=seed) for seed in range(4)],
        batch_size=None, collate_fn=lambda b: b,
    )  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True)],
    )  # fmt: skip
    trainer.fit(EDJETrainingModule(network, mlm_weight=0), batches, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def saved_run(tiny_processor, tmp_path):
    torch.manual_seed(0)
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    EDJEModel(config).save_pretrained(tmp_path / "base")
    tiny_processor.save_pretrained(tmp_path / "base")
    network = EDJEForPreTraining(pretrained=str(tmp_path / "base"), text_embedding_dim=8)
    fit(network, tiny_processor, 2, tmp_path / "run")
    return tmp_path


def test_a_grown_run_resumes_at_its_step_with_the_old_queries_kept(saved_run, tiny_processor):
    old = torch.load(saved_run / "run" / "last.ckpt", weights_only=True)
    out = saved_run / "grown"
    grow_image_tokens.write_grown(saved_run / "run" / "last.ckpt", str(saved_run / "base"), 6, out)
    grown = torch.load(out / "last.ckpt", weights_only=True)
    queries = grown["state_dict"][grow_image_tokens.QUERIES]
    assert queries.shape == (1, 6, 32)
    assert torch.equal(queries[:, :4], old["state_dict"][grow_image_tokens.QUERIES])
    assert not torch.equal(queries[:, 4:], queries[:, :2])  # copies plus noise

    network = EDJEForPreTraining(pretrained=str(out / "model"), text_embedding_dim=8)
    assert network.edje.config.num_image_tokens == 6
    trainer = fit(network, tiny_processor, 3, saved_run / "resumed", ckpt_path=out / "last.ckpt")
    assert trainer.global_step == 3  # resumed at step 2, one more step at 6 tokens
    moments = trainer.optimizers[0].state[network.edje.adapter.queries]
    assert moments["exp_avg"].shape == (1, 6, 32)


def test_growing_to_no_more_tokens_is_refused_and_writes_nothing(saved_run):
    out = saved_run / "grown"
    with pytest.raises(ValueError, match="must exceed the run's 4, got 4"):
        grow_image_tokens.write_grown(
            saved_run / "run" / "last.ckpt", str(saved_run / "base"), 4, out
        )
    assert sorted(p.name for p in saved_run.iterdir()) == ["base", "run"]


def test_growing_past_twice_the_queries_copies_them_in_turn():
    queries = torch.arange(6.0).reshape(1, 3, 2)
    grown = grow_image_tokens.grow(queries, 8, 0.0, torch.Generator())
    assert grown.shape == (1, 8, 2)
    assert torch.equal(grown[0, :, 0], torch.tensor([0.0, 2, 4, 0, 2, 4, 0, 2]))
