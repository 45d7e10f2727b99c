"""The icon corpus of tests/fixtures/icons (a few real icons of twelve iconify sets with their
licences, and the side packages' entries for them), as a source and as a built corpus."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.paths import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "icons"


def fixture_icon_source():
    """The fixture's packages, with the emoji set's real hold-out (needs the Noto font)."""
    from edje.data.emoji import emoji_hold_out
    from edje.data.icons import IconSource

    hold = emoji_hold_out()
    return IconSource(
        iconify=FIXTURE / "iconify",
        emojibase=FIXTURE / "emojibase",
        mdi=FIXTURE / "mdi",
        phosphor=FIXTURE / "phosphor",
        held_concepts=hold.concepts,
        held_triples=hold.triples,
    )


def build_fixture_corpus(out: Path, source=None) -> dict:
    """`edje data build icons` on the fixture into `out`; returns its manifest."""
    from edje.data.icon_shards import build_icon_corpus

    source = source if source is not None else fixture_icon_source()
    return build_icon_corpus(out, source=source, shard_size=4, workers=1, show_progress=False)
