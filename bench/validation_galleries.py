"""Training options compared on more of the corpus's validation split than `icons-validation`'s
1,000 captions, where one caption is 0.1 point of R@1 and tries differ by a few.

Writes N more galleries of 1,000 from the validation shards (one image per caption, captions not
in `icons-validation` nor in an earlier gallery, in shard order) in edje's folder layout, then
reranks each model's first-stage top `--depth` on `icons-validation` and every gallery:

    python bench/validation_galleries.py --corpus outputs/icons --galleries 3 \\
        --out outputs/icons-validation-galleries --models RUN_MODEL TRY_MODEL

Prints T2I / I2T R@1 (percent) per model and gallery, and the mean over all (exact: a caption
is 0.1 point), first stage on top.
Galleries already written in `--out` are read, not written again. Validation only: a choice
made here never sees a held-out set.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

from edje._utils import atomic_folder
from edje.evaluation.metrics import I2T_KEY, T2I_KEY

VALIDATION = "icons-validation"
METRICS = (T2I_KEY.format(k=1), I2T_KEY.format(k=1))


def validation_samples(corpus: Path):
    """`(key, caption, png bytes)` of every sample of the validation shards, in shard order."""
    for shard in sorted((corpus / "validation").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in (n for n in members if n.endswith(".txt")):
                key = name[: -len(".txt")]
                if f"{key}.png" not in members:
                    raise ValueError(f"validation_galleries: {shard} has {name} but no {key}.png.")
                caption = tar.extractfile(members[name]).read().decode()
                yield key, caption, tar.extractfile(members[f"{key}.png"]).read()


def write_galleries(corpus: Path, out: Path, galleries: int, size: int = 1000) -> list[Path]:
    """The gallery folders (`out/gallery-1`, ...), written where absent; each has `size` images
    unless the validation split runs out, which is an error naming what it holds."""
    folders = [out / f"gallery-{i}" for i in range(1, galleries + 1)]
    if all((f / "test" / "metadata.jsonl").is_file() for f in folders):
        return folders
    lines = (corpus / VALIDATION / "test" / "metadata.jsonl").read_text().splitlines()
    seen = {json.loads(line)["caption"] for line in lines}
    chosen: list[list[tuple[str, str, bytes]]] = [[] for _ in folders]
    for key, caption, png in validation_samples(corpus):
        gallery = next((g for g in chosen if len(g) < size), None)
        if gallery is None:
            break
        if caption not in seen:
            seen.add(caption)
            gallery.append((key, caption, png))
    if len(chosen[-1]) < size:
        raise ValueError(
            f"validation_galleries: {galleries} galleries of {size} need {galleries * size} "
            f"captions outside {VALIDATION}; {corpus / 'validation'} holds "
            f"{sum(map(len, chosen))}."
        )
    for folder, gallery in zip(folders, chosen, strict=True):
        with atomic_folder(folder) as staging:  # whole or absent
            (staging / "test").mkdir()
            for key, _, png in gallery:
                (staging / "test" / f"{key}.png").write_bytes(png)
            rows = [json.dumps({"file_name": f"{key}.png", "caption": c}) for key, c, _ in gallery]
            (staging / "test" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folders


def recalls(model_dir: str, first_stage, folders: list[Path], depth: int) -> list[list[float]]:
    """`[T2I, I2T]` R@1 (percent), first stage then reranked, per folder."""
    from edje import EDJEModel, EDJEProcessor
    from edje.data import load_data
    from edje.evaluation.retrieval import evaluate

    model = EDJEModel.from_pretrained(model_dir)
    processor = EDJEProcessor.from_pretrained(model_dir)
    rows = []
    for folder in folders:
        dataset = load_data(str(folder), splits=["test"])["test"]
        report = evaluate(dataset, first_stage, model, processor, k=depth, fusion=None)
        rows.append(
            [
                100 * m[key]
                for m in (report.first_stage_metrics, report.reranked_metrics)
                for key in METRICS
            ]
        )
    return rows


def main() -> None:
    from edje.first_stage import load_embedding_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="edje data build icons --out")
    parser.add_argument("--galleries", type=int, default=3, help="more galleries of 1,000")
    parser.add_argument("--out", type=Path, required=True, help="where the galleries go")
    parser.add_argument("--models", nargs="+", required=True, help="EDJE model folders")
    parser.add_argument("--depth", type=int, default=10, help="candidates reranked (default 10)")
    args = parser.parse_args()
    folders = [args.corpus / VALIDATION, *write_galleries(args.corpus, args.out, args.galleries)]
    first_stage = load_embedding_model(args.corpus / "first_stage")
    names = [VALIDATION] + [f.name for f in folders[1:]]
    print("| model | " + " | ".join(names) + " | mean |\n|---|" + "---|" * (len(names) + 1))
    for i, model_dir in enumerate(args.models):
        rows = recalls(model_dir, first_stage, folders, args.depth)
        if i == 0:
            print(_row("first stage", [r[:2] for r in rows]))
        print(_row(model_dir, [r[2:] for r in rows]), flush=True)


def _row(name: str, cells: list[list[float]]) -> str:
    mean = [sum(c[j] for c in cells) / len(cells) for j in (0, 1)]
    shown = [f"{t2i:.1f} / {i2t:.1f}" for t2i, i2t in cells]
    return f"| {name} | " + " | ".join(shown) + f" | **{mean[0]:.3f} / {mean[1]:.3f}** |"


if __name__ == "__main__":
    main()
