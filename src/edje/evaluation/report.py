"""What `edje.evaluation.evaluate` returns and writes: JSON, a markdown table, PNG plots.

`EvaluationReport.save(out_dir)` writes, each file atomically (temporary file + rename):

- `report.json`: model, data, k, first-stage and reranked metrics (clip_benchmark's names
  and 0-1 scale), recall curves, pairs scored, seconds, device; `EvaluationReport.from_json`
  reads it back;
- `report.md`: first stage vs reranked, R@1/5/10 both ways;
- `recall_at_k.png`: recall@k against k for both stages, both directions;
- `contact_sheet.png` (with `contact_sheet=N` and the data set): N captions, each with the
  first stage's top 5 images above the reranked top 5, the correct image outlined.

Example:
    >>> from edje.evaluation.report import EvaluationReport
    >>> report = EvaluationReport.build(
    ...     model=None, first_stage="toy", dataset={"name": "toy", "split": "test",
    ...     "images": 2, "captions": 2}, k=1, ks=[1], depths=[1],
    ...     first_stage_curve={"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.5},
    ...     reranked_curves={}, curve_ks=[1], pairs_scored=0, seconds={"total": 0.1},
    ...     device="cpu", first_stage_recall_from="full score matrix")
    >>> EvaluationReport.from_json(report.to_json()) == report
    True
    >>> print(report.to_markdown().splitlines()[-1])
    | first stage | 50.0 | 50.0 |
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edje._utils import atomic_write, require
from edje.evaluation.metrics import I2T_KEY, T2I_KEY
from edje.ranking import best_first

__all__ = ["Candidates", "EvaluationReport", "draw_contact_sheet", "plot_recall_curves"]

DIRECTIONS = {"image_retrieval": T2I_KEY, "text_retrieval": I2T_KEY}
SHORT = {"image_retrieval": "T2I", "text_retrieval": "I2T"}


@dataclass
class Candidates:
    """First-stage candidate lists (best first) and, after reranking, EDJE's logits for them.

    `t2i[t]`: image rows proposed for caption `t`; `i2t[i]`: caption indices proposed for
    image `i`; `*_first`: the first stage's scores; `*_rerank`: EDJE's logits.
    """

    t2i: torch.Tensor
    t2i_first: torch.Tensor
    i2t: torch.Tensor
    i2t_first: torch.Tensor
    t2i_rerank: torch.Tensor | None = None
    i2t_rerank: torch.Tensor | None = None
    text_to_image: torch.Tensor | None = None  # the image row of each caption

    def truncate(self, depth: int) -> Candidates:
        """The first `depth` candidates of every list."""
        lists = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[:, :depth]
            for f in dataclasses.fields(self)
            if f.name != "text_to_image"
        }
        return Candidates(**lists, text_to_image=self.text_to_image)


@dataclass
class EvaluationReport:
    """Two-stage retrieval results. Metric dicts map clip_benchmark names to percentages.

    Attributes:
        model: the reranker's name or folder (`None`: first stage only).
        first_stage: the embedding model's name.
        dataset: `{"name", "split", "images", "captions"}`.
        k: the rerank depth reported as "reranked"; `depths` lists every depth evaluated.
        ks: the cut-offs of `first_stage_metrics` and `reranked_metrics`.
        first_stage_metrics, reranked_metrics: recall@ks (`reranked_metrics` at depth k;
            empty without a model); `reranked_by_depth`: the same for every depth.
        fused_metrics: recall@ks at depth k of the fused score (`edje.fusion`) with
            `fusion_weights`; empty when no weights were given.
        curves: `{"k": [1..], "first_stage": {direction: [...]}, "reranked": {depth: {...}}}`.
        pairs_scored: (caption, image) pairs the reranker scored; `seconds`: wall time per
            phase (embed: first stage; search; image_tokens; rerank: scoring; total).
        first_stage_recall_from: `"full score matrix"` or `"faiss candidates"`.
        candidates: the candidate lists and scores (kept in memory, not in the JSON).
    """

    model: str | None
    first_stage: str
    dataset: dict[str, Any]
    k: int
    ks: list[int]
    depths: list[int]
    first_stage_metrics: dict[str, float]
    reranked_metrics: dict[str, float]
    reranked_by_depth: dict[int, dict[str, float]]
    curves: dict[str, Any]
    pairs_scored: int
    seconds: dict[str, float]
    device: str
    first_stage_recall_from: str
    ties: str = "worst"
    fused_metrics: dict[str, float] = field(default_factory=dict)
    fusion_weights: list[float] | None = None
    candidates: Candidates | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        *,
        first_stage_curve: dict[str, float],
        reranked_curves: dict[int, dict[str, float]],
        curve_ks: list[int],
        fused_curve: dict[str, float] | None = None,
        ks: list[int],
        k: int,
        **fields: Any,
    ) -> EvaluationReport:
        """Assemble a report from recall curves (metric name -> value at every k in curve_ks)."""

        def at(curve: dict[str, float], cutoffs) -> dict[str, float]:
            return {
                key.format(k=c): curve[key.format(k=c)]
                for key in (T2I_KEY, I2T_KEY)
                for c in cutoffs
            }

        def series(curve: dict[str, float]) -> dict[str, list[float]]:
            return {d: [curve[key.format(k=c)] for c in curve_ks] for d, key in DIRECTIONS.items()}

        by_depth = {depth: at(curve, ks) for depth, curve in reranked_curves.items()}
        return cls(
            k=k,
            ks=list(ks),
            first_stage_metrics=at(first_stage_curve, ks),
            reranked_metrics=by_depth.get(k, {}),
            reranked_by_depth=by_depth,
            fused_metrics=at(fused_curve, ks) if fused_curve else {},
            curves={
                "k": list(curve_ks),
                "first_stage": series(first_stage_curve),
                "reranked": {depth: series(curve) for depth, curve in reranked_curves.items()},
            },
            **fields,
        )

    def regressions(self) -> str | None:
        """What to tell a user when reranking (or fusing) lowers R@1 below the first stage's,
        with the numbers and what to try; None when it does not."""
        worse = []
        for label, metrics in (("reranked", self.reranked_metrics), ("fused", self.fused_metrics)):
            for direction, key in DIRECTIONS.items():
                name = key.format(k=1)
                if name in metrics and metrics[name] < self.first_stage_metrics.get(name, 0):
                    first = self.first_stage_metrics[name]
                    worse.append(f"{label} {SHORT[direction]} R@1 {metrics[name]:.1%} < first "
                                 f"stage {first:.1%}")  # fmt: skip
        if not worse:
            return None
        return (
            f"on {self.dataset.get('name')} ({self.dataset.get('split')}) this reranker makes "
            f"retrieval worse than the first stage alone: {'; '.join(worse)}. Rank with the "
            "fused score (fusion weights chosen on validation data, as edje fit's export does), "
            "or train longer, with more data or a higher learning rate, from a stronger "
            "starting model."
        )

    @property
    def pairs_per_second(self) -> float | None:
        seconds = self.seconds.get("rerank")
        return round(self.pairs_scored / seconds, 1) if self.pairs_scored and seconds else None

    # -- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything but the candidate tensors, JSON-ready (depth keys become strings)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("candidates")
        out["reranked_by_depth"] = {str(d): m for d, m in self.reranked_by_depth.items()}
        out["curves"] = {
            **self.curves,
            "reranked": {str(d): c for d, c in self.curves["reranked"].items()},
        }
        out["pairs_per_second"] = self.pairs_per_second
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        data["reranked_by_depth"] = {int(d): m for d, m in data["reranked_by_depth"].items()}
        curves = dict(data["curves"])
        curves["reranked"] = {int(d): c for d, c in curves["reranked"].items()}
        data["curves"] = curves
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> EvaluationReport:
        return cls.from_dict(json.loads(text))

    # -- markdown ----------------------------------------------------------------------------

    def to_markdown(self) -> str:
        """Header lines and a table: first stage vs reranked at every depth, R@ks both ways, in
        percent."""
        data = self.dataset
        lines = [
            f"**model** {self.model or '(none: first stage only)'} · "
            f"**first stage** {self.first_stage}",
            f"**data** {data.get('name')} ({data.get('split')}): {data.get('images')} images, "
            f"{data.get('captions')} captions · **device** {self.device} · "
            f"**time** {self.seconds.get('total', 0):.1f} s"
            + (
                f" · **pairs** {self.pairs_scored} ({self.pairs_per_second} /s)"
                if self.pairs_scored
                else ""
            ),
            "",
        ]
        columns = [f"{SHORT[d]} R@{c}" for d in DIRECTIONS for c in self.ks]
        lines += ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        rows = [("first stage", self.first_stage_metrics)]
        rows += [(f"reranked (top {d})", m) for d, m in sorted(self.reranked_by_depth.items())]
        if self.fused_metrics:
            edje_weight, first_weight = self.fusion_weights
            label = f"fused (top {self.k}: {edje_weight:g} x EDJE + {first_weight:g} x first stage)"
            rows.append((label, self.fused_metrics))
        for label, metrics in rows:
            values = [metrics[key.format(k=c)] for key in DIRECTIONS.values() for c in self.ks]
            lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
        return "\n".join(lines) + "\n"

    # -- files -------------------------------------------------------------------------------

    def save(
        self,
        out_dir: str | os.PathLike,
        *,
        plot: bool = True,
        dataset: Any = None,
        contact_sheet: int = 0,
    ) -> dict[str, Path]:
        """Write report.json, report.md, recall_at_k.png and (`contact_sheet=N` with the
        data set evaluated) contact_sheet.png; returns their paths by kind."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "report.json", "markdown": folder / "report.md"}
        json_text, markdown = self.to_json(), self.to_markdown()
        atomic_write(paths["json"], lambda temp: Path(temp).write_text(json_text))
        atomic_write(paths["markdown"], lambda temp: Path(temp).write_text(markdown))
        if plot and _can_plot():
            paths["plot"] = folder / "recall_at_k.png"
            atomic_write(paths["plot"], lambda temp: plot_recall_curves(self, temp))
        if contact_sheet:
            if dataset is None or self.candidates is None:
                raise ValueError(
                    "EvaluationReport.save: contact_sheet needs the evaluated data set "
                    "(dataset=...) and a report from evaluate() (with its candidates)"
                )
            paths["contact_sheet"] = folder / "contact_sheet.png"
            sheet = draw_contact_sheet(self, dataset, contact_sheet)
            atomic_write(paths["contact_sheet"], lambda temp: sheet.save(temp, format="PNG"))
        return paths


# ---- pictures ----


def _can_plot() -> bool:
    """Whether matplotlib is installed; without it (edje's core install) the plot is left out,
    with a warning naming the extra, and the JSON and markdown are still written."""
    try:
        require("matplotlib", "plots", "recall_at_k.png")
    except ImportError as error:
        warnings.warn(f"{error}; the report is written without it", stacklevel=3)
        return False
    return True


def plot_recall_curves(report: EvaluationReport, path: str | os.PathLike) -> None:
    """Recall@k against k, first stage and reranked (one line per depth), both directions.

    Drawn on a bare Agg canvas: no pyplot, so a user's matplotlib backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    ks = report.curves["k"]
    titles = {"image_retrieval": "text -> image", "text_retrieval": "image -> text"}
    for column, direction in enumerate(DIRECTIONS):
        axes = figure.add_subplot(1, 2, column + 1)
        first = [100 * r for r in report.curves["first_stage"][direction]]  # percent
        axes.plot(ks, first, marker=".", color="0.4", label="first stage")
        for depth, curve in sorted(report.curves["reranked"].items()):
            percent = [100 * r for r in curve[direction]]
            axes.plot(ks, percent, marker=".", label=f"reranked (top {depth})")
        axes.set_xscale("log")
        axes.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if t <= ks[-1]])
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("k")
        axes.set_ylabel(f"{direction}_recall@k (%)")
        axes.set_ylim(0, 101)
        axes.set_title(titles[direction])
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right")
    figure.suptitle(f"{report.dataset.get('name')} ({report.dataset.get('split')})")
    figure.tight_layout()
    figure.savefig(path, format="png")


THUMB, PAD, LABEL_WIDTH, TEXT_HEIGHT, SHOWN = 96, 6, 92, 18, 5


def draw_contact_sheet(report: EvaluationReport, dataset: Any, n_queries: int):
    """A PIL image: for `n_queries` captions spread over the data set, the caption, the first
    stage's top 5 images and (with a reranker) EDJE's top 5, the correct image outlined green.
    """
    from PIL import Image, ImageDraw

    from edje.data import flatten_captions

    candidates = report.candidates
    texts, text_to_image = flatten_captions(dataset)
    queries = torch.linspace(0, len(texts) - 1, min(n_queries, len(texts))).round().long()
    rows = [("first stage", candidates.t2i)]
    if candidates.t2i_rerank is not None:
        order = best_first(candidates.t2i_rerank).to(candidates.t2i.device)
        rows.append(("reranked", candidates.t2i.gather(1, order)))
    shown = min(SHOWN, candidates.t2i.shape[1])
    block = TEXT_HEIGHT + len(rows) * (THUMB + PAD) + PAD
    sheet = Image.new(
        "RGB", (LABEL_WIDTH + shown * (THUMB + PAD) + PAD, block * len(queries)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for q, text in enumerate(queries.tolist()):
        top = q * block
        draw.text((PAD, top + 3), f"{texts[text]}"[:110], fill="black")
        for r, (label, ranked) in enumerate(rows):
            y = top + TEXT_HEIGHT + r * (THUMB + PAD)
            draw.text((PAD, y + THUMB // 2 - 6), label, fill="black")
            for c, image_row in enumerate(ranked[text, :shown].tolist()):
                x = LABEL_WIDTH + c * (THUMB + PAD)
                thumb = dataset[image_row]["image"].convert("RGB").resize((THUMB, THUMB))
                sheet.paste(thumb, (x, y))
                if image_row == int(text_to_image[text]):
                    draw.rectangle(
                        (x - 3, y - 3, x + THUMB + 2, y + THUMB + 2), outline=(0, 170, 0), width=3
                    )
    return sheet
