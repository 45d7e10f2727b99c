"""The authors' caption cleaning (`clean_caption`): the rule, where it is recorded, and every
door that reads captions applying the model's setting."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from edje import EDJEConfig, EDJEModel, clean_caption
from tests.helpers.tiny import make_tiny_config

RAW = "Two young Guys with shaggy_hair look at their hands ."
CLEAN = "two young guys with shaggy hair look at their hands"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (RAW, CLEAN),  # a Flickr30k caption: capitalised, " ." at the end
        ("A man's dog &amp; its ball!", "a mans dog its ball"),  # entities decoded, then dropped
        ("  Several\tmen  in hard-hats\n", "several men in hardhats"),
        ("\u201cQuoted\u201d words, \u2018here\u2019", "quoted words here"),
        ("caf\u00e9 au lait", "caf\u00e9 au lait"),  # letters beyond ASCII stay
    ],
)
def test_clean_caption_follows_the_authors_rule(raw, clean):
    assert clean_caption(raw) == clean
    assert clean_caption(clean) == clean  # cleaning twice changes nothing


def test_the_config_records_the_rule_off_by_default(tmp_path):
    assert EDJEConfig().normalize_captions is False
    EDJEConfig(normalize_captions=True).save_pretrained(tmp_path)
    assert EDJEConfig.from_pretrained(tmp_path).normalize_captions is True
    with pytest.raises(ValueError, match="normalize_captions must be a bool, got 'yes'"):
        EDJEConfig(normalize_captions="yes")


def test_a_cleaning_processor_tokenizes_raw_captions_as_clean_ones(tiny_processor, tmp_path):
    cleaning = copy.deepcopy(tiny_processor)
    cleaning.normalize_captions = True
    raw, clean = cleaning.tokenize_pairs([RAW]), cleaning.tokenize_pairs([CLEAN])
    assert torch.equal(raw["input_ids"], clean["input_ids"])
    kept = tiny_processor.tokenize_pairs([RAW])  # the package's own models: off
    assert kept["input_ids"].shape != clean["input_ids"].shape
    cleaning.save_pretrained(tmp_path)
    assert type(cleaning).from_pretrained(tmp_path).normalize_captions is True


def test_every_scorer_refuses_a_processor_that_cleans_otherwise(tiny_processor):
    from edje.scoring import make_scorer

    config = make_tiny_config(
        len(tiny_processor.tokenizer), tiny_processor.image_token_id, normalize_captions=True
    )
    for backend in ("torch", "fast"):
        with pytest.raises(ValueError, match="normalize_captions=True but its processor"):
            make_scorer(EDJEModel(config), tiny_processor, backend)


class SpyEmbedding(torch.nn.Module):
    """A first stage that records the texts it is given."""

    embedding_dim, name = 4, "spy"

    def __init__(self):
        super().__init__()
        self.texts = []

    def encode_texts(self, texts, batch_size=256, show_progress_bar=None):
        self.texts += list(texts)
        return torch.nn.functional.normalize(torch.randn(len(texts), 4), dim=-1)

    def encode_images(self, images, batch_size=64, show_progress_bar=None):
        return torch.nn.functional.normalize(torch.randn(len(images), 4), dim=-1)


def test_evaluation_gives_both_stages_the_cleaned_captions(tiny_processor, tiny_vision_encoder):
    from PIL import Image

    from edje.evaluation import evaluate

    dataset = Dataset.from_dict({
        "image": [Image.new("RGB", (28, 28), c) for c in ("red", "blue", "green")],
        "image_id": ["a", "b", "c"],
        "captions": [[RAW], ["A Blue, blue square ."], ["GREEN!"]],
    })  # fmt: skip
    processor = copy.deepcopy(tiny_processor)
    processor.normalize_captions = True
    config = make_tiny_config(
        len(processor.tokenizer), processor.image_token_id, normalize_captions=True
    )
    model = EDJEModel(config, vision_encoder=tiny_vision_encoder).eval()
    first_stage, scored = SpyEmbedding(), []
    original = processor.tokenize_captions
    processor.tokenize_captions = lambda captions, **kw: (
        scored.extend(captions) or original(captions, **kw)
    )
    evaluate(dataset, first_stage, model, processor, k=2, ks=(1,), device="cpu",
             backend="torch", show_progress_bar=False)  # fmt: skip
    assert first_stage.texts == [CLEAN, "a blue blue square", "green"]
    assert set(scored) == {CLEAN, "a blue blue square", "green"}


def test_training_data_reads_captions_as_the_network_does(tiny_processor):
    from edje.training import EDJEDataModule, EDJEForPreTraining, EDJETrainingModule

    config = make_tiny_config(
        len(tiny_processor.tokenizer), tiny_processor.image_token_id, normalize_captions=True
    )
    module = EDJETrainingModule(EDJEForPreTraining(EDJEModel(config)))
    assert module.backbones["normalize_captions"] is True
    split = Dataset.from_dict({"image_id": ["a"], "captions": [[RAW, "GREEN!"]]})
    linked = EDJEDataModule(backbones=module.backbones)
    assert linked.captions_of(split)[0] == [CLEAN, "green"]
    assert EDJEDataModule().captions_of(split)[0] == [RAW, "GREEN!"]  # off unless set
    with pytest.raises(ValueError, match="normalize_captions=False but the network"):
        EDJEDataModule(backbones=module.backbones, normalize_captions=False)


def test_fast_and_torch_scorers_score_a_raw_caption_as_its_cleaned_text(tiny_processor):
    from edje.scoring import make_scorer

    processor = copy.deepcopy(tiny_processor)
    processor.normalize_captions = True
    config = make_tiny_config(
        len(processor.tokenizer), processor.image_token_id, normalize_captions=True
    )
    torch.manual_seed(0)
    model, tokens = EDJEModel(config).eval(), torch.randn(2, 4, 32)
    for backend in ("torch", "fast"):
        scorer = make_scorer(model, processor, backend, device="cpu")
        raw = scorer.score_pairs([RAW, RAW], tokens)
        assert torch.allclose(raw, scorer.score_pairs([CLEAN, CLEAN], tokens), atol=1e-6)
