"""Write tests/data/icons/: a few real icons per iconify set, and the side packages' entries for
them, in the packages' own layout, so the icon corpus is tested without fetching 137 MB.

    EDJE_CACHE=... python tests/data/make_icon_fixture.py   # after `edje data build icons`

Each set keeps its `info` (author, licence) in its JSON file; tests/data/icons/LICENSES.md lists
them.
"""

import json
import shutil
from pathlib import Path

from edje.backbones import cache_dir
from edje.data.icons import PACKAGES

PICKS = {
    # emoji styles: held-out concepts (baby angel), a validation concept (airplane departure),
    # training concepts (duck, cook with tones), a held-out triple's neighbours
    "twemoji": [
        "baby-angel",
        "baby-angel-dark-skin-tone",
        "ab-button-blood-type",
        "airplane-departure",
        "duck",
        "woman-cook",
        "woman-cook-medium-light-skin-tone",
        "man-cook",
        "baby",
        "broken-heart",
        "red-heart",
    ],
    "fluent-emoji": ["baby-angel", "airplane-departure", "duck", "woman-cook", "red-heart"],
    "streamline-emojis": ["baby-angel-1", "airplane", "broken-heart", "anchor"],
    "openmoji": ["baby-angel", "duck", "woman-cook"],
    "noto": ["baby-angel", "ab-button-blood-type", "duck", "woman-cook"],
    "emojione": ["baby-angel", "duck"],
    # icon sets: Apache-2.0 with aliases, MIT with Phosphor tags, the held-out set, share-alike,
    # a logo set and a non-commercial one (both left out)
    "mdi": [
        "home",
        "home-outline",
        "account-network-outline",
        "alarm",
        "abacus",
        "arrow-right",
        "duck",
    ],
    "ph": ["acorn", "acorn-bold", "checks-fill", "baby", "house"],
    "game-icons": ["holy-water", "fruit-bowl", "anvil-impact"],
    "typcn": ["home", "anchor"],
    "logos": ["github-icon"],
    "ps": ["home"],
}


def main() -> None:
    out = Path(__file__).parent / "icons"
    shutil.rmtree(out, ignore_errors=True)
    roots = {k: cache_dir() / "npm" / p.folder_name / "package" for k, p in PACKAGES.items()}
    iconify = out / "iconify"
    (iconify / "json").mkdir(parents=True)
    collections = json.loads((roots["iconify"] / "collections.json").read_text())
    kept = {}
    codes = set()
    for prefix, names in PICKS.items():
        full = json.loads((roots["iconify"] / "json" / f"{prefix}.json").read_text())
        part = {k: v for k, v in full.items() if k in ("prefix", "info", "width", "height")}
        part["icons"] = {n: full["icons"][n] for n in names}
        part["aliases"] = {a: d for a, d in full.get("aliases", {}).items() if d["parent"] in names}
        part["chars"] = {c: n for c, n in full.get("chars", {}).items() if n in names}
        codes |= {c.replace("-fe0f", "") for c in part["chars"]}
        (iconify / "json" / f"{prefix}.json").write_text(json.dumps(part, indent=0))
        kept[prefix] = collections[prefix] | {"total": len(names)}
    (iconify / "collections.json").write_text(json.dumps(kept, indent=1))
    data = json.loads((roots["emojibase"] / "en" / "data.json").read_text())
    wanted = {
        "baby angel",
        "airplane departure",
        "airplane",
        "duck",
        "woman cook",
        "man cook",
        "baby",
        "broken heart",
        "red heart",
    }
    (out / "emojibase" / "en").mkdir(parents=True)
    (out / "emojibase" / "en" / "data.json").write_text(
        json.dumps([e for e in data if e["label"] in wanted], indent=0)
    )
    meta = json.loads((roots["mdi"] / "meta.json").read_text())
    (out / "mdi").mkdir()
    (out / "mdi" / "meta.json").write_text(
        json.dumps([m for m in meta if m["name"] in PICKS["mdi"]], indent=0)
    )
    umd = (roots["phosphor"] / "dist" / "index.umd.js").read_text()
    entries = [
        umd[umd.index(f'{{name:"{n}",') :].split("}", 1)[0] + "}" for n in ("acorn", "checks")
    ]
    (out / "phosphor" / "dist").mkdir(parents=True)
    (out / "phosphor" / "dist" / "index.umd.js").write_text("const o=[" + ",".join(entries) + "];")
    lines = [
        "# Licences of the test icons",
        "",
        "A few icons of each set, kept with their set's `info` in `iconify/json/<set>.json`.",
        "",
        "| set | author | licence |",
        "|---|---|---|",
    ]
    for prefix, info in kept.items():
        lines.append(
            f"| {info['name']} (`{prefix}`) | {info['author']['name']} "
            f"| {info['license']['title']} ({info['license']['url']}) |"
        )
    lines += ["", "emojibase-data, @mdi/svg (meta.json), @phosphor-icons/core: MIT (entries only)."]
    (out / "LICENSES.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
