"""Real drawings with human-written names: Noto Color Emoji and their CLDR names, offline.

The images are Google's Noto Color Emoji (Debian `fonts-noto-color-emoji`, SIL OFL 1.1),
drawn by people; the captions are the Unicode CLDR names that PyPI's `emoji` package (BSD)
carries. Every fully-qualified emoji that the font draws is kept: with Debian 12's font
(2.042) and `emoji` 2.16, 3,788 of the 3,963 (the other 175 are newer than the font: it
draws them as two or three side-by-side glyphs, as nothing, or as its "unknown flag").

Images: each emoji at the font's only size (136 x 128 px), centred on a white 136 x 136
square, resized to `image_size` (default 112, the size the built-in set and the DINOv2-S/14
backbone use). Image ids are the code points, e.g. `"emoji-1f575-1f3fe-200d-2640-fe0f"`.

Captions, one per image, from the CLDR name (which `emoji` spells
`":woman_detective_medium-dark_skin_tone:"`): colons dropped, underscores to spaces, lower
case, curly apostrophes straight, then

- skin tones and hair become a "with" phrase: "woman detective: medium-dark skin tone" ->
  "a woman detective with medium-dark skin"; "woman: medium skin tone, blond hair" -> "a woman
  with medium skin and blond hair" ("bald" -> "a bald head", "beard" -> "a beard"); two tones
  (couples) -> "with light and dark skin";
- "family", "kiss" and "couple with heart" list who is in them: "family: man, woman, boy" ->
  "a family of a man, a woman and a boy";
- flags: "flag: Kuwait" -> "the flag of kuwait";
- everything else gets "a" / "an" unless it reads as a plural ("men wrestling", "chopsticks").

Splits, deterministic for a `seed` (stable sha256 ranks, never Python's `hash`): every
emoji has a *concept* (what is drawn, without gender, skin tone, hair or "facing right":
"detective" for all 18 detectives), a *gender* (the leading "man" / "woman" / "person" /
"men" / ..., or who is in a family or kiss) and its *tones*.

1. Held-out concepts: `validation_concepts` and `test_concepts` (fractions of all
   concepts) go wholly to validation or test: no variant of them is in train.
2. Held-out triples: for every other concept drawn in at least two explicit genders and two
   tones, one (concept, gender, tones) triple goes to test and one to validation, with
   another gender and other tones. Every image of a triple moves with it ("woman running"
   and "woman running facing right" in medium skin go together), and a triple is held out
   only if train keeps the concept with that gender, the concept with those tones, and that
   gender with those tones: each pair is seen, the three together never.

With the defaults (seed 0, 5% and 10% of the 1,693 concepts), train has 3,098 images,
validation 244 (85 concepts, 171 images; 67 triples, 73 images) and test 446 (169 concepts,
373 images; 67 triples, 73 images). Drawing and encoding take 15-20 s on two busy CPU cores,
so nothing is cached.

Example:
    >>> from edje.data.emoji import emoji_info, load_emoji
    >>> ds = load_emoji()  # doctest: +SKIP
    >>> {split: len(ds[split]) for split in ds}  # doctest: +SKIP
    {'train': 3098, 'validation': 244, 'test': 446}
    >>> info = emoji_info("emoji-1f575-1f3fe-200d-2640-fe0f")  # an image id, or the emoji
    >>> info.caption, info.concept, info.gender, info.tones
    ('a woman detective with medium-dark skin', 'detective', 'woman', ('medium-dark',))
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edje.data.schema import make_dataset

__all__ = [
    "FONT_ENV",
    "EmojiHoldOut",
    "EmojiInfo",
    "emoji_hold_out",
    "emoji_info",
    "emoji_slices",
    "find_emoji_font",
    "load_emoji",
]

FONT_ENV = "EDJE_EMOJI_FONT"
DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
_INSTALL_HINT = (
    "install it with `apt-get install fonts-noto-color-emoji` (Debian/Ubuntu), "
    f"or pass font_path= / set ${FONT_ENV} to a NotoColorEmoji.ttf"
)
_STRIKE = 109  # the bitmap font's only size; Pillow draws each emoji 136 x 128 px from it
_BACKGROUND = (255, 255, 255)
# What the font draws for what it lacks: an unassigned code point (tofu), an unknown flag.
_PLACEHOLDERS = ("\U000f0000", "\U0001f1e6\U0001f1e6")

_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
# Trailing attributes of CLDR names, as the emoji package spells them -> caption phrase.
_HAIR = {
    ("red", "hair"): "red hair",
    ("curly", "hair"): "curly hair",
    ("white", "hair"): "white hair",
    ("blond", "hair"): "blond hair",
    ("bald",): "a bald head",
    ("beard",): "a beard",
}
_GENDERS = ("man", "woman", "person", "men", "women", "people")
_GROUPS = ("family", "kiss", "couple with heart")  # "family: man, woman, boy"
_PEOPLE = {"adult", "child", "man", "woman", "boy", "girl", "person"}


@dataclass(frozen=True)
class EmojiInfo:
    """One emoji's CLDR name taken apart (see the module docstring for the rules)."""

    char: str
    name: str  # as the emoji package spells it: ":woman_detective_medium-dark_skin_tone:"
    concept: str  # "detective"
    gender: str | None  # "woman", "men", "woman man" (a kiss), or None
    tones: tuple[str, ...]  # ("medium-dark",); two for couples; () for none
    caption: str  # "a woman detective with medium-dark skin"

    @property
    def image_id(self) -> str:
        """The code points in hex: "emoji-1f575-1f3fe-200d-2640-fe0f"."""
        return "emoji-" + "-".join(f"{ord(c):x}" for c in self.char)


# ---- names ----


def _emoji_package():
    try:
        import emoji
    except ImportError as err:
        raise ImportError(
            "edje.data.emoji needs the emoji package for the CLDR names: "
            "pip install 'edje[offline]' (or pip install emoji)"
        ) from err
    return emoji


def _is_flag(char: str) -> bool:
    """A country flag (two regional indicators) or a subdivision flag (black flag + tags)."""
    regional = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in char)
    tagged = (
        char[0] == "\U0001f3f4"
        and len(char) > 1
        and all(0xE0020 <= ord(c) <= 0xE007F for c in char[1:])
    )
    return regional or tagged


def _peel(words: list[str]) -> tuple[list[str], list[str], list[str], bool]:
    """Split trailing tones, hair ("red hair", "bald") and "facing right" off a name's words."""
    tones, hair, facing_right = [], [], False
    while len(words) > 1:
        if words[-2:] == ["skin", "tone"] and len(words) > 3 and words[-3] in _TONES:
            tones.insert(0, words[-3])
            words = words[:-3]
        elif tuple(words[-2:]) in _HAIR and len(words) > 2:
            hair.insert(0, " ".join(words[-2:]))
            words = words[:-2]
        elif (words[-1],) in _HAIR:
            hair.insert(0, words[-1])
            words = words[:-1]
        elif words[-2:] == ["facing", "right"] and len(words) > 2:
            facing_right = True
            words = words[:-2]
        else:
            break
    return words, tones, hair, facing_right


def _article(phrase: str) -> str:
    """ "a" / "an" before a singular phrase, nothing before a plural one."""
    first, last = phrase.split()[0], phrase.split()[-1]
    plural = first in ("men", "women", "people") or (
        last.endswith("s") and not last.endswith(("ss", "us", "is", "os"))
    )
    if plural:
        return phrase
    vowel = first[0] in "aeiou" and not first.startswith(("uni", "use", "eu", "one"))
    return ("an " if vowel or first.startswith("hour") else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def emoji_info(char_or_image_id: str) -> EmojiInfo:
    """Concept, gender, tones and caption of one fully-qualified emoji (or its image id).

    Example:
        >>> emoji_info("\\U0001f1f0\\U0001f1fc").caption
        'the flag of kuwait'
        >>> emoji_info("\\U0001f468\\u200d\\U0001f469\\u200d\\U0001f466").caption
        'a family of a man, a woman and a boy'
    """
    char = char_or_image_id
    if char.startswith("emoji-"):
        char = "".join(chr(int(h, 16)) for h in char[len("emoji-") :].split("-"))
    data = _emoji_package().EMOJI_DATA.get(char)
    if data is None:
        raise ValueError(
            f"emoji_info: {char_or_image_id!r} is not an emoji the emoji package knows"
        )
    name = data["en"]
    text = name.strip(":").replace("’", "'").lower()
    if _is_flag(char):
        country = text.replace("_", " ")
        return EmojiInfo(char, name, country, None, (), "the flag of " + country)
    words, tones, hair, facing_right = _peel(text.split("_"))
    base, gender, concept = " ".join(words), None, " ".join(words)
    group = next((g for g in _GROUPS if base == g or base.startswith(g + " ")), None)
    people = base[len(group or "") :].split()
    if group is not None and set(people) <= _PEOPLE:  # "family man woman boy": who is the gender
        gender, concept = " ".join(people) or None, group
        members = [_article(p) for p in people]
        base = concept + (" of " + _join(members) if members else "")
    elif words[0] in _GENDERS or words[:3] == ["woman", "and", "man"]:
        n = 3 if words[:3] == ["woman", "and", "man"] else 1
        gender, concept = " ".join(words[:n]), " ".join(words[n:]) or "person"
    if hair:  # "man: red hair" and "woman: medium skin tone, red hair" are both "red hair"
        concept = " ".join([concept, *hair]) if concept != "person" else " ".join(hair)
    caption = _article(base + (" facing right" if facing_right else ""))
    attributes = ([_join(tones) + " skin"] if tones else []) + [
        _HAIR[tuple(h.split())] for h in hair
    ]
    if attributes:
        caption += " with " + _join(attributes)
    return EmojiInfo(char, name, concept, gender, tuple(tones), caption)


# ---- font and pixels ----


def find_emoji_font(font_path: str | os.PathLike | None = None) -> Path:
    """`font_path`, else `$EDJE_EMOJI_FONT`, else Debian's path, else `fc-match`'s answer."""
    given = font_path or os.environ.get(FONT_ENV)
    if given:
        if not Path(given).is_file():
            source = "font_path" if font_path else f"${FONT_ENV}"
            raise FileNotFoundError(
                f"emoji font: {source}={str(given)!r} is not a file; {_INSTALL_HINT}"
            )
        return Path(given)
    if DEFAULT_FONT.is_file():
        return DEFAULT_FONT
    if shutil.which("fc-match"):
        found = subprocess.run(
            ["fc-match", "-f", "%{file}", "Noto Color Emoji"], capture_output=True, text=True
        ).stdout.strip()
        if "NotoColorEmoji" in found and Path(found).is_file():  # fc-match falls back to any font
            return Path(found)
    raise FileNotFoundError(
        f"emoji font: Noto Color Emoji not found at {DEFAULT_FONT}, in ${FONT_ENV} or by "
        f"fc-match; {_INSTALL_HINT}"
    )


def _open_font(path: Path) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(str(path), _STRIKE)
    except OSError as err:  # a bitmap font refuses other sizes; a non-font refuses everything
        raise ValueError(
            f"emoji font: {str(path)!r} is not Noto Color Emoji (expected a colour bitmap font "
            f"with a {_STRIKE} px strike): {err}"
        ) from err


def _draw(char: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """The emoji centred on a white square as wide as a glyph (136 x 136 for 136 x 128)."""
    side = round(font.getlength(_PLACEHOLDERS[0]))
    height = font.getbbox("\U0001f600")[3]
    image = Image.new("RGB", (side, side), _BACKGROUND)
    ImageDraw.Draw(image).text((0, (side - height) // 2), char, font=font, embedded_color=True)
    return image


def _drawn(chars: Iterable[str], font: ImageFont.FreeTypeFont) -> dict[str, Image.Image]:
    """Each emoji the font draws as one real glyph, drawn; the others are left out."""
    one_glyph = font.getlength(_PLACEHOLDERS[0])  # every glyph has the same advance
    placeholders = {_draw(p, font).tobytes() for p in _PLACEHOLDERS}
    drawn = {}
    for char in chars:
        if abs(font.getlength(char) - one_glyph) > 1:  # fell apart into several glyphs
            continue
        image = _draw(char, font)
        if image.tobytes() not in placeholders and np.asarray(image).min() < 255:
            drawn[char] = image
    return drawn


def _png(image: Image.Image) -> dict:
    """PNG bytes at zlib level 1: a third of datasets' encoding time for 12% more bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


# ---- splits ----


def _rank(seed: int, *key) -> str:
    return hashlib.sha256(repr((seed, *key)).encode()).hexdigest()


def _held_out_concepts(concepts: list[str], seed: int, validation: float, test: float):
    ranked = sorted(concepts, key=lambda c: _rank(seed, "concept", c))
    n_test, n_val = round(test * len(ranked)), round(validation * len(ranked))
    return set(ranked[n_test : n_test + n_val]), set(ranked[:n_test])


def _held_out_triples(infos: list[EmojiInfo], seed: int) -> dict[tuple, str]:
    """(concept, gender, tones) -> "test" / "validation", at most one each per concept."""
    pairs = Counter()  # images per (concept, gender), (concept, tones), (gender, tones) in train
    triples = defaultdict(list)
    for info in infos:
        c, g, t = info.concept, info.gender, info.tones
        pairs.update([("cg", c, g), ("ct", c, t), ("gt", g, t)])
        if g is not None and t:
            triples[c, g, t].append(info)
    by_concept = defaultdict(list)
    for triple in triples:
        by_concept[triple[0]].append(triple)
    held = {}
    for concept in sorted(by_concept):
        candidates = by_concept[concept]
        if len({g for _, g, _ in candidates}) < 2 or len({t for *_, t in candidates}) < 2:
            continue
        for split in ("test", "validation"):
            taken = [t for t in held if t[0] == concept]
            for c, g, t in sorted(candidates, key=lambda triple: _rank(seed, split, *triple)):
                n = len(triples[c, g, t])  # each pair must keep an image in train without them
                clash = any(g == tg or t == tt for _, tg, tt in taken)
                keeps = all(pairs[key] > n for key in (("cg", c, g), ("ct", c, t), ("gt", g, t)))
                if not clash and keeps:
                    held[c, g, t] = split
                    pairs.subtract({("cg", c, g): n, ("ct", c, t): n, ("gt", g, t): n})
                    break
    return held


def _assign(infos: list[EmojiInfo], seed: int, validation: float, test: float) -> dict[str, str]:
    """image id -> split (see the module docstring)."""
    concepts = sorted({info.concept for info in infos})
    val_concepts, test_concepts = _held_out_concepts(concepts, seed, validation, test)
    rest = [i for i in infos if i.concept not in val_concepts | test_concepts]
    triples = _held_out_triples(rest, seed)
    split = {}
    for info in infos:
        if info.concept in test_concepts:
            split[info.image_id] = "test"
        elif info.concept in val_concepts:
            split[info.image_id] = "validation"
        else:
            split[info.image_id] = triples.get((info.concept, info.gender, info.tones), "train")
    return split


@dataclass(frozen=True)
class EmojiHoldOut:
    """What `load_emoji` keeps out of train: concepts and (concept, gender, tones) triples,
    each mapped to "validation" or "test". The icon corpus holds the same out in every style."""

    concepts: dict[str, str]
    triples: dict[tuple, str]


def emoji_hold_out(
    font_path: str | os.PathLike | None = None,
    seed: int = 0,
    validation_concepts: float = 0.05,
    test_concepts: float = 0.1,
) -> EmojiHoldOut:
    """The hold-out of `load_emoji` with the same arguments (draws the emoji to know which
    the font has, as `load_emoji` does; encodes no image)."""
    infos = [
        emoji_info(char) for char in _drawn(_qualified(), _open_font(find_emoji_font(font_path)))
    ]
    concepts = sorted({info.concept for info in infos})
    val, test = _held_out_concepts(concepts, seed, validation_concepts, test_concepts)
    rest = [i for i in infos if i.concept not in val | test]
    return EmojiHoldOut(
        {c: "validation" for c in val} | {c: "test" for c in test}, _held_out_triples(rest, seed)
    )


def _qualified() -> list[str]:
    emoji = _emoji_package()
    fully = emoji.STATUS["fully_qualified"]
    return sorted(char for char, data in emoji.EMOJI_DATA.items() if data["status"] == fully)


# ---- the data set ----


def load_emoji(
    font_path: str | os.PathLike | None = None,
    image_size: int = 112,
    seed: int = 0,
    validation_concepts: float = 0.05,
    test_concepts: float = 0.1,
) -> datasets.DatasetDict:
    """Every fully-qualified emoji the font draws, captioned, split train / validation / test.

    `font_path` defaults to what `find_emoji_font` finds; `validation_concepts` and
    `test_concepts` are the fractions of concepts held out whole (see the module docstring).
    Takes 15-20 s on two CPU cores (drawing 3,963 emoji, encoding 3,788 PNGs); caches nothing.

    Example:
        >>> ds = load_emoji(image_size=64)  # doctest: +SKIP
        >>> ds["train"][0]["image"].size, ds["train"][0]["captions"]  # doctest: +SKIP
        ((64, 64), ['a keycap #'])
    """
    if (
        not 0 <= validation_concepts + test_concepts < 1
        or min(validation_concepts, test_concepts) < 0
    ):
        raise ValueError(
            "load_emoji: validation_concepts and test_concepts must be >= 0 and sum below 1, got "
            f"{validation_concepts} and {test_concepts}"
        )
    drawn = _drawn(_qualified(), _open_font(find_emoji_font(font_path)))
    infos = [emoji_info(char) for char in drawn]
    splits = _assign(infos, seed, validation_concepts, test_concepts)
    rows = defaultdict(list)
    for info in infos:
        rows[splits[info.image_id]].append(info)
    return datasets.DatasetDict(
        {
            split: make_dataset(
                [
                    _png(drawn[i.char].resize((image_size, image_size), Image.LANCZOS))
                    for i in rows[split]
                ],
                [i.image_id for i in rows[split]],
                [[i.caption] for i in rows[split]],
                split,
            )
            for split in ("train", "validation", "test")
        }
    )


def emoji_slices(
    ds: datasets.DatasetDict, n_slices: int = 4, max_images: int = 1000, seed: int = 0
) -> list[datasets.DatasetDict]:
    """Cut `load_emoji()`'s set into `n_slices` small sets with disjoint concepts.

    Concepts go, in a seeded order, to the slice with the fewest images that still has room
    for all of the concept's images (at most `max_images` per slice); concepts that fit
    nowhere are left out. Each slice keeps every image's split from `ds`, so its test still
    holds concepts and triples its train never sees.

    Example:
        >>> slices = emoji_slices(load_emoji(), n_slices=4)  # doctest: +SKIP
        >>> [sum(len(s[split]) for split in s) for s in slices]  # doctest: +SKIP
        [974, 936, 942, 936]
    """
    if n_slices < 1 or max_images < 1:
        raise ValueError(
            f"emoji_slices: n_slices and max_images must be >= 1, got {n_slices}, {max_images}"
        )
    members = defaultdict(list)  # concept -> (split, row) of its images
    for split in ds:
        for row, image_id in enumerate(ds[split]["image_id"]):
            members[emoji_info(image_id).concept].append((split, row))
    sizes = [0] * n_slices
    rows = [defaultdict(list) for _ in range(n_slices)]
    for concept in sorted(members, key=lambda c: _rank(seed, "slice", c)):
        smallest = min(range(n_slices), key=sizes.__getitem__)
        if sizes[smallest] + len(members[concept]) > max_images:
            continue
        sizes[smallest] += len(members[concept])
        for split, row in members[concept]:
            rows[smallest][split].append(row)
    return [
        datasets.DatasetDict({split: ds[split].select(sorted(r[split])) for split in ds})
        for r in rows
    ]
