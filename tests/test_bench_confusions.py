"""bench/confusions.py counts what it says: oracles with known blind spots give known shares."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

from edje.data.builtin import MIRROR, make_builtin_scenes

BENCH = Path(__file__).resolve().parents[1] / "bench" / "confusions.py"
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
