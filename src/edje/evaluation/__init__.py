"""Evaluation: a first stage proposes candidates, EDJE reranks (and fuses) them, R@k both ways.

- `edje.evaluation.retrieval`: `evaluate`, `choose_fusion_weights`, `with_fusion`;
- `edje.evaluation.metrics`: recall@k with ties counted against the query;
- `edje.evaluation.report`: `EvaluationReport` (JSON, markdown, plots, contact sheet);
- `edje.evaluation.zero_shot`: the icon corpus's zero-shot protocol (`zero_shot_icons`).
"""

from edje.evaluation.report import Candidates, EvaluationReport
from edje.evaluation.retrieval import (
    choose_fusion_weights,
    evaluate,
    image_token_source,
    rerank_candidates,
    search_both_ways,
    with_fusion,
)

__all__ = [
    "Candidates",
    "EvaluationReport",
    "choose_fusion_weights",
    "evaluate",
    "image_token_source",
    "rerank_candidates",
    "search_both_ways",
    "with_fusion",
]
