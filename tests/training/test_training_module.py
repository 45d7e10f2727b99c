"""EDJETrainingModule on tiny random networks: every objective, teachers, and clear failures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edje import EDJEModel
from edje.training import (
    EDJEForPreTraining,
    EDJETeacher,
    EDJETrainingModule,
    FirstStageTeacher,
)
from tests.helpers.tiny import make_tiny_config
from tests.helpers.training_batches import synthetic_batch


@pytest.fixture
def tiny_network(tiny_processor):
    torch.manual_seed(0)
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    return EDJEForPreTraining(EDJEModel(config), text_embedding_dim=8)


def test_every_objective_gives_a_finite_loss_and_gradients(tiny_network, tiny_processor):
    module = EDJETrainingModule(tiny_network, negatives={"hardest": 1, "topk": 1, "random": 1})
    terms, accuracy = module._losses(synthetic_batch(tiny_processor), train=True)
    assert set(terms) == {"itm", "mlm", "text_recovery"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert 0 <= accuracy <= 1
    module._total(terms).backward()
    network = module.network
    assert network.edje.adapter.queries.grad is not None
    assert network.edje.itm_head.weight.grad is not None
    assert network.mlm_transform[0].weight.grad is not None
    assert network.text_embedding_head.weight.grad is not None


def test_itm_alone_starts_near_chance(tiny_network, tiny_processor):
    module = EDJETrainingModule(tiny_network, mlm_weight=0, text_recovery_weight=0)
    terms, _ = module._losses(synthetic_batch(tiny_processor), train=True)
    assert set(terms) == {"itm"}
    assert abs(terms["itm"].item() - torch.log(torch.tensor(2.0)).item()) < 0.05


def test_itm_on_the_fused_score_adds_the_first_stages_similarity_to_every_pair(
    tiny_network, tiny_processor
):
    """With the first stage's embeddings equal for each positive pair and orthogonal across
    pairs, a large fused weight ranks every positive above its negatives (loss near 0) where
    EDJE's own logits, near chance at the start, cannot; the weight scales the difference."""
    batch = synthetic_batch(tiny_processor)
    aligned = torch.eye(6, 8)  # pair i's caption and image share embedding i
    batch["text_embedding"], batch["image_embedding"] = aligned, aligned.clone()
    tiny_network.eval()  # no dropout: the calls below compare the fusion alone
    itm_only = dict(mlm_weight=0, text_recovery_weight=0, negatives={"random": 1.0})
    alone, _ = EDJETrainingModule(tiny_network, **itm_only)._losses(batch, train=True)
    fused = {}
    for weight in (5.0, 50.0):
        module = EDJETrainingModule(tiny_network, **itm_only, itm_first_stage_weight=weight)
        fused[weight], accuracy = module._losses(batch, train=True)
        assert accuracy == 1.0
    assert alone["itm"] > 0.5
    assert alone["itm"] > fused[5.0]["itm"] > fused[50.0]["itm"]
    assert fused[50.0]["itm"] < 1e-6


def test_distillation_from_a_local_edje_teacher(tiny_network, tiny_processor):
    torch.manual_seed(1)
    local = make_tiny_config(
        len(tiny_processor.tokenizer), tiny_processor.image_token_id, adapter_mode="local"
    )
    teacher = EDJETeacher(EDJEModel(local))
    module = EDJETrainingModule(tiny_network, teacher=teacher, mlm_weight=0)
    terms, _ = module._losses(synthetic_batch(tiny_processor), train=True)
    assert set(terms) == {"itm", "text_recovery", "distillation"}
    module._total(terms).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert tiny_network.edje.itm_head.weight.grad is not None


def test_distillation_from_the_first_stage_follows_its_cosines_at_its_temperature(
    tiny_network, tiny_processor
):
    from edje.first_stage import LinearProbeEmbedding

    teacher = FirstStageTeacher()
    teacher.bind_data(None, None, first_stage=LinearProbeEmbedding(temperature=0.08))
    assert teacher.temperature == pytest.approx(0.08)
    module = EDJETrainingModule(tiny_network, teacher=teacher, mlm_weight=0,
                                text_recovery_weight=0)  # fmt: skip
    batch = synthetic_batch(tiny_processor)
    scored = {}
    original = teacher.score

    def spy(pairs):
        scored["pairs"], scored["logits"] = pairs, original(pairs)
        return scored["logits"]

    teacher.score = spy
    terms, _ = module._losses(batch, train=True)
    assert set(terms) == {"itm", "distillation"} and torch.isfinite(terms["distillation"])
    pairs = scored["pairs"]
    # Row by row, the teacher scored the caption's and the image's own first-stage embeddings.
    cosine = F.cosine_similarity(pairs.text_embeddings, pairs.image_embeddings, dim=-1)
    assert torch.allclose(scored["logits"], cosine / 0.08)
    text_of = dict(zip(batch["caption_key"].tolist(), batch["text_embedding"], strict=True))
    image_of = dict(zip(batch["image_key"].tolist(), batch["image_embedding"], strict=True))
    for row in range(len(pairs.caption_keys)):
        assert torch.equal(pairs.text_embeddings[row], text_of[int(pairs.caption_keys[row])])
        assert torch.equal(pairs.image_embeddings[row], image_of[int(pairs.image_keys[row])])
    module._total(terms).backward()
    assert tiny_network.edje.itm_head.weight.grad is not None
    with pytest.raises(ValueError, match="temperature must be > 0"):
        FirstStageTeacher(temperature=0)


def test_a_nan_loss_stops_with_the_step_and_the_term(tiny_network, tiny_processor, monkeypatch):
    module = EDJETrainingModule(tiny_network)
    monkeypatch.setattr(
        tiny_network, "text_embedding", lambda ids, mask: torch.full((len(ids), 8), float("nan"))
    )
    terms, _ = module._losses(synthetic_batch(tiny_processor), train=True)
    with pytest.raises(FloatingPointError, match="the text_recovery loss is nan at step 0"):
        module._total(terms)


def test_batches_of_one_image_are_refused_in_training_and_skipped_in_validation(
    tiny_network, tiny_processor
):
    batch = synthetic_batch(tiny_processor, size=3)
    batch["image_key"][:] = batch["image_key"][0]
    module = EDJETrainingModule(tiny_network)
    with pytest.raises(ValueError, match="at least two distinct images"):
        module._losses(batch, train=True)
    assert module._losses(batch, train=False) is None


def test_same_caption_text_is_never_a_negative(tiny_network, tiny_processor):
    """Two images captioned identically: neither may be the other's negative."""
    batch = synthetic_batch(tiny_processor, size=3)
    batch["caption_key"][1] = batch["caption_key"][0]
    # Make image 1 the most similar to caption 0, and caption 1 the most similar to image 0.
    batch["text_embedding"] = torch.eye(3, 8)
    batch["image_embedding"] = torch.eye(3, 8)[[1, 0, 2]]
    module = EDJETrainingModule(tiny_network)
    everyone = module._gather(batch)
    same = (batch["image_key"][:, None] == everyone["image_key"][None]) | (
        batch["caption_key"][:, None] == everyone["caption_key"][None]
    )
    neg_image, neg_caption = module._mine(batch, everyone, same, torch.Generator())
    assert neg_image.tolist()[:2] == [2, 2] and neg_caption.tolist()[:2] == [2, 2]


def test_unknown_negative_strategy_is_refused_at_construction(tiny_network):
    with pytest.raises(ValueError, match="negative mix"):
        EDJETrainingModule(tiny_network, negatives={"semi-hard": 1.0})


def test_mlm_joins_the_loss_at_its_start_step(tiny_network, tiny_processor, monkeypatch):
    module = EDJETrainingModule(tiny_network, text_recovery_weight=0, mlm_start_step=3)
    batch = synthetic_batch(tiny_processor)
    for step, expected in ((0, {"itm"}), (2, {"itm"}), (3, {"itm", "mlm"}), (9, {"itm", "mlm"})):
        monkeypatch.setattr(EDJETrainingModule, "global_step", property(lambda self, s=step: s))
        assert set(module._losses(batch, train=True)[0]) == expected, step
    with pytest.raises(ValueError, match="mlm_start_step must be >= 0, got -1"):
        EDJETrainingModule(tiny_network, mlm_start_step=-1)


def test_a_saved_model_with_a_config_for_new_models_is_refused(tiny_processor, tmp_path):
    """A recipe's `config` shapes models built from backbones; warm-started from a saved model it
    would silently not apply (its stored tokens stay the saved model's)."""
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    EDJEModel(config).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"a given or saved model keeps its own.*config null"):
        EDJEForPreTraining(pretrained=str(tmp_path / "saved"), config={"num_image_tokens": 8})


def test_training_from_a_saved_model_starts_with_dropout_active(tiny_processor, tmp_path):
    """`from_pretrained` returns eval mode; a network built from it starts in train mode (so
    Lightning's summary counts it training), and training uses dropout from the first step even
    when the network was put in eval mode before `fit`, while a frozen teacher stays in eval
    mode."""
    from lightning.pytorch import Callback, Trainer

    torch.manual_seed(0)
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    EDJEModel(config).save_pretrained(tmp_path / "saved")
    network = EDJEForPreTraining(pretrained=str(tmp_path / "saved"), text_embedding_dim=8)
    assert not EDJEModel.from_pretrained(tmp_path / "saved").training  # as transformers loads
    assert network.training and network.edje.training
    network.eval()  # as after an evaluation run before fitting
    teacher = EDJETeacher(EDJEModel(config))
    modes = {}

    class RecordModes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                dropouts = [m for m in network.modules() if isinstance(m, torch.nn.Dropout)]
                modes["network"] = [m.training for m in dropouts]
                modes["teacher"] = [m.training for m in teacher.modules()]

    module = EDJETrainingModule(network, teacher=teacher, mlm_weight=0)
    trainer = Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordModes()],
    )  # fmt: skip
    batches = torch.utils.data.DataLoader(
        [synthetic_batch(tiny_processor)], batch_size=None, collate_fn=lambda b: b
    )
    trainer.fit(module, train_dataloaders=batches)
    assert modes["network"] and all(modes["network"]), modes["network"]
    assert not any(modes["teacher"])


def test_text_recovery_reads_the_captions_cropped_to_the_longest_and_gives_the_same_embedding(
    tiny_network, tiny_processor
):
    """Batches pad to the maximum length; the text-only pass reads only the longest caption's
    columns (the cost of the padding) and gives what the padded pass would."""
    tiny_network.eval()  # no dropout: the two passes compare
    batch = synthetic_batch(tiny_processor)
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    longest = int(mask.sum(dim=1).max())
    padded_ids = torch.nn.functional.pad(ids, (0, 20), value=tiny_processor.tokenizer.pad_token_id)
    padded_mask = torch.nn.functional.pad(mask, (0, 20))
    widths = []
    hook = tiny_network.edje.joint_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        padded = tiny_network.text_embedding(padded_ids, padded_mask)
        full = tiny_network.edje.joint_encoder(
            input_ids=padded_ids,
            attention_mask=padded_mask,
            token_type_ids=torch.zeros_like(padded_ids),
        ).last_hidden_state[:, 0]
    hook.remove()
    assert widths[0] == longest < padded_ids.shape[1]
    torch.testing.assert_close(padded, tiny_network.text_embedding_head(full), atol=1e-5, rtol=1e-5)
