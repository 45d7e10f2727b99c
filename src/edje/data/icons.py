"""The icon corpus: ~400k human-made drawings with human-written names from npm packages, and
the zero-shot protocol that holds concepts and styles out of its training part.

Sources (npm, fetched by pinned version and sha512 with `edje.data.npm`):

- `@iconify/json`: every iconify set, each icon with its name, each set with its licence and
  author. Left out whole: logo, programming and app-icon sets (`EXCLUDED_CATEGORIES`,
  `EXCLUDED_SETS`: they name brands and programs, not what is drawn) and non-commercial sets.
- `emojibase-data`: CLDR labels, keywords and shortcodes per code point; the 12 emoji sets of
  iconify name their code points (`chars`), which joins a concept across styles.
- `@mdi/svg` (aliases of Material Design Icons) and `@phosphor-icons/core` (tags of Phosphor
  icons): more captions for those two sets.

Captions. An icon's caption is its name made readable (`edje.data.icon_captions`:
"arrow-left-bold-circle-outline" -> "arrow left bold circle outline", "home-fill" -> "home
filled"). An emoji's caption is the one edje's emoji set gives its code point
(`edje.data.emoji.emoji_info`: "a woman cook with medium-light skin"), so every style of an
emoji reads alike. Extra captions, kept beside it: the icon's aliases that draw the same image
(aliases that flip or rotate it are left out), MDI aliases, Phosphor tags, emojibase's label and
keywords.

Licences. Every sample keeps its set's licence and attribution (author, link), as does the corpus's
`ATTRIBUTION.md`. Training uses only licences that allow redistributing a model trained on the
images with attribution (`TRAIN_LICENCES`: MIT, Apache-2.0, ISC, BSD, Unlicense, CC0, CC-BY).
Share-alike and copyleft sets (CC-BY-SA, GPL, OFL, MPL) stay out of training so the shipped
model carries no share-alike terms; one of them, OpenMoji (CC-BY-SA-4.0), is the held-out style,
used only to evaluate, on the user's machine. Non-commercial sets are left out entirely.

The zero-shot protocol (every rule by name or code point, none by chance per image):

1. Held-out concepts: the emoji concepts `edje.data.load_emoji` holds out as test (169 with
   seed 0) are out of training in every style: their drawings form `icons-heldout-concepts`
   (the training emoji styles), `icons-heldout-noto` and `icons-heldout-emojione`. Its
   validation concepts are out too and form `icons-validation`, with a hundredth of the icon
   names (by hash of the concept name). The (concept, gender, tones) triples it holds out are
   out of training as well.
2. Icons carrying a held-out label are out of training: an icon whose concept name (its name
   without style words) is a held-out concept or one of its one-word CLDR keywords.
3. Held-out style: OpenMoji, every drawing (`icons-heldout-style`).
4. Held-out icon set: game-icons.net, 4k drawings with descriptive names ("holy-water",
   "fruit-bowl"; `icons-heldout-set`).
5. iconify's `noto` and `emojione` are the artwork of edje's own Noto and EmojiOne sets, whose
   fine-tuning tests must stay unseen: they are out of training whole.

`catalogue()` gives every icon with its split; `edje data build icons` renders them into tar
shards (`edje.data.icon_shards`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edje.data.icon_captions import icon_caption, icon_concept
from edje.data.npm import NpmPackage, fetch_npm_package

__all__ = [
    "EVAL_SETS",
    "PACKAGES",
    "TRAIN_LICENCES",
    "Icon",
    "IconSource",
    "catalogue",
    "held_out_labels",
]

PACKAGES = {
    "iconify": NpmPackage(
        "@iconify/json",
        "2.2.553",
        "sha512-wJiXvMppZufZiRtHNnvL/BfIQONajWDEbTmBPqWMFX2HSOLj54FGmhmp5M56ErYfyS39s9RKS1PhQOBiBy+L4w==",
    ),
    "emojibase": NpmPackage(
        "emojibase-data",
        "17.0.0",
        "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    ),
    "mdi": NpmPackage(
        "@mdi/svg",
        "7.4.47",
        "sha512-WQ2gDll12T9WD34fdRFgQVgO8bag3gavrAgJ0frN4phlwdJARpE6gO1YvLEMJR0KKgoc+/Ea/A0Pp11I00xBvw==",
    ),
    "phosphor": NpmPackage(
        "@phosphor-icons/core",
        "2.1.1",
        "sha512-v4ARvrip4qBCImOE5rmPUylOEK4iiED9ZyKjcvzuezqMaiRASCHKcRIuvvxL/twvLpkfnEODCOJp5dM4eZilxQ==",
    ),
}

EMOJI_STYLES = (
    "emojione",
    "emojione-monotone",
    "emojione-v1",
    "fluent-emoji",
    "fluent-emoji-flat",
    "fluent-emoji-high-contrast",
    "fxemoji",
    "noto",
    "noto-v1",
    "openmoji",
    "streamline-emojis",
    "twemoji",
)
EDJE_OWN_SETS = ("noto", "emojione")  # edje's Noto and EmojiOne sets: never trained on here
HELD_OUT_STYLE = "openmoji"
HELD_OUT_SET = "game-icons"
EXCLUDED_CATEGORIES = ("Logos", "Programming", "Apps")
EXCLUDED_SETS = ("arcticons",)  # Android app icons, named after the apps
TRAIN_LICENCES = (
    "MIT",
    "Apache-2.0",
    "ISC",
    "BSD-3-Clause",
    "Unlicense",
    "CC0-1.0",
    "CC-BY-3.0",
    "CC-BY-4.0",
)
VALIDATION_SHARE = 100  # one icon concept name in this many goes to validation
# Evaluation sets: name -> the split of `Icon` they hold.
EVAL_SETS = {
    "icons-heldout-concepts": "heldout-concepts",
    "icons-heldout-noto": "heldout-noto",
    "icons-heldout-emojione": "heldout-emojione",
    "icons-heldout-style": "heldout-style",
    "icons-heldout-set": "heldout-set",
    "icons-validation": "validation",
}


@dataclass
class Icon:
    """One drawing of the corpus; `key` is unique (`"<set>__<name>"`, a WebDataset key)."""

    key: str
    set: str
    name: str
    svg: str
    caption: str
    captions: list[str]  # the caption first, then the extra ones
    concept: str
    codepoints: str | None  # emoji only: "1f469-200d-1f373"
    licence: str
    split: str  # "train", "validation", an `EVAL_SETS` split, or "excluded"
    reason: str = ""  # why an icon is excluded
    attribution: str = ""  # "<set> by <author> (<url>), <licence>"

    def record(self) -> dict:
        """What a shard keeps beside the image (`<key>.json`)."""
        fields = ("key", "set", "name", "caption", "captions", "concept", "codepoints")
        return {f: getattr(self, f) for f in (*fields, "licence", "attribution", "split")}


@dataclass
class IconSource:
    """The unpacked packages (`fetch` gets them) and the emoji hold-out of `load_emoji`."""

    iconify: Path
    emojibase: Path
    mdi: Path
    phosphor: Path
    held_concepts: dict[str, str] = field(default_factory=dict)  # concept -> validation/test
    held_triples: dict[tuple, str] = field(default_factory=dict)

    @classmethod
    def fetch(cls, cache: str | Path, *, npm: str = "npm") -> IconSource:
        from edje.data.emoji import emoji_hold_out

        folders = {key: fetch_npm_package(p, cache, npm=npm) for key, p in PACKAGES.items()}
        hold = emoji_hold_out()
        return cls(**folders, held_concepts=hold.concepts, held_triples=hold.triples)

    def collections(self) -> dict[str, dict]:
        return json.loads((self.iconify / "collections.json").read_text(encoding="utf-8"))

    def icon_set(self, prefix: str) -> dict:
        return json.loads((self.iconify / "json" / f"{prefix}.json").read_text(encoding="utf-8"))


def catalogue(source: IconSource, sets: list[str] | None = None) -> Iterator[Icon]:
    """Every icon of the chosen iconify sets (all but the excluded ones by default), with its
    captions and split, in a fixed order (by set, then name)."""
    collections = source.collections()
    emojibase = _emojibase(source.emojibase)
    labels = held_out_labels(source.held_concepts, emojibase)
    extra = {"mdi": _mdi_aliases(source.mdi), "ph": _phosphor_tags(source.phosphor)}
    emoji_names = _emoji_names(source, [p for p in EMOJI_STYLES if p in collections], emojibase)
    for prefix in sorted(sets if sets is not None else collections):
        info = collections.get(prefix)
        if info is None:
            raise ValueError(f"icon corpus: no iconify set {prefix!r}")
        if info.get("category") in EXCLUDED_CATEGORIES or prefix in EXCLUDED_SETS:
            continue
        licence = info.get("license", {}).get("spdx", "unknown")
        if "-NC" in licence:
            continue
        icon_set = source.icon_set(prefix)
        chars = emoji_names if prefix in EMOJI_STYLES else {}
        attribution = _attribution(prefix, info)
        for icon in _icons_of(prefix, icon_set, licence, emojibase, chars, extra.get(prefix, {})):
            icon.split, icon.reason = _split(icon, source, labels)
            icon.attribution = attribution
            yield icon


def _attribution(prefix: str, info: dict) -> str:
    author, licence = info.get("author", {}), info.get("license", {})
    where = f" ({author['url']})" if author.get("url") else ""
    return (
        f"{info.get('name', prefix)} by {author.get('name', 'unknown')}{where}, "
        f"{licence.get('title', licence.get('spdx', 'unknown licence'))}"
    )


def held_out_labels(held_concepts: dict[str, str], emojibase: dict[str, dict]) -> dict[str, str]:
    """label -> split: each held-out concept and the one-word CLDR keywords of its emoji."""
    from edje.data.emoji import emoji_info

    labels = dict(held_concepts)
    for codepoints, entry in sorted(emojibase.items()):
        char = _char(codepoints)
        if char is None:
            continue
        split = held_concepts.get(emoji_info(char).concept)
        if split is None:
            continue
        for tag in entry["tags"]:
            if " " not in tag:
                labels.setdefault(tag, split)
    return labels


def _split(icon: Icon, source: IconSource, labels: dict[str, str]) -> tuple[str, str]:
    held = None  # the emoji concept's hold-out ("validation" / "test"), emoji only
    if icon.codepoints is not None and (char := _char(icon.codepoints)) is not None:
        from edje.data.emoji import emoji_info

        info = emoji_info(char)
        held = source.held_concepts.get(info.concept)
        if held is None and (info.concept, info.gender, info.tones) in source.held_triples:
            return "excluded", "a held-out (concept, gender, tones) triple of the emoji set"
    label = labels.get(icon.concept)  # a held-out concept's name or one-word keyword
    if icon.set in EDJE_OWN_SETS:
        if held == "test":
            return f"heldout-{icon.set}", ""
        return "excluded", "edje's own Noto / EmojiOne artwork"
    if icon.set == HELD_OUT_STYLE:
        return "heldout-style", ""
    if icon.set == HELD_OUT_SET:
        return "heldout-set", ""
    if held == "test":
        return "heldout-concepts", ""
    if label == "test":
        return "excluded", "a held-out label"
    if icon.licence not in TRAIN_LICENCES:
        return "excluded", f"licence {icon.licence} (share-alike or copyleft)"
    if "validation" in (held, label) or _bucket(icon.concept) == 0:
        return "validation", ""
    return "train", ""


def _bucket(concept: str) -> int:
    return int(hashlib.sha256(f"icons:{concept}".encode()).hexdigest(), 16) % VALIDATION_SHARE


# ---- icons and captions ----


def _icons_of(prefix, icon_set, licence, emojibase, emoji_names, extra) -> Iterator[Icon]:
    chars = emoji_names | {name: code for code, name in icon_set.get("chars", {}).items()}
    aliases: dict[str, list[str]] = {}
    for alias, data in icon_set.get("aliases", {}).items():
        if not any(k in data for k in ("rotate", "hFlip", "vFlip")):  # the same image only
            aliases.setdefault(data["parent"], []).append(alias)
    for name in sorted(icon_set["icons"]):
        codepoints = chars.get(name) or chars.get(re.sub(r"-\d+$", "", name))  # "baby-angel-2"
        caption, concept = _emoji_caption(codepoints) or (icon_caption(name), icon_concept(name))
        if not caption:
            continue
        captions = [caption, *(icon_caption(a) for a in aliases.get(name, []))]
        captions += extra.get(re.sub(r"-(bold|duotone|fill|light|thin)$", "", name), [])
        if codepoints is not None and (entry := emojibase.get(_bare(codepoints))):
            captions += [entry["label"].replace(":", ","), ", ".join(entry["tags"])]
        yield Icon(
            key=f"{prefix}__{name}",
            set=prefix,
            name=name,
            svg=_svg(icon_set, name),
            caption=caption,
            captions=list(dict.fromkeys(c for c in captions if c)),
            concept=concept,
            codepoints=codepoints,
            licence=licence,
            split="",
        )


def _emoji_caption(codepoints: str | None) -> tuple[str, str] | None:
    if codepoints is None or (char := _char(codepoints)) is None:
        return None
    from edje.data.emoji import emoji_info

    info = emoji_info(char)
    return info.caption, info.concept


def _svg(icon_set: dict, name: str) -> str:
    """A square SVG of the icon (centred in its box; monochrome sets draw in black)."""
    icon = icon_set["icons"][name]

    def get(key, default):
        return icon.get(key, icon_set.get(key, default))

    left, top, width, height = get("left", 0), get("top", 0), get("width", 16), get("height", 16)
    side = max(width, height)
    x, y = left - (side - width) / 2, top - (side - height) / 2
    body = icon["body"]
    turns, h_flip, v_flip = get("rotate", 0), get("hFlip", False), get("vFlip", False)
    if turns or h_flip or v_flip:
        cx, cy = left + width / 2, top + height / 2
        scale = f"scale({-1 if h_flip else 1} {-1 if v_flip else 1})"
        move = f"translate({cx} {cy}) rotate({90 * turns}) {scale} translate({-cx} {-cy})"
        body = f'<g transform="{move}">{body}</g>'
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{x} {y} {side} {side}" '
        f'width="{side}" height="{side}" color="#000">{body}</svg>'
    )


# ---- code points and the side packages ----

_EMOJI_BY_BARE: dict[str, str] | None = None


def _bare(codepoints: str) -> str:
    """Code points without variation selectors, lower case: how iconify and emojibase agree."""
    return "-".join(c for c in codepoints.lower().split("-") if c != "fe0f")


def _char(codepoints: str) -> str | None:
    """The fully-qualified emoji the `emoji` package knows for these code points, or None."""
    global _EMOJI_BY_BARE
    if _EMOJI_BY_BARE is None:
        from edje.data.emoji import _qualified

        _EMOJI_BY_BARE = {
            _bare("-".join(f"{ord(c):x}" for c in char)): char for char in _qualified()
        }
    return _EMOJI_BY_BARE.get(_bare(codepoints))


def _emojibase(folder: Path) -> dict[str, dict]:
    """bare code points -> {"label", "tags"} for every emoji and skin-tone variant."""
    out = {}
    for entry in json.loads((folder / "en" / "data.json").read_text(encoding="utf-8")):
        for item in [entry, *entry.get("skins", [])]:
            out[_bare(item["hexcode"])] = {"label": item["label"], "tags": entry.get("tags", [])}
    return out


def _emoji_names(source: IconSource, styles: list[str], emojibase: dict) -> dict[str, str]:
    """iconify emoji name -> code points. Five emoji sets list no code points (`chars`), but
    every emoji set names an emoji as the others do: its CLDR label in kebab case."""
    names = {re.sub(r"[^a-z0-9]+", "-", e["label"].lower()).strip("-"): code
             for code, e in emojibase.items()}  # fmt: skip
    for prefix in styles:
        names |= {name: code for code, name in source.icon_set(prefix).get("chars", {}).items()}
    return names


def _mdi_aliases(folder: Path) -> dict[str, list[str]]:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return {m["name"]: [icon_caption(a) for a in m.get("aliases", [])] for m in meta}


_PHOSPHOR_ENTRY = re.compile(r'name:"([a-z0-9-]+)",pascal_name:[^{}]*?tags:\[([^\]]*)\]')


def _phosphor_tags(folder: Path) -> dict[str, list[str]]:
    """Phosphor icon name -> one caption of its tags ("savings, nut, vegetable, ...")."""
    text = (folder / "dist" / "index.umd.js").read_text(encoding="utf-8")
    out = {}
    for name, tags in _PHOSPHOR_ENTRY.findall(text):
        words = [t.strip('"') for t in tags.split(",") if t.strip('"') and "*" not in t]
        if words:
            out[name] = [", ".join(words)]
    return out
