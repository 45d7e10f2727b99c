"""BLIP's ITM head as a teacher (tiny random BLIP, real transformers classes) and its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

from edje.training.teachers import BlipITMTeacher, ScoreCache, TeacherPairs

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory, minilm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-blip")
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(TINY, vocab_size=len(minilm_tokenizer) + 2),
        vision_config=dict(TINY, image_size=32, patch_size=16),
        image_text_hidden_size=16,
    )
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=minilm_tokenizer,
    ).save_pretrained(folder)
    return folder


IMAGES = {
    10: Image.fromarray(np.full((40, 40, 3), 30, dtype=np.uint8)),
    11: Image.fromarray(np.full((40, 40, 3), 220, dtype=np.uint8)),
}
CAPTIONS = {20: "a dark square", 21: "a bright square"}


def pairs(image_keys, caption_keys) -> TeacherPairs:
    n = len(image_keys)
    return TeacherPairs(
        caption_ids=torch.zeros(n, 4, dtype=torch.long),
        caption_mask=torch.ones(n, 4, dtype=torch.long),
        vision_tokens=torch.zeros(n, 1, 1),
        image_keys=torch.tensor(image_keys),
        caption_keys=torch.tensor(caption_keys),
    )


def bound(teacher: BlipITMTeacher) -> BlipITMTeacher:
    teacher.bind_data(
        lambda keys: [IMAGES[k] for k in keys], lambda keys: [CAPTIONS[k] for k in keys]
    )
    return teacher


def test_blip_teacher_logit_is_the_itm_match_probability(tiny_blip):
    teacher = bound(BlipITMTeacher(str(tiny_blip)))
    logits = teacher.score(pairs([10, 11, 10], [20, 20, 21]))
    model = BlipForImageTextRetrieval.from_pretrained(tiny_blip).eval()
    processor = BlipProcessor.from_pretrained(tiny_blip)
    inputs = processor(
        images=[IMAGES[10], IMAGES[11], IMAGES[10]],
        text=[CAPTIONS[20], CAPTIONS[20], CAPTIONS[21]],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        probability = model(**inputs, use_itm_head=True).itm_score.softmax(-1)[:, 1]
    torch.testing.assert_close(torch.sigmoid(logits), probability, rtol=1e-4, atol=1e-5)


def test_each_pair_runs_through_blip_once_and_the_cache_survives(tiny_blip, tmp_path, monkeypatch):
    cache = tmp_path / "teacher.sqlite"
    teacher = bound(BlipITMTeacher(str(tiny_blip), cache_path=str(cache)))
    calls = []
    original = BlipITMTeacher.blip_logits

    def counting(self, image_keys, caption_keys):
        calls.append(len(image_keys))
        return original(self, image_keys, caption_keys)

    monkeypatch.setattr(BlipITMTeacher, "blip_logits", counting)
    first = teacher.score(pairs([10, 11, 10], [20, 20, 20]))  # a repeated pair
    assert calls == [2]
    again = teacher.score(pairs([11, 10], [20, 20]))
    assert calls == [2] and torch.equal(again, first[[1, 0]])
    # A new run (epoch 2, or a restart) reads the scores from disk.
    fresh = bound(BlipITMTeacher(str(tiny_blip), cache_path=str(cache)))
    assert torch.equal(fresh.score(pairs([10, 11], [20, 20])), first[:2])
    assert calls == [2]


def test_unbound_blip_teacher_says_what_it_needs(tiny_blip):
    with pytest.raises(RuntimeError, match="needs pixels and caption text"):
        BlipITMTeacher(str(tiny_blip)).score(pairs([10], [20]))


def test_score_cache_refuses_non_finite_logits(tmp_path):
    cache = ScoreCache(tmp_path / "c.sqlite")
    cache.put([(1, 2)], [0.5])
    with pytest.raises(ValueError, match="finite"):
        cache.put([(3, 4)], [float("nan")])
    assert len(cache) == 1 and cache.get([(1, 2)]) == [0.5]
