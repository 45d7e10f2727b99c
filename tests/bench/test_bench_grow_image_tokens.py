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
from tests.helpers.training_batches import synthetic_batch

BENCH = ROOT / "bench" / "grow_image_tokens.py"
spec = importlib.util.spec_from_file_location("bench_grow_image_tokens", BENCH)
grow_image_tokens = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grow_image_tokens)
QUERIES = grow_image_tokens.QUERIES


def fit(network, processor, steps: int, root, ckpt_path=None) -> list[int]:
    """Train to `steps`; the global step at each batch trained."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    class RecordSteps(Callback):
        def __init__(self):
            self.steps: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.steps.append(trainer.global_step)

    batches = torch.utils.data.DataLoader(
        [synthetic_batch(processor, seed=seed) for seed in range(4)],
        batch_size=None, collate_fn=lambda b: b,
    )  # fmt: skip
    record = RecordSteps()
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True), record],
    )  # fmt: skip
    trainer.fit(EDJETrainingModule(network, mlm_weight=0), batches, ckpt_path=ckpt_path)
    return record.steps


@pytest.fixture
def saved_run(tiny_processor, tmp_path):
    torch.manual_seed(0)
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    EDJEModel(config).save_pretrained(tmp_path / "base")
    tiny_processor.save_pretrained(tmp_path / "base")
    network = EDJEForPreTraining(pretrained=str(tmp_path / "base"), text_embedding_dim=8)
    fit(network, tiny_processor, 2, tmp_path / "run")
    return tmp_path


def queries_state(checkpoint):
    [state] = [
        s for s in checkpoint["optimizer_states"][0]["state"].values()
        if s["exp_avg"].dim() == 3 and s["exp_avg"].shape[-1] == 32
    ]  # fmt: skip
    return state


def test_a_grown_run_resumes_at_its_step_with_the_old_queries_kept(saved_run, tiny_processor):
    old = torch.load(saved_run / "run" / "last.ckpt", weights_only=True)
    out = saved_run / "grown"
    grow_image_tokens.write_grown(saved_run / "run" / "last.ckpt", str(saved_run / "base"), 6, out)
    grown = torch.load(out / "last.ckpt", weights_only=True)
    before, after = old["state_dict"][QUERIES], grown["state_dict"][QUERIES]
    assert after.shape == (1, 6, 32) and torch.equal(after[:, :4], before)
    noise = after[:, 4:] - before[:, :2]  # copies of the first two, plus half their spread
    assert 0.3 < noise.std() / before.std() < 0.7
    for name in ("exp_avg", "exp_avg_sq"):
        moment, was = queries_state(grown)[name], queries_state(old)[name]
        assert torch.equal(moment[:, :4], was) and torch.equal(moment[:, 4:], was[:, :2])

    network = EDJEForPreTraining(pretrained=str(out / "model"), text_embedding_dim=8)
    assert network.edje.config.num_image_tokens == 6
    steps = fit(network, tiny_processor, 3, saved_run / "resumed", ckpt_path=out / "last.ckpt")
    assert steps == [2]  # resumed at step 2: one batch more, at 6 tokens


def test_growing_to_no_more_tokens_is_refused_and_writes_nothing(saved_run):
    out = saved_run / "grown"
    with pytest.raises(ValueError, match="must exceed the run's 4, got 4"):
        grow_image_tokens.write_grown(
            saved_run / "run" / "last.ckpt", str(saved_run / "base"), 4, out
        )
    assert sorted(p.name for p in saved_run.iterdir()) == ["base", "run"]


def test_a_checkpoint_of_another_model_is_refused_and_writes_nothing(saved_run, tiny_processor):
    config = make_tiny_config(
        len(tiny_processor.tokenizer), tiny_processor.image_token_id, adapter_mlp_size=48
    )
    EDJEModel(config).save_pretrained(saved_run / "other")
    out = saved_run / "grown"
    with pytest.raises(RuntimeError, match="size mismatch"):
        grow_image_tokens.write_grown(
            saved_run / "run" / "last.ckpt", str(saved_run / "other"), 6, out
        )
    assert sorted(p.name for p in saved_run.iterdir()) == ["base", "other", "run"]


def test_growing_past_twice_the_queries_copies_them_in_turn():
    queries = torch.arange(6.0).reshape(1, 3, 2)
    grown = grow_image_tokens.grow(queries, 8, 0.0, torch.Generator())
    assert grown.shape == (1, 8, 2)
    assert torch.equal(grown[0, :, 0], torch.tensor([0.0, 2, 4, 0, 2, 4, 0, 2]))
