"""The figures of a built icon corpus (`edje data build icons`) as the markdown of docs/icons.md:
images and captions per split, per licence and per set (the largest), the evaluation sets, and
why icons were left out.

    python bench/icon_corpus_report.py outputs/icons > figures.md
"""

from __future__ import annotations

import argparse
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path


def captions_per_split(out: Path, manifest: dict) -> Counter:
    counts = Counter()
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    counts[record["split"]] += len(record["captions"])
    return counts


def report(out: Path, top: int) -> str:
    manifest = json.loads((out / "manifest.json").read_text())
    sets = json.loads((out / "attribution.json").read_text())
    captions = captions_per_split(out, manifest)
    lines = ["| split | images | captions |", "|---|---:|---:|"]
    for split, n in sorted(manifest["splits"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {split} | {n:,} | {captions.get(split, 0):,} |" if split in captions
                     else f"| {split} | {n:,} | |")  # fmt: skip
    by_licence: dict[str, Counter] = defaultdict(Counter)
    for info in sets.values():
        by_licence[info["license"].get("spdx", "?")].update(info["images"])
    lines += [
        "",
        "| licence | train | validation | evaluation | left out |",
        "|---|---:|---:|---:|---:|",
    ]
    for licence, c in sorted(by_licence.items(), key=lambda kv: -sum(kv[1].values())):
        held = sum(n for s, n in c.items() if s.startswith("heldout"))
        lines.append(f"| {licence} | {c['train']:,} | {c['validation']:,} | {held:,} "
                     f"| {c['excluded']:,} |")  # fmt: skip
    largest = sorted(sets.items(), key=lambda kv: -kv[1]["images"].get("train", 0))[:top]
    lines += ["", f"The {top} largest sets in train:", "", "| set | licence | train |",
              "|---|---|---:|"]  # fmt: skip
    for prefix, info in largest:
        lines.append(f"| {info['name']} (`{prefix}`) | {info['license'].get('spdx')} "
                     f"| {info['images'].get('train', 0):,} |")  # fmt: skip
    lines += ["", "| evaluation set | images |", "|---|---:|"]
    lines += [f"| `{name}` | {n:,} |" for name, n in manifest["eval_sets"].items()]
    lines += ["", "| left out of training because | icons |", "|---|---:|"]
    lines += [f"| {why} | {n:,} |" for why, n in manifest["excluded"].items()]
    lines += [
        "",
        f"{len(manifest['shards'])} shards, {len(manifest['failed'])} icons not drawable.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(report(args.corpus, args.top))


if __name__ == "__main__":
    main()
