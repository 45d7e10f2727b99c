"""The emoji set: what is kept, readable captions, the compositional hold-out, slices, errors."""

from __future__ import annotations

import sys

import emoji
import numpy as np
import pytest
from fontTools.ttLib import TTFont

from edje.data.emoji import FONT_ENV, emoji_info, emoji_slices, find_emoji_font, load_emoji
from edje.data.schema import SCHEMA

SPLITS = ("train", "validation", "test")
FULLY_QUALIFIED = [
    char
    for char, data in emoji.EMOJI_DATA.items()
    if data["status"] == emoji.STATUS["fully_qualified"]
]


@pytest.fixture(scope="module")
def ds():
    return load_emoji()  # the real font; about 15 s


@pytest.fixture(scope="module")
def infos(ds):
    return {split: [emoji_info(i) for i in ds[split]["image_id"]] for split in SPLITS}


def kept_ids(ds) -> set[str]:
    return {image_id for split in SPLITS for image_id in ds[split]["image_id"]}


def test_splits_sum_to_the_kept_emoji_and_ids_are_unique(ds):
    ids = [image_id for split in SPLITS for image_id in ds[split]["image_id"]]
    assert len(ids) == len(set(ids)) == sum(len(ds[split]) for split in SPLITS)
    assert set(ds) == set(SPLITS)
    assert kept_ids(ds) <= {emoji_info(char).image_id for char in FULLY_QUALIFIED}


def test_kept_are_exactly_the_fully_qualified_emoji_the_font_has_a_glyph_for(ds):
    kept = kept_ids(ds)
    # One code point (with or without its variation selector): kept iff the font's cmap has it.
    cmap = TTFont(find_emoji_font(), lazy=True).getBestCmap()
    single = [char for char in FULLY_QUALIFIED if len(char.replace("\ufe0f", "")) == 1]
    assert len(single) > 1000
    assert [c for c in single if (ord(c[0]) in cmap) != (emoji_info(c).image_id in kept)] == []
    # Sequences: everything of Emoji 15.1 and before is drawn by Debian 12's font (2.042) ...
    old = [c for c in FULLY_QUALIFIED if emoji.EMOJI_DATA[c]["E"] <= 15.1]
    assert {emoji_info(c).image_id for c in old} <= kept
    # ... while what it lacks falls apart into several glyphs or becomes its "unknown flag".
    sark, bunny_ears_two_tones = "\U0001f1e8\U0001f1f6", "👨🏻\u200d🐰\u200d👨🏼"
    assert emoji_info(sark).image_id not in kept
    assert emoji_info(bunny_ears_two_tones).image_id not in kept


def test_two_loads_give_the_same_ids_per_split_at_any_image_size(ds):
    again = load_emoji(image_size=32)
    for split in SPLITS:
        assert list(again[split]["image_id"]) == list(ds[split]["image_id"])
        assert again[split][0]["image"].size == (32, 32)


def test_held_out_concepts_have_no_train_image(infos):
    train_concepts = {info.concept for info in infos["train"]}
    held = {split: {i.concept for i in infos[split]} - train_concepts for split in SPLITS[1:]}
    assert len(held["test"]) > 100 and len(held["validation"]) > 50
    assert not held["test"] & held["validation"]
    # Held out with all their variants: some held-out test concepts come in several skin tones.
    toned = {i.concept for i in infos["test"] if i.concept in held["test"] and i.tones}
    assert len(toned) > 5


def test_held_out_triples_are_unseen_though_each_pair_is_seen(infos):
    train = infos["train"]
    seen = {
        "triple": {(i.concept, i.gender, i.tones) for i in train},
        "concept-gender": {(i.concept, i.gender) for i in train},
        "concept-tones": {(i.concept, i.tones) for i in train},
        "gender-tones": {(i.gender, i.tones) for i in train},
    }
    train_concepts = {i.concept for i in train}
    triples = {}
    for split in SPLITS[1:]:
        triples[split] = {
            (i.concept, i.gender, i.tones) for i in infos[split] if i.concept in train_concepts
        }
        assert len(triples[split]) > 50
        for concept, gender, tones in triples[split]:
            assert gender is not None and tones
            assert (concept, gender, tones) not in seen["triple"]
            assert (concept, gender) in seen["concept-gender"]
            assert (concept, tones) in seen["concept-tones"]
            assert (gender, tones) in seen["gender-tones"]
    assert not triples["test"] & triples["validation"]


def test_captions_are_readable():
    captions = {
        "🕵🏾\u200d♀️": "a woman detective with medium-dark skin",
        "👨\u200d🍼": "a man feeding baby",
        "\U0001f1f0\U0001f1fc": "the flag of kuwait",
        "👱🏽\u200d♀️": "a woman with medium skin and blond hair",
        "🧑\u200d🦲": "a person with a bald head",
        "👨\u200d👩\u200d👦": "a family of a man, a woman and a boy",
        "👩🏻\u200d❤️\u200d💋\u200d👨🏿": "a kiss of a woman and a man with light and dark skin",
        "🏃🏽\u200d♀️\u200d➡️": "a woman running facing right with medium skin",
        "🥢": "chopsticks",
        "🦄": "a unicorn",
    }
    assert {char: emoji_info(char).caption for char in captions} == captions


def test_every_caption_is_lower_case_without_colons_or_underscores_and_unique(ds):
    captions = [c for split in SPLITS for row in ds[split]["captions"] for c in row]
    assert len(captions) == len(set(captions)) == len(kept_ids(ds))
    assert all(c == c.lower() and ":" not in c and "_" not in c and c.strip() for c in captions)


def test_images_are_non_blank_rgb_at_112_px_on_white(ds):
    assert ds["test"].features == SCHEMA
    for split in SPLITS:
        for image in ds[split].select(range(0, len(ds[split]), 10))["image"]:
            pixels = np.asarray(image)
            assert image.mode == "RGB" and image.size == (112, 112)
            assert pixels.min() < 200  # something is drawn ...
            assert (pixels[0, 0] == 255).all()  # ... on white (the corners stay clear)


def test_slices_are_small_with_all_splits_and_disjoint_concepts(ds):
    slices = emoji_slices(ds, n_slices=4, max_images=1000)
    concepts = []
    for piece in slices:
        assert 500 < sum(len(piece[split]) for split in SPLITS) <= 1000
        assert all(len(piece[split]) > 0 for split in SPLITS)
        concepts.append({emoji_info(i).concept for s in SPLITS for i in piece[s]["image_id"]})
    assert sum(len(c) for c in concepts) == len(set().union(*concepts))
    test_ids = set(slices[0]["test"]["image_id"])
    assert test_ids <= set(ds["test"]["image_id"])  # the hold-out survives the cut


def test_missing_font_names_the_debian_package(monkeypatch, tmp_path):
    missing = tmp_path / "NoSuchEmoji.ttf"
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        load_emoji(font_path=missing)
    monkeypatch.setenv(FONT_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=FONT_ENV):
        find_emoji_font()


def test_missing_emoji_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "emoji", None)  # what `import emoji` sees when absent
    with pytest.raises(ImportError, match="pip install emoji"):
        emoji_info("🦄")
