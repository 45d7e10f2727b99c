"""Model cards for saved EDJE models, filled from `model_cards/edje.md`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from edje._utils import atomic_write

CARD_TEMPLATE = "edje.md"
LICENSE = "apache-2.0"  # edje's, and the text encoders' it starts from (all-MiniLM-L6-v2, BERT)
PIPELINE_TAG = "text-ranking"  # as sentence-transformers tags a one-logit CrossEncoder


def render_model_card(
    model: Any,
    *,
    repo_id: str | None = None,
    results: str | None = None,
    compact: bool = False,
    warning: str | None = None,
    report: Any = None,
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
    license: str = LICENSE,
) -> str:
    """The model card text for `model`.

    Args:
        model: an `EDJEModel`.
        repo_id: the Hub id the card names the model by and loads it from (default: "EDJE
            reranker" and a folder path).
        results: results in markdown (default: "Not evaluated yet.").
        compact: the weights were saved with `save_pretrained(compact=True)`.
        warning: put first, as a quote (e.g. that reranking lowers recall).
        report: an `EvaluationReport` (or several) whose reranked (and fused) recall goes into
            the card's `model-index`.
        tags: more tags.
        datasets: the Hub ids of the training data.
        license: the card's license (default: edje's).
    """
    config = model.config
    text = config.text_config
    m, d = config.image_token_shape
    if config.adapter_type != "local":
        adapter = f"{m} learned queries, cross-attention with {config.adapter_num_heads} heads"
    else:
        adapter = "local: per-token MLP, no compression"
    card_data = _card_data(config, repo_id, report, tags, datasets, license)
    loading_note = _loading_note(config, repo_id, compact)
    template = Template(resources.files("edje.model_cards").joinpath(CARD_TEMPLATE).read_text())
    return template.substitute(
        card_data=card_data.to_yaml(),
        model_name=repo_id or "EDJE reranker",
        repo_id=repo_id or "path/to/this/folder",
        vision_encoder=config.vision_encoder_name,
        vision_num_tokens=config.vision_num_tokens,
        vision_hidden_size=config.vision_hidden_size,
        adapter=adapter,
        tokens_per_image=m,
        hidden_size=d,
        bytes_per_image=f"{m * d * 2:,}",
        num_layers=text.num_hidden_layers,
        max_caption_length=config.max_caption_length,
        num_parameters=f"{sum(p.numel() for p in model.parameters()):,}",
        loading_note=loading_note,
        results=results or "Not evaluated yet.",
        warning=f"> **Warning.** {warning}\n\n" if warning else "",
    )


def _card_data(config, repo_id, report, tags, datasets, license: str) -> ModelCardData:
    """The card's YAML header: library, tags, base models, and the reports' recall."""
    reports = [] if report is None else report if isinstance(report, list) else [report]
    return ModelCardData(
        library_name="edje",
        license=license,
        pipeline_tag=PIPELINE_TAG,
        datasets=datasets or None,
        tags=list(
            dict.fromkeys(
                ["edje", "reranker", "image-text-retrieval", "vision-language", *(tags or [])]
            )
        ),
        base_model=[n for n in (config.vision_encoder_name, config.base_text_encoder) if _hub(n)]
        or None,
        metrics=["recall"] if reports else None,
        model_name=repo_id or "EDJE reranker",
        eval_results=[r for one in reports for r in eval_results(one)] or None,
    )


def _loading_note(config, repo_id: str | None, compact: bool) -> str:
    """How the saved weights load: compact ones need their base text encoder (and edje, for an
    offline one); full ones load without edje through the code saved beside them."""
    if compact and str(config.base_text_encoder).startswith("edje:"):
        return (
            f"These weights are compact: only what differs from `{config.base_text_encoder}` "
            "(the text encoder the joint encoder started from), in fp16. Loading them needs "
            "`pip install edje`, which takes the rest from that encoder by name."
        )
    if compact:
        return (
            f"These weights are compact: only what differs from `{config.base_text_encoder}` "
            "(the text encoder the joint encoder started from), in fp16; loading takes the rest "
            "from it. Without edje installed, `AutoModel.from_pretrained(folder, "
            "trust_remote_code=True)` loads them from the code saved beside the weights."
        )
    folder = repo_id or "path/to/this/folder"
    return (
        f'Without edje installed, `AutoModel.from_pretrained("{folder}", '
        "trust_remote_code=True)` loads the same model from the code saved beside the weights."
    )


def write_model_card(model: Any, save_directory: str | Path, **kwargs: Any) -> Path:
    """Write `README.md` into `save_directory`; kwargs go to `render_model_card`."""
    path = Path(save_directory) / "README.md"
    card = render_model_card(model, **kwargs)
    # A new file renamed into place: a link at README.md is replaced, never written through.
    atomic_write(path, lambda temp: Path(temp).write_text(card, encoding="utf-8"))
    return path


def eval_results(report: Any) -> list[EvalResult]:
    """The report's reranked and fused recall@k, both ways, as `model-index` entries."""
    dataset = report.dataset.get("name") or "evaluation"
    results = []
    for row, metrics in (("reranked", report.reranked_metrics), ("fused", report.fused_metrics)):
        for name, value in sorted(metrics.items()):
            results.append(
                EvalResult(
                    task_type="image-text-retrieval",
                    task_name="Image-text retrieval (reranked top k)",
                    dataset_type=str(dataset),
                    dataset_name=str(dataset),
                    dataset_split=report.dataset.get("split"),
                    metric_type="recall",
                    metric_name=f"{row} {name}",
                    metric_value=float(value),
                    metric_config=f"{row}@{report.k}",
                )
            )
    return results


def _hub(name: str | None) -> bool:
    """Whether a backbone name is a Hub id (`owner/name`), not an edje offline name or a path."""
    return bool(name) and name.count("/") == 1 and ":" not in name and not Path(name).exists()
