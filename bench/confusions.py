"""Which confusions an EDJE resolves: on the built-in set colour swap, mirror, or both; on the
emoji set skin tone and gender.

Every first-stage error on the built-in set is a scene's colour-swapped or mirrored sibling
(`edje.data.builtin`). For each caption of each triplet this scores the caption against the
three sibling images and reports how often its own image wins against each kind of sibling;
0.5 is chance. Colour alone tells the swapped image's captions from both its siblings, while
the scene's and the mirror's captions each need left/right against the other: with `swap`
solved and `mirror` at 0.5, T2I R@1 is capped near 67.

    python bench/confusions.py --model outputs/quickstart/model \\
        --store outputs/quickstart/raw.store --split test

On the emoji set (`--data emoji`) the siblings of an emoji are the drawings of its concept that
differ from it in skin tone alone ("a woman detective with medium-dark skin" against the light
one) or in gender alone (against "a man detective with medium-dark skin"); for each caption
and each such sibling it reports how often the caption's own drawing wins. `--first-stage`
adds the same shares for the first stage's cosine similarities, and `top1`: T2I R@1 of the
first stage and of EDJE on captions of concepts train holds and of held-out concepts, and
whether EDJE's wrong top-1 picks (own image in the top 10) are siblings or other concepts.
"""

from __future__ import annotations

import argparse
import json

import torch

from edje import EDJEModel, EDJEProcessor
from edje.data import load_emoji
from edje.data.builtin import make_builtin_scenes
from edje.data.emoji import emoji_info
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


def emoji_siblings(image_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(own, sibling) image-id pairs of each kind: same concept and gender, other skin tone;
    same concept and skin tone, other gender."""
    infos = {i: emoji_info(i) for i in image_ids}
    groups: dict[str, list[str]] = {}
    for image_id, info in infos.items():
        groups.setdefault(info.concept, []).append(image_id)
    pairs: dict[str, list[tuple[str, str]]] = {"skin_tone": [], "gender": []}
    for members in groups.values():
        for own in members:
            for other in members:
                a, b = infos[own], infos[other]
                if own == other or a.caption == b.caption:
                    continue
                if a.gender == b.gender and a.tones and b.tones and a.tones != b.tones:
                    pairs["skin_tone"].append((own, other))
                elif a.tones == b.tones and a.gender and b.gender and a.gender != b.gender:
                    pairs["gender"].append((own, other))
    return pairs


@torch.no_grad()
def sibling_accuracy(score, captions: dict[str, str], pairs) -> dict[str, float]:
    """Per kind, the share of (own, sibling) pairs where `score(caption, [own, sibling])`
    ranks the caption's own image first (ties count against it)."""
    result = {}
    for kind, kind_pairs in pairs.items():
        wins = [bool(torch.gt(*score(captions[own], [own, other]))) for own, other in kind_pairs]
        if wins:
            result[kind] = sum(wins) / len(wins)
            result[f"{kind}_pairs"] = len(wins)
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="EDJE folder (raw-token model)")
    parser.add_argument("--store", required=True, help="raw token store of the built-in set")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--seed", type=int, default=0, help="the built-in set's seed")
    parser.add_argument("--data", default="builtin", choices=["builtin", "emoji"])
    parser.add_argument("--first-stage", help="emoji only: also score with this first stage")
    args = parser.parse_args(argv)
    model = EDJEModel.from_pretrained(args.model).eval()
    processor = EDJEProcessor.from_pretrained(args.model)
    store = TokenStore.open(args.store)
    if args.data == "builtin":
        scenes = make_builtin_scenes(seed=args.seed)[args.split]
        result = confusion_accuracy(model, processor, store, scenes)
    else:
        result = emoji_confusions(model, processor, store, args.split, args.first_stage)
    print(json.dumps(result, indent=2))
    return result


def emoji_confusions(model, processor, store, split: str, first_stage=None) -> dict:
    data = load_emoji()
    ids = data[split]["image_id"]
    captions = {i: emoji_info(i).caption for i in ids}
    pairs = emoji_siblings(ids)

    def rerank(caption, pair):
        tokens = model.compress(store.gather(pair, dtype=torch.float32))
        return model(**processor(text=[caption] * 2, image_tokens=tokens)).logits

    result = {"edje": sibling_accuracy(rerank, captions, pairs)}
    if first_stage is not None:
        from edje.first_stage import load_embedding_model

        embedder = load_embedding_model(first_stage)

        def cosine(caption, pair):
            images = embedder.encode_vision_tokens(store.gather(pair, dtype=torch.float32))
            return (embedder.encode_texts([caption]) @ images.T)[0]

        result["first_stage"] = sibling_accuracy(cosine, captions, pairs)
        result["top1"] = top1_by_concept(model, processor, store, data, split, embedder)
    return result


def top1_by_concept(model, processor, store, data, split: str, first_stage) -> dict:
    """T2I R@1 of the first stage and of EDJE (its top 10 reranked) on `data[split]`'s captions
    whose concept `data["train"]` holds and on held-out concepts, and what EDJE's wrong top-1
    picks are."""
    from edje.evaluation import evaluate

    seen = {emoji_info(i).concept for i in data["train"]["image_id"]}
    ids = data[split]["image_id"]
    report = evaluate(data[split], first_stage, model, processor, store, k=10, fusion=None,
                      show_progress_bar=False)  # fmt: skip
    c = report.candidates
    hits = {name: {"first_stage": [], "edje": []} for name in ("seen", "held_out")}
    picks = {"another concept": 0, "a sibling": 0}
    for query, candidates in enumerate(c.t2i[:, :10].tolist()):
        own = int(c.text_to_image[query])
        edje_top = candidates[int(c.t2i_rerank[query, :10].argmax())]
        group = hits["seen" if emoji_info(ids[own]).concept in seen else "held_out"]
        group["first_stage"].append(candidates[0] == own)
        group["edje"].append(edje_top == own)
        if edje_top != own and own in candidates:
            same = emoji_info(ids[edje_top]).concept == emoji_info(ids[own]).concept
            picks["a sibling" if same else "another concept"] += 1
    result = {
        f"{name}_{who}_r1": round(100 * sum(h) / max(len(h), 1), 1)
        for name, group in hits.items() for who, h in group.items()
    }  # fmt: skip
    result |= {f"{name}_captions": len(group["edje"]) for name, group in hits.items()}
    return result | {f"edje_wrong_top1_{kind}": n for kind, n in picks.items()}


if __name__ == "__main__":
    main()
