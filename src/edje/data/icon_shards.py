"""Build the icon corpus (`edje.data.icons`) as WebDataset tar shards and evaluation folders,
and check a built corpus's hold-out.

Layout of `OUT` (`edje data build icons --out OUT`):

    train/00000.tar ...        training samples: <key>.png, <key>.txt (the caption),
    validation/00000.tar ...   <key>.json (all captions, set, licence, concept, code points)
    icons-heldout-concepts/test/  evaluation sets in edje's folder layout (PNG +
    icons-heldout-style/test/ ... metadata.jsonl), at most `eval_size` images each
    ATTRIBUTION.md, attribution.json   every set: author, licence, images per split
    holdout.json               the held-out concepts, labels and sets (what `check` tests)
    options.json               what it was built with: a later run with others is refused
    manifest.json              packages, options, every shard's samples and sha256

Deterministic: the same packages and options give the same bytes (samples ordered by a hash
of their key, tar headers without times or owners). Resumable: a shard is written to a
temporary file and renamed, so one that exists is whole; a second run renders only the shards
that are missing. Shards are read by `ShardDataModule` / `stream_shards` and `edje encode
--shards` as any img2dataset output is.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from edje._utils import atomic_folder, atomic_write, progress
from edje.data.icons import EVAL_SETS, HELD_OUT_SET, HELD_OUT_STYLE, Icon, IconSource, catalogue

__all__ = ["build_icon_corpus", "check_icon_corpus", "render_icon"]

SHARDED_SPLITS = ("train", "validation")


def render_icon(svg: str, size: int) -> bytes:
    """An icon's SVG as a `size` x `size` RGB PNG on white (resvg: no system dependency)."""
    from PIL import Image

    try:
        import resvg_py
    except ImportError as error:
        raise ImportError("drawing icons needs resvg-py: pip install 'edje[offline]'") from error

    png = resvg_py.svg_to_bytes(
        svg_string=svg, width=size, height=size, background="#ffffff", dpi=96,
        skip_system_fonts=True,
    )  # fmt: skip
    image = Image.open(io.BytesIO(bytes(png))).convert("RGB")
    if image.getextrema() == ((255, 255), (255, 255), (255, 255)):
        raise ValueError("renders blank")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def build_icon_corpus(
    out: str | Path,
    *,
    source: IconSource | None = None,
    cache: str | Path | None = None,
    sets: list[str] | None = None,
    image_size: int = 112,
    shard_size: int = 5000,
    eval_size: int = 1000,
    workers: int | None = None,
    show_progress: bool | None = None,
) -> dict:
    """Fetch the packages (unless `source` is given), render and write the corpus; returns the
    manifest. `sets` limits it to some iconify sets (tests, a quick look)."""
    if image_size < 16 or shard_size < 1 or eval_size < 1:
        raise ValueError(
            "build_icon_corpus: image_size >= 16, shard_size >= 1 and eval_size >= 1 expected, "
            f"got {image_size}, {shard_size}, {eval_size}"
        )
    out = Path(out)
    if source is None:
        from edje.backbones import cache_dir

        source = IconSource.fetch(cache if cache is not None else cache_dir())
    _check_options(out, {"image_size": image_size, "shard_size": shard_size, "sets": sets})
    icons = list(catalogue(source, sets))
    by_split: dict[str, list[Icon]] = defaultdict(list)
    for icon in sorted(icons, key=lambda i: _digest(i.key)):
        by_split[icon.split].append(icon)
    jobs = [
        (out / split / f"{n:05d}.tar", chunk, image_size)
        for split in SHARDED_SPLITS
        for n, chunk in enumerate(_chunks(by_split[split], shard_size))
    ]
    workers = workers or os.cpu_count() or 1
    shards, failed = [], {}
    bar = progress(len(icons), show_progress, "rendering icon shards", unit="icon")
    with bar, ProcessPoolExecutor(workers) as pool:
        for path, written, errors in pool.map(_write_shard, jobs):
            shards.append(written | {"path": str(path.relative_to(out))})
            failed |= errors
            bar.update(written["planned"])
        for name, split in EVAL_SETS.items():
            chosen = _one_image_per_caption(by_split[split])[:eval_size]
            failed |= _write_eval_set(out / name, chosen, image_size, pool)
            bar.update(len(chosen))
    manifest = _manifest(source, icons, by_split, shards, failed, image_size, eval_size)
    _write_json(out / "holdout.json", _holdout(source, by_split, eval_size))
    _write_attribution(out, source, icons)
    _write_json(out / "manifest.json", manifest)
    return manifest


def _check_options(out: Path, options: dict) -> None:
    """Shards of an earlier run are kept only if it had these options (`options.json`)."""
    from edje.data.icons import PACKAGES

    options = options | {"packages": {p.name: p.version for p in PACKAGES.values()}}
    path = out / "options.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != options:
            changed = sorted(k for k in options if before.get(k) != options[k])
            raise ValueError(
                f"build_icon_corpus: {out} was built with other {', '.join(changed)} "
                f"({ {k: before.get(k) for k in changed} }); build into a new folder"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, options)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _one_image_per_caption(icons: list[Icon]) -> list[Icon]:
    """The first image of each caption: a caption shared by several images (one emoji in
    several styles, "abstract 001" and "abstract 002") would make retrieval ask for one of
    them, and its copies tie against it."""
    seen: set[str] = set()
    return [icon for icon in icons if not (icon.caption in seen or seen.add(icon.caption))]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write_shard(job) -> tuple[Path, dict, dict]:
    """Render one shard (in a worker); an existing shard with the planned keys is kept."""
    path, icons, size = job
    keys = [icon.key for icon in icons]
    if path.is_file() and (kept := _shard_keys(path)) is not None and set(kept) <= set(keys):
        return path, _shard_entry(path, kept, len(keys)), {}
    path.parent.mkdir(parents=True, exist_ok=True)
    written, failed = [], {}

    def write(temp: str) -> None:
        with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as tar:
            for icon in icons:
                try:
                    png = render_icon(icon.svg, size)
                except Exception as error:  # a drawing resvg cannot render is listed, not fatal
                    failed[icon.key] = " ".join(str(error).split())[:200]
                    continue
                record = json.dumps(icon.record(), ensure_ascii=False, sort_keys=True)
                for suffix, data in (("png", png), ("txt", icon.caption.encode()),
                                     ("json", record.encode())):  # fmt: skip
                    _add(tar, f"{icon.key}.{suffix}", data)
                written.append(icon.key)

    atomic_write(path, write)
    return path, _shard_entry(path, written, len(keys)), failed


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _shard_keys(path: Path) -> list[str] | None:
    try:
        with tarfile.open(path, "r:") as tar:
            return [m.name[: -len(".png")] for m in tar if m.name.endswith(".png")]
    except (tarfile.TarError, OSError):
        return None  # unreadable: written again


def _shard_entry(path: Path, keys: list[str], planned: int) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"samples": len(keys), "planned": planned, "sha256": digest.hexdigest()}


def _render_row(job) -> tuple[str, bytes | str]:
    icon_key, svg, size = job
    try:
        return icon_key, render_icon(svg, size)
    except Exception as error:
        return icon_key, " ".join(str(error).split())[:200]


def _write_eval_set(folder: Path, icons: list[Icon], size: int, pool) -> dict:
    """An evaluation set in edje's folder layout: test/<key>.png + test/metadata.jsonl (the
    caption; the set and licence ride along)."""
    failed = {}
    with atomic_folder(folder) as temp:
        (temp / "test").mkdir()
        rows = []
        jobs = [(icon.key, icon.svg, size) for icon in icons]
        for icon, (key, png) in zip(icons, pool.map(_render_row, jobs, chunksize=32), strict=True):
            if isinstance(png, str):
                failed[key] = png
                continue
            (temp / "test" / f"{key}.png").write_bytes(png)
            rows.append({"file_name": f"{key}.png", "caption": icon.caption, "set": icon.set,
                         "licence": icon.licence, "attribution": icon.attribution})  # fmt: skip
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (temp / "test" / "metadata.jsonl").write_text(lines)
    return failed


def _manifest(source, icons, by_split, shards, failed, image_size, eval_size) -> dict:
    from edje.data.icons import PACKAGES

    excluded = Counter(icon.reason for icon in by_split["excluded"])
    return {
        "format": "edje icon corpus 1",
        "packages": {
            p.name: {"version": p.version, "integrity": p.integrity} for p in PACKAGES.values()
        },
        "image_size": image_size,
        "eval_size": eval_size,
        "icons": len(icons),
        "splits": {split: len(items) for split, items in sorted(by_split.items())},
        "excluded": dict(excluded.most_common()),
        "eval_sets": {
            name: min(eval_size, len(_one_image_per_caption(by_split[s])))
            for name, s in EVAL_SETS.items()
        },
        "shards": shards,
        "failed": failed,
    }


def _holdout(source: IconSource, by_split, eval_size: int) -> dict:
    from edje.data.icons import EDJE_OWN_SETS, _emojibase, held_out_labels

    labels = held_out_labels(source.held_concepts, _emojibase(source.emojibase))
    return {
        "concepts": sorted(c for c, s in source.held_concepts.items() if s == "test"),
        "labels": sorted(label for label, s in labels.items() if s == "test"),
        "triples": sorted([c, g, list(t)] for (c, g, t), _ in source.held_triples.items()),
        "sets": sorted([HELD_OUT_STYLE, HELD_OUT_SET, *EDJE_OWN_SETS]),
        "eval_keys": sorted(
            icon.key
            for split in EVAL_SETS.values()
            if split != "validation"
            for icon in _one_image_per_caption(by_split[split])[:eval_size]
        ),
    }


def _write_attribution(out: Path, source: IconSource, icons: list[Icon]) -> None:
    collections = source.collections()
    counts: dict[str, Counter] = defaultdict(Counter)
    for icon in icons:
        counts[icon.set][icon.split] += 1
    sets = {}
    for prefix in sorted(counts):
        info = collections[prefix]
        sets[prefix] = {
            "name": info.get("name", prefix),
            "author": info.get("author", {}),
            "license": info.get("license", {}),
            "images": dict(sorted(counts[prefix].items())),
        }
    _write_json(out / "attribution.json", sets)
    lines = [
        "# Attribution",
        "",
        "Icons from the npm package @iconify/json, each set under its own licence. Sets whose",
        "licence is share-alike or copyleft are not in train/ (see edje.data.icons).",
        "",
        "| set | author | licence | train | validation | evaluation |",
        "|---|---|---|---|---|---|",
    ]
    for prefix, s in sets.items():
        author, licence = s["author"], s["license"]
        evaluation = sum(n for split, n in s["images"].items() if split.startswith("heldout"))
        lines.append(
            f"| {s['name']} (`{prefix}`) | [{author.get('name', '?')}]({author.get('url', '')}) "
            f"| [{licence.get('title', '?')}]({licence.get('url', '')}) "
            f"| {s['images'].get('train', 0)} | {s['images'].get('validation', 0)} "
            f"| {evaluation} |"
        )
    atomic_write(out / "ATTRIBUTION.md", lambda p: Path(p).write_text("\n".join(lines) + "\n"))


def _write_json(path: Path, value) -> None:
    text = json.dumps(value, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text))


def check_icon_corpus(out: str | Path, *, show_progress: bool | None = None) -> dict:
    """Read every shard of a built corpus and check it against its manifest and hold-out:
    each shard's sha256, and no training or validation sample whose set is held out, whose
    emoji concept or (concept, gender, tones) is held out, whose concept name is a held-out
    label, or that is in an evaluation set. Raises ValueError naming the first violations;
    returns counts."""
    from edje.data.emoji import emoji_info
    from edje.data.icon_captions import icon_concept
    from edje.data.icons import _char

    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    hold = json.loads((out / "holdout.json").read_text(encoding="utf-8"))
    concepts, labels, sets = set(hold["concepts"]), set(hold["labels"]), set(hold["sets"])
    triples = {(c, g, tuple(t)) for c, g, t in hold["triples"]}
    eval_keys = set(hold["eval_keys"])
    problems, counts = [], Counter()
    bar = progress(len(manifest["shards"]), show_progress, "checking icon shards", unit="shard")
    with bar:
        for shard in manifest["shards"]:
            path = out / shard["path"]
            if _shard_entry(path, [], 0)["sha256"] != shard["sha256"]:
                problems.append(f"{shard['path']}: sha256 differs from manifest.json")
            for record in _records(path):
                counts[record["split"]] += 1
                key, why = record["key"], []
                if record["set"] in sets:
                    why.append(f"set {record['set']} is held out")
                char = record["codepoints"] and _char(record["codepoints"])
                info = emoji_info(char) if char else None
                concept = info.concept if info else icon_concept(record["name"])
                if concept in labels:
                    why.append(f"its concept is the held-out label {concept!r}")
                if info and info.concept in concepts:
                    why.append(f"emoji concept {info.concept!r} is held out")
                if info and (info.concept, info.gender, info.tones) in triples:
                    why.append("its (concept, gender, tones) is held out")
                if key in eval_keys:
                    why.append("it is in an evaluation set")
                problems += [f"{shard['path']}: {key}: {w}" for w in why]
            bar.update(1)
    if problems:
        raise ValueError(
            f"check_icon_corpus: {len(problems)} problem(s) in {out}: " + "; ".join(problems[:5])
        )
    return dict(counts)


def _records(path: Path):
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.name.endswith(".json"):
                yield json.loads(tar.extractfile(member).read())
