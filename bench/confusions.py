"""Which confusions an EDJE resolves on the built-in set: colour swap, mirror, or both.

Every first-stage error on the built-in set is a scene's colour-swapped or mirrored sibling
(`edje.data.builtin`). For each caption of each triplet this scores the caption against the
three sibling images and reports how often its own image wins against each kind of sibling;
0.5 is chance. Colour alone tells the swapped image's captions from both its siblings, while
the scene's and the mirror's captions each need left/right against the other: with `swap`
solved and `mirror` at 0.5, T2I R@1 is capped near 67.

    python bench/confusions.py --model outputs/quickstart/model \\
        --store outputs/quickstart/raw.store --split test
"""

from __future__ import annotations

import argparse
import json

import torch

from edje import EDJEModel, EDJEProcessor
from edje.data.builtin import make_builtin_scenes
from edje.store import TokenStore

SIBLINGS = ("scene", "swap", "mirror")
KIND = {  # what tells each pair of siblings apart
    frozenset(("scene", "swap")): "swap",
    frozenset(("scene", "mirror")): "mirror",
    frozenset(("swap", "mirror")): "swap_and_mirror",
}


@torch.no_grad()
def confusion_accuracy(model, processor, store, scenes) -> dict[str, float]:
    """Per kind of sibling, the share of (caption, other sibling) where the caption's own
    image scores higher (ties count against it)."""
    triplets: dict[str, dict[str, object]] = {}
    for scene in scenes:
        prefix, _, role = scene.image_id.rpartition("-")
        if role in SIBLINGS:
            triplets.setdefault(prefix, {})[role] = scene
    wins: dict[str, list[bool]] = {kind: [] for kind in KIND.values()}
    for triplet in triplets.values():
        ids = [triplet[role].image_id for role in SIBLINGS]
        tokens = model.compress(store.gather(ids, dtype=torch.float32))
        for own in SIBLINGS:
            for caption in triplet[own].captions:
                inputs = processor(text=[caption] * 3, image_tokens=tokens)
                score = dict(zip(SIBLINGS, model(**inputs).logits.tolist(), strict=True))
                for other in SIBLINGS:
                    if other != own:
                        wins[KIND[frozenset((own, other))]].append(score[own] > score[other])
    return {kind: sum(w) / len(w) for kind, w in wins.items() if w}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="EDJE folder (raw-token model)")
    parser.add_argument("--store", required=True, help="raw token store of the built-in set")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--seed", type=int, default=0, help="the built-in set's seed")
    args = parser.parse_args(argv)
    model = EDJEModel.from_pretrained(args.model).eval()
    processor = EDJEProcessor.from_pretrained(args.model)
    scenes = make_builtin_scenes(seed=args.seed)[args.split]
    result = confusion_accuracy(model, processor, TokenStore.open(args.store), scenes)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
