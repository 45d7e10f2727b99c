"""bench/confusions.py counts what it says: oracles with known blind spots give known shares."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch

from edje.data.builtin import MIRROR, make_builtin_scenes
from tests.helpers.paths import ROOT

BENCH = ROOT / "bench" / "confusions.py"
spec = importlib.util.spec_from_file_location("bench_confusions", BENCH)
confusions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(confusions)


class Oracle:
    """Scores 1 where the caption describes the image (as `describes` sees it), else 0. The
    'image tokens' are row numbers into the scenes; the processor passes them through."""

    def __init__(self, scenes, describes):
        self.scenes, self.describes = scenes, describes

    def compress(self, rows):
        return rows

    def __call__(self, text, image_tokens):
        logits = [
            float(self.describes(c, self.scenes[int(r)]))
            for c, r in zip(text, image_tokens, strict=True)
        ]
        return SimpleNamespace(logits=torch.tensor(logits))


def accuracy(describes):
    scenes = make_builtin_scenes(
        seed=0, n_train_triplets=1, n_train_single=1, n_val_triplets=1, n_test_triplets=4
    )["test"]
    rows = {scene.image_id: float(n) for n, scene in enumerate(scenes)}
    store = SimpleNamespace(gather=lambda ids, dtype: torch.tensor([rows[i] for i in ids]))
    processor = lambda text, image_tokens: {"text": text, "image_tokens": image_tokens}  # noqa: E731
    return confusions.confusion_accuracy(Oracle(scenes, describes), processor, store, scenes)


def blind_to_relations(caption: str) -> str:
    for relation in MIRROR:
        caption = caption.replace(f" {relation} ", " REL ")
    return (
        caption.replace(" to the REL ", " REL ")
        .replace(" over ", " REL ")
        .replace(" under ", " REL ")
    )


def test_a_perfect_scorer_resolves_every_confusion():
    assert accuracy(lambda caption, scene: caption in scene.captions) == {
        "swap": 1.0,
        "mirror": 1.0,
        "swap_and_mirror": 1.0,
    }


def test_a_scorer_blind_to_left_and_right_fails_only_the_mirror():
    def describes(caption, scene):
        return blind_to_relations(caption) in {blind_to_relations(c) for c in scene.captions}

    # A tie with the mirror counts against the caption: mirror 0, the rest resolved by colour.
    assert accuracy(describes) == {"swap": 1.0, "mirror": 0.0, "swap_and_mirror": 1.0}


def detectives() -> dict[str, str]:
    """The 18 detectives (3 genders x 6 skin tones) by image id -> caption."""
    import emoji

    from edje.data.emoji import emoji_info

    chars = [
        c
        for c, data in emoji.EMOJI_DATA.items()
        if data["en"].startswith((":detective", ":man_detective", ":woman_detective"))
        and data["status"] == emoji.STATUS["fully_qualified"]
    ]
    return {emoji_info(c).image_id: emoji_info(c).caption for c in chars}


def test_emoji_siblings_pair_each_drawing_with_its_other_tones_and_genders():
    captions = detectives()
    pairs = confusions.emoji_siblings(list(captions))
    # 3 genders (none, man, woman) x 5 tones x 4 other tones; man <-> woman at 6 tones.
    assert (len(captions), len(pairs["skin_tone"]), len(pairs["gender"])) == (18, 60, 12)

    def oracle(blind_to_tones: bool):
        def strip(caption: str) -> str:
            return caption.split(" with ")[0] if blind_to_tones else caption

        def score(caption, pair):
            return torch.tensor([float(strip(caption) == strip(captions[i])) for i in pair])

        return score

    perfect = confusions.sibling_accuracy(oracle(False), captions, pairs)
    assert (perfect["skin_tone"], perfect["gender"]) == (1.0, 1.0)
    tone_blind = confusions.sibling_accuracy(oracle(True), captions, pairs)
    assert (tone_blind["skin_tone"], tone_blind["gender"]) == (0.0, 1.0)  # ties count against
