"""Readable captions from icon names, and the normalised name that hold-outs compare.

An iconify name is kebab-case: `arrow-left-bold-circle-outline`, `home-variant-24px`,
`woman-cook-medium-light-skin-tone`. The caption is its words in order, with

- style words written out: `fill` -> "filled", `twotone` / `two-tone` -> "two-tone",
  `alt` -> "alternative" (the rest of `STYLE_WORDS`, "outline", "bold", "sharp", ..., stay as
  they are: they are words already);
- grid sizes and variant numbers dropped where they close the name, before or after its style
  words (`-24px`, `clock-16-filled`, `-2`, `-01`): they name a file, not what is drawn ("arrow
  left 2" reads as two arrows).

The *concept name* drops the style words too: `home-outline-rounded` and `home-fill` are both
"home". Held-out labels are compared with it (`edje.data.icons`).

Example:
    >>> icon_caption("arrow-left-bold-circle-outline")
    'arrow left bold circle outline'
    >>> icon_caption("home-fill-24px"), icon_concept("home-fill-24px")
    ('home filled', 'home')
    >>> icon_caption("clock-16-filled"), icon_caption("classify-add-2-fill")
    ('clock filled', 'classify add filled')
    >>> icon_caption("abstract-001"), icon_caption("1")
    ('abstract', '')
"""

from __future__ import annotations

import re

__all__ = ["STYLE_WORDS", "icon_caption", "icon_concept", "words"]

# Words that say how an icon is drawn, not what it shows (measured: the most frequent last words
# of the 414k non-emoji iconify names, Dec 2026).
STYLE_WORDS = {
    "alt": "alternative",
    "bold": "bold",
    "broken": "broken",
    "bulk": "bulk",
    "duo": "duo",
    "duocolor": "duocolor",
    "duotone": "duotone",
    "fill": "filled",
    "filled": "filled",
    "flat": "flat",
    "light": "light",
    "line": "line",
    "linear": "linear",
    "outline": "outline",
    "outlined": "outline",
    "regular": "regular",
    "round": "round",
    "rounded": "rounded",
    "sharp": "sharp",
    "solid": "solid",
    "thin": "thin",
    "twotone": "two-tone",
}
_SIZE_OR_NUMBER = re.compile(r"\d+(px)?")
_LETTERS = re.compile(r"[a-z]{2}")


def words(name: str) -> list[str]:
    """The name's words, lower case, trailing sizes and variant numbers dropped."""
    parts = [p for p in re.split(r"[-_\s]+", name.lower()) if p]
    styles = []  # sizes and variant numbers drop from the end, past the style words
    while parts and (_SIZE_OR_NUMBER.fullmatch(parts[-1]) or parts[-1] in STYLE_WORDS):
        word = parts.pop()
        if word in STYLE_WORDS:
            styles.insert(0, word)
    parts += styles
    for at in range(len(parts) - 1):  # "two-tone" is one style word
        if parts[at : at + 2] == ["two", "tone"]:
            parts[at : at + 2] = ["twotone"]
            break
    return parts


def icon_caption(name: str) -> str:
    """The caption of an icon name; "" when nothing readable is left (a bare number)."""
    text = " ".join(STYLE_WORDS.get(p, p) for p in words(name))
    return text if _LETTERS.search(text) else ""


def icon_concept(name: str) -> str:
    """What the icon shows: its words without style words ("home-fill-24px" -> "home")."""
    return " ".join(p for p in words(name) if p not in STYLE_WORDS)
