"""bench/emoji_sets.py's EmojiOne and held-out sources: readable captions, skin-tone variants
kept in one split, the custom-data layout `edje.data.load_data` reads, and a clear error without
the package or the corpus."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from edje.data import load_data
from tests.helpers.paths import ROOT

BENCH = ROOT / "bench" / "emoji_sets.py"
spec = importlib.util.spec_from_file_location("bench_emoji_sets", BENCH)
emoji_sets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(emoji_sets)


def test_emojione_names_become_captions_with_the_skin_tone_spelled_out():
    assert emoji_sets.emojione_caption("man with turban tone 3") == (
        "man with turban, medium skin tone"
    )
    assert emoji_sets.emojione_caption("face with ok gesture tone5") == (
        "face with ok gesture, dark skin tone"
    )
    assert emoji_sets.emojione_caption("billiards") == "billiards"


def test_a_drawing_and_its_skin_tone_variants_share_a_split():
    codes = ["1F473"] + [f"1F473-1F3F{t}" for t in "BCDEF"]
    assert len({emoji_sets.emojione_split(code) for code in codes}) == 1
    splits = {emoji_sets.emojione_split(f"1F{n:03X}") for n in range(300, 500)}
    assert splits == {"train", "validation", "test"}


def fake_gemojione(root: Path) -> Path:
    """A gemojione-* folder: config/index.json and assets/png, a few drawings per category."""
    index = {}
    for n, category in enumerate(["people", "food", "flags"] * 20):
        code = f"1F{300 + n:03X}"
        index[code] = {"unicode": code.lower(), "name": f"thing {n}", "category": category}
        if category == "people":  # two skin-tone variants
            for t in "BC":
                index[f"{code}-1F3F{t}"] = {
                    "unicode": f"{code}-1F3F{t}".lower(),
                    "name": f"thing {n} tone {' BC'.index(t)}",
                    "category": category,
                }
    (root / "assets" / "png").mkdir(parents=True)
    (root / "config").mkdir()
    (root / "config" / "index.json").write_text(json.dumps(index))
    for entry in index.values():
        Image.new("RGBA", (64, 64), (200, 30, 30, 255)).save(
            root / "assets" / "png" / f"{entry['unicode'].upper()}.png"
        )
    return root


def test_emojione_sets_are_written_in_the_layout_fit_and_eval_read(tmp_path):
    emoji_sets.write_emojione(tmp_path / "sets", str(fake_gemojione(tmp_path / "gemojione-3.3.0")))
    people = load_data(str(tmp_path / "sets" / "people"))
    assert sum(len(people[s]) for s in people) == 60  # 20 drawings and 2 skin-tone variants of each
    captions = {c for s in people for row in people[s]["captions"] for c in row}
    assert "thing 0, light skin tone" in captions
    splits_of = {}  # each drawing's base code point -> the splits its images are in
    for metadata in (tmp_path / "sets" / "people").glob("*/metadata.jsonl"):
        for line in metadata.read_text().splitlines():
            base = json.loads(line)["file_name"].removesuffix(".png").split("-")[0]
            splits_of.setdefault(base, set()).add(metadata.parent.name)
    assert len(splits_of) == 20 and all(len(s) == 1 for s in splits_of.values())
    for name in ("things", "signs"):
        assert sum(len(split) for split in load_data(str(tmp_path / "sets" / name)).values()) == 20


def test_a_missing_emojione_package_names_the_debian_package(tmp_path):
    with pytest.raises(SystemExit, match="ruby-gemojione"):
        emoji_sets.write_emojione(tmp_path / "sets", str(tmp_path / "nowhere"))


def test_a_held_out_style_drawing_and_its_skin_tones_share_a_split():
    captions = ["a woman pilot", "a woman pilot with dark skin",
                "a kiss of a man and a man with medium-light and dark skin"]  # fmt: skip
    assert [emoji_sets.SKIN.sub("", c) for c in captions] == [
        "a woman pilot", "a woman pilot", "a kiss of a man and a man"
    ]  # fmt: skip
    assert len({emoji_sets.heldout_split(c) for c in captions[:2]}) == 1
    splits = {emoji_sets.heldout_split(f"thing {n} with dark skin") for n in range(100)}
    assert splits == {"train", "validation", "test"}


def test_the_corpus_held_out_sets_are_written_whole_in_the_custom_layout(icon_corpus, tmp_path):
    corpus, manifest = icon_corpus
    emoji_sets.write_heldout(tmp_path / "sets", corpus)
    for name, heldout in emoji_sets.HELDOUT_SETS.items():
        written = [
            json.loads(line)
            for metadata in (tmp_path / "sets" / name).glob("*/metadata.jsonl")
            for line in metadata.read_text().splitlines()
            if emoji_sets.heldout_split(json.loads(line)["caption"]) == metadata.parent.name
        ]  # only rows in their concept's split count
        source = (corpus / heldout / "test" / "metadata.jsonl").read_text().splitlines()
        assert len(written) == manifest["eval_sets"][heldout] == len(source), name
        assert {r["caption"] for r in written} == {json.loads(r)["caption"] for r in source}
    with pytest.raises(SystemExit, match="edje data build icons"):
        emoji_sets.write_heldout(tmp_path / "more", tmp_path / "nowhere")
