"""`edje.evaluation.zero_shot`: the icon corpus's zero-shot protocol chooses depth and fusion on
validation only, then reports every held-out set at that choice; its table and JSON say what
its reports hold; a corpus not built, or without its first stage, is refused naming the
command that makes it."""

from __future__ import annotations

import json

import pytest

from edje.evaluation.zero_shot import (
    HELD_OUT,
    KEYS,
    VALIDATION,
    choose_depth,
    corpus_first_stage,
    zero_shot_icons,
)


def by_depth(pairs: dict[int, tuple[float, float]]) -> dict[int, dict[str, float]]:
    return {d: dict(zip(KEYS, pair, strict=True)) for d, pair in pairs.items()}


def test_the_depth_with_the_best_mean_of_t2i_and_i2t_is_chosen():
    # Step 2,000's figures (docs/icons.md): depth 20 is best on both directions together,
    # though depth 100's I2T alone is not the lowest.
    chosen = by_depth({10: (0.056, 0.055), 20: (0.059, 0.059), 50: (0.054, 0.057),
                       100: (0.052, 0.058)})  # fmt: skip
    assert choose_depth(chosen) == 20
    # One direction's best is not enough: T2I peaks at 50, the two together at 10.
    assert choose_depth(by_depth({10: (0.04, 0.05), 50: (0.045, 0.03)})) == 10


def test_a_tie_keeps_the_shallower_depth_whatever_the_order():
    tied = {100: (0.5, 0.5), 10: (0.75, 0.25), 20: (0.25, 0.75)}  # sums exact in binary
    assert choose_depth(by_depth(tied)) == 10


@pytest.fixture(scope="module")
def shipped():
    from edje import EDJEModel, EDJEProcessor
    from edje.quickstart import shipped_checkpoint

    folder = shipped_checkpoint()
    return EDJEModel.from_pretrained(folder).eval(), EDJEProcessor.from_pretrained(folder)


def test_choices_come_from_validation_and_every_held_out_set_is_reported_at_them(
    icon_corpus, shipped
):
    from edje.evaluation import choose_fusion_weights
    from edje.first_stage import load_embedding_model

    corpus, manifest = icon_corpus
    first_stage = load_embedding_model(corpus_first_stage(corpus))
    order = []
    table = zero_shot_icons(*shipped, first_stage, corpus, depths=[1, 2], on_set=order.append)
    assert order == [VALIDATION, *HELD_OUT]  # validation is read, and chosen on, first
    validation = table.reports[VALIDATION]
    assert table.validation_by_depth == validation.reranked_by_depth
    assert sorted(table.validation_by_depth) == [1, 2]
    assert table.depth == choose_depth(validation.reranked_by_depth)
    # The weights are validation's best at the chosen depth, and every set is read with them.
    assert table.weights == tuple(choose_fusion_weights(validation).weights)
    for name, report in table.reports.items():
        assert report.dataset["images"] == manifest["eval_sets"][name], name
        assert report.k == table.depth and tuple(report.fusion_weights) == table.weights, name
    # The table prints each report's own numbers; the JSON holds them.
    markdown, saved = table.to_markdown(), json.loads(json.dumps(table.to_dict()))
    assert saved["depth"] == table.depth and saved["fusion_weights"] == list(table.weights)
    for name, report in table.reports.items():
        row = next(line for line in markdown.splitlines() if line.startswith(f"| `{name}` |"))
        for key in KEYS:
            values = [
                report.first_stage_metrics[key],
                report.reranked_metrics[key],
                report.fused_metrics[key],
                report.curves["first_stage"][key.split("_recall")[0]][table.depth - 1],
            ]
            assert "{:.1f} / {:.1f} / {:.1f} ({:.1f})".format(*(100 * v for v in values)) in row
        for stage in ("first_stage_metrics", "reranked_metrics", "fused_metrics"):
            assert saved["sets"][name][stage] == pytest.approx(getattr(report, stage)), name


def test_validation_only_reads_no_held_out_set(icon_corpus, shipped):
    from edje.first_stage import load_embedding_model

    corpus, _ = icon_corpus
    first_stage = load_embedding_model(corpus_first_stage(corpus))
    order = []
    table = zero_shot_icons(
        *shipped, first_stage, corpus, validation_only=True, on_set=order.append
    )
    assert order == [VALIDATION] and list(table.reports) == [VALIDATION]


def test_no_depth_to_choose_from_is_refused_before_any_set_is_read(tmp_path):
    order = []
    with pytest.raises(ValueError, match="at least one depth"):
        zero_shot_icons(None, None, None, tmp_path, depths=[], on_set=order.append)
    assert order == []


def test_a_corpus_not_built_or_without_its_first_stage_is_refused_naming_the_command(tmp_path):
    with pytest.raises(ValueError, match=f"edje data build icons --out {tmp_path}"):
        corpus_first_stage(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=f"edje data first-stage {tmp_path}"):
        corpus_first_stage(tmp_path)
