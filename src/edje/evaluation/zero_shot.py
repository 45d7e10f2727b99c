"""Zero-shot on the icon corpus's held-out sets, the paper's Flickr30k protocol offline: the
first stage's top k, EDJE's reranking and the fused score, T2I and I2T R@1, one row per set,
beside the first stage's R@k (the most reranking can reach).

Everything the protocol chooses is chosen on `icons-validation`, never on a held-out set: the
depth (of those offered, the one whose reranked R@1, T2I and I2T averaged, is highest; the
shallower on a tie), then the fusion weights at that depth (docs/icons.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from edje.evaluation.report import EvaluationReport

VALIDATION = "icons-validation"
HELD_OUT = (
    "icons-heldout-concepts",
    "icons-heldout-noto",
    "icons-heldout-emojione",
    "icons-heldout-style",
    "icons-heldout-set",
)
KEYS = ("image_retrieval_recall@1", "text_retrieval_recall@1")  # T2I, I2T
DIRECTIONS = {key: key.split("_recall")[0] for key in KEYS}  # the report's curve names


@dataclasses.dataclass
class ZeroShotTable:
    """One report per set (validation first, where `depth` and `weights` were chosen) and
    validation's reranked R@1 at every depth offered."""

    depth: int
    weights: tuple[float, float]
    reports: dict[str, EvaluationReport]
    validation_by_depth: dict[int, dict[str, float]]

    def to_markdown(self) -> str:
        tried = ", ".join(
            f"{d}: " + " / ".join(f"{100 * by[key]:.1f}" for key in KEYS)
            for d, by in sorted(self.validation_by_depth.items())
        )
        head = f"R@1 first / reranked / fused (first R@{self.depth})"
        lines = [
            f"{VALIDATION} reranked R@1 T2I / I2T by depth: {tried}",
            f"depth chosen on {VALIDATION}: {self.depth}",
            f"fusion weights (EDJE, first stage) chosen on {VALIDATION}: {self.weights}",
            "",
            f"| set | images | T2I {head} | I2T {head} |",
            "|---|---:|---|---|",
        ]
        for name, report in self.reports.items():
            cells = [" / ".join(_cell(report, key, self.depth)) for key in KEYS]
            lines.append(f"| `{name}` | {report.dataset['images']} | {cells[0]} | {cells[1]} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "depth": self.depth,
            "depths_tried": sorted(self.validation_by_depth),
            "fusion_weights": list(self.weights),
            "sets": {name: report.to_dict() for name, report in self.reports.items()},
        }


def _cell(report: EvaluationReport, key: str, depth: int) -> list[str]:
    values = [report.first_stage_metrics[key], report.reranked_metrics[key]]
    values.append(report.fused_metrics.get(key, float("nan")))
    ceiling = report.curves["first_stage"][DIRECTIONS[key]][depth - 1]
    return [f"{100 * v:.1f}" for v in values[:2]] + [f"{100 * values[2]:.1f} ({100 * ceiling:.1f})"]


def choose_depth(validation_by_depth: dict[int, dict[str, float]]) -> int:
    """The depth whose reranked R@1 (T2I and I2T averaged) is highest; the shallower on a tie."""
    by_depth = validation_by_depth
    return max(sorted(by_depth), key=lambda d: (sum(by_depth[d][key] for key in KEYS), -d))


def corpus_first_stage(corpus: str | Path) -> Path:
    """The first stage `edje data first-stage corpus` fits, checked before any work: a
    `ValueError` naming the command that makes what is missing."""
    from edje.first_stage import CONFIG_NAME

    corpus = Path(corpus)
    if not (corpus / "manifest.json").is_file():
        raise ValueError(
            f"{corpus} is no built icon corpus (no manifest.json): build it with "
            f"`edje data build icons --out {corpus}`"
        )
    first_stage = corpus / "first_stage"
    if not (first_stage / CONFIG_NAME).is_file():
        raise ValueError(
            f"{corpus} has no first stage ({first_stage} is missing): fit it with "
            f"`edje data first-stage {corpus}`"
        )
    return first_stage


def zero_shot_icons(
    model,
    processor,
    first_stage,
    corpus: str | Path,
    *,
    depths: Sequence[int] = (10,),
    validation_only: bool = False,
    on_set: Callable[[str], None] | None = None,
) -> ZeroShotTable:
    """Rerank each set of a built corpus (`edje data build icons --out corpus`) with `model`
    over `first_stage` (the corpus's, `edje data first-stage`): validation at every depth of
    `depths` to choose the depth and the fusion weights, then the held-out sets at that depth
    (none with `validation_only`). `on_set(name)` is called before each set (progress)."""
    from edje.evaluation.retrieval import choose_fusion_weights, with_fusion

    depths = sorted({int(d) for d in depths})  # an iterator is read once
    if not depths or depths[0] < 1:
        raise ValueError(f"zero_shot_icons: depths must be at least one depth >= 1, got {depths}")

    def run(name: str, weights, set_depths) -> EvaluationReport:
        if on_set is not None:
            on_set(name)
        return _evaluate_set(name, corpus, first_stage, model, processor, weights, set_depths)

    validation = run(VALIDATION, None, depths)
    by_depth = validation.reranked_by_depth
    depth = choose_depth(by_depth)
    validation = dataclasses.replace(validation, k=depth, reranked_metrics=by_depth[depth])
    weights = tuple(choose_fusion_weights(validation).weights)
    reports = {VALIDATION: with_fusion(validation, weights)}
    shallower = [d for d in depths if d <= depth]  # free: prefixes of the depth's lists
    for name in () if validation_only else HELD_OUT:
        reports[name] = run(name, weights, shallower)
    return ZeroShotTable(depth, weights, reports, dict(by_depth))


def _evaluate_set(name, corpus, first_stage, model, processor, weights, depths):
    from edje.data import load_data
    from edje.evaluation.retrieval import evaluate

    dataset = load_data(name, data_dir=str(corpus), splits=["test"])["test"]
    return evaluate(
        dataset, first_stage, model, processor, k=max(depths), extra_k=depths,
        fusion=weights, dataset_name=name,
    )  # fmt: skip
