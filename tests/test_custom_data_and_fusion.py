"""Custom data and score fusion: one folder layout for fit and eval, fusion weights chosen on
validation and saved, fused scores as the formula says everywhere, and a loud warning when a
reranker makes retrieval worse."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from PIL import Image

from edje.commands import UsageError
from edje.data import load_data
from edje.evaluation import choose_fusion_weights, evaluate
from edje.evaluation.metrics import reranked_recall_at_k
from edje.evaluation.report import Candidates, EvaluationReport
from edje.first_stage import EmbeddingModel
from edje.fusion import FUSION_GRID, fuse
from edje.model_card import render_model_card
from edje.rerank import EDJEReranker
from edje.serving.app import RerankerBackend, create_app, serve_in_background
from edje.store import TokenStore
from tests.helpers.loopback import http_json
from tests.helpers.tiny import make_tiny_model, spread_weights_

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_split_folders(root, splits=("train", "test"), per_split=6):
    """`root/<split>/0000.png ...` with the same file names in every split folder."""
    for split in splits:
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(per_split):
            name = f"{i:04d}.png"
            Image.new("RGB", (28, 28), COLOURS[i % len(COLOURS)]).save(root / split / name)
            rows.append({"file_name": name, "caption": f"a {COLOURS[i % len(COLOURS)]} square"})
        (root / split / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    return root


class Colours(EmbeddingModel):
    """A first stage that knows colour words and pixel colours."""

    embedding_dim = 3

    def encode_texts(self, texts, batch_size=256, show_progress_bar=None):
        rows = [[float(c in t) + 0.01 for c in ("red", "green", "blue")] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)

    def encode_images(self, images, batch_size=64, show_progress_bar=None):
        rows = [[v / 255 + 0.01 for v in im.convert("RGB").getpixel((0, 0))] for im in images]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


# ---- one layout -----------------------------------------------------------------------------


def test_repeated_file_names_across_split_folders_get_unique_ids(tmp_path):
    splits = load_data(write_split_folders(tmp_path / "data"))
    assert sorted(splits) == ["test", "train", "validation"]
    ids = [i for split in splits.values() for i in split["image_id"]]
    assert len(ids) == len(set(ids)) == 12
    assert "test/0000" in splits["test"]["image_id"]
    # No validation folder: a fixed tenth of train is held out, the same on every load.
    assert len(splits["validation"]) == 1 and set(splits["validation"]["split"]) == {"validation"}
    again = load_data(tmp_path / "data")
    assert again["validation"]["image_id"] == splits["validation"]["image_id"]


def test_fit_and_eval_read_the_same_layout(tmp_path, offline_dinov2_dir):
    from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
    from edje.commands.eval import load_split
    from edje.training import EDJEDataModule

    root = write_split_folders(tmp_path / "data")
    module = EDJEDataModule(
        data=str(root), store=str(tmp_path / "raw.store"), vision=OFFLINE_VISION,
        vision_image_size=56, text=OFFLINE_TEXT, batch_size=2,
    )  # fmt: skip
    module.prepare_data()  # encodes every split: the repeated file names no longer collide
    module.setup("fit")
    store = TokenStore.open(tmp_path / "raw.store")
    for name, split in module.splits.items():
        assert all(i in store for i in split["image_id"]), name
    evaluated = load_split([str(root)], "test")
    assert evaluated["image_id"] == module.splits["test"]["image_id"]
    assert load_split(["folder", str(root)], "test")["image_id"] == evaluated["image_id"]


def test_encode_data_stores_the_ids_fit_and_eval_read(
    tmp_path, tiny_vision_encoder, tiny_image_processor
):
    """`edje encode --data FOLDER` reads the same layout (every split, or --split): the store
    holds exactly the ids `edje eval --data FOLDER --store` looks up."""
    from edje.cli import main
    from edje.commands.eval import load_split

    root = write_split_folders(tmp_path / "data")
    tiny_vision_encoder.save_pretrained(tmp_path / "vision")
    tiny_image_processor.save_pretrained(tmp_path / "vision")
    common = ["encode", "--vision", str(tmp_path / "vision"), "--data", str(root)]
    common += ["--accelerator", "cpu", "--devices", "1", "--num-workers", "0", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "all")]) == 0
    every = [i for split in load_data(root).values() for i in split["image_id"]]
    assert sorted(TokenStore.open(tmp_path / "all").ids) == sorted(every)
    assert main([*common, "--split", "test", "--out", str(tmp_path / "test")]) == 0
    test_ids = load_split([str(root)], "test")["image_id"]
    assert sorted(TokenStore.open(tmp_path / "test").ids) == sorted(test_ids)
    assert main([*common, "--split", "dev", "--out", str(tmp_path / "dev")]) == 0  # an alias
    validation_ids = load_split([str(root)], "validation")["image_id"]
    assert sorted(TokenStore.open(tmp_path / "dev").ids) == sorted(validation_ids)
    with pytest.raises(UsageError, match=r"has splits .*not \['holdout'\]"):
        main([*common, "--split", "holdout", "--out", str(tmp_path / "holdout")])
    assert not (tmp_path / "holdout").exists()


# ---- fusion ---------------------------------------------------------------------------------


def toy_candidates() -> Candidates:
    """Three captions, three images; the first stage ranks right, EDJE's logits wrong."""
    t2i = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    first = torch.tensor([[0.9, 0.5, 0.1]] * 3)
    rerank = torch.tensor([[0.0, 1.0, 0.5]] * 3)  # puts the right image second
    return Candidates(
        t2i=t2i, t2i_first=first, i2t=t2i.clone(), i2t_first=first.clone(),
        t2i_rerank=rerank, i2t_rerank=rerank.clone(), text_to_image=torch.arange(3),
    )  # fmt: skip


def toy_report(candidates: Candidates) -> EvaluationReport:
    return EvaluationReport.build(
        model="m", first_stage="f", dataset={"name": "toy", "split": "validation"},
        k=3, ks=[1], depths=[3], reranked_curves={}, curve_ks=[1],
        first_stage_curve={"image_retrieval_recall@1": 0.0, "text_retrieval_recall@1": 0.0},
        pairs_scored=0, seconds={}, device="cpu", first_stage_recall_from="",
        candidates=candidates,
    )  # fmt: skip


def test_fusion_weights_are_chosen_on_validation_from_a_grid_with_both_extremes():
    assert (1.0, 0.0) in FUSION_GRID and (0.0, 1.0) in FUSION_GRID
    choice = choose_fusion_weights(toy_report(toy_candidates()))
    by_weights = {row["weights"]: row["score"] for row in choice.table}
    assert by_weights[(1.0, 0.0)] == 0.0  # EDJE alone: always second
    assert by_weights[(0.0, 1.0)] == 100.0  # the first stage alone: always right
    assert choice.score == 100.0 and choice.weights != (1.0, 0.0)


def test_fused_recall_equals_the_formula(tiny_processor, tiny_vision_encoder):
    model = spread_weights_(make_tiny_model(tiny_processor, tiny_vision_encoder))
    from edje.data.schema import make_dataset

    colours = ["red", "green", "blue", "white"]
    images = [Image.new("RGB", (28, 28), c) for c in colours]
    captions = [[f"a {c} square"] for c in colours]
    ds = make_dataset(images, colours, captions, "test")
    weights = (1.0, 7.0)
    report = evaluate(ds, Colours(), model, tiny_processor, k=4, ks=(1, 2), fusion=weights,
                      device="cpu", show_progress_bar=False)  # fmt: skip
    c = report.candidates
    expected = reranked_recall_at_k(
        c.text_to_image,
        t2i_candidates=c.t2i, t2i_scores=c.t2i_rerank + 7.0 * c.t2i_first,
        i2t_candidates=c.i2t, i2t_scores=c.i2t_rerank + 7.0 * c.i2t_first, ks=[1, 2],
    )  # fmt: skip
    assert report.fused_metrics == expected
    assert report.fusion_weights == [1.0, 7.0]
    assert "| fused (top 4: 1 x EDJE + 7 x first stage) |" in report.to_markdown()


def test_export_saves_the_weights_chosen_on_validation(
    tiny_processor, tiny_vision_encoder, tmp_path
):
    from types import SimpleNamespace

    from edje import EDJEConfig
    from edje.data.schema import make_dataset
    from edje.training import ExportEDJE

    model = make_tiny_model(tiny_processor, tiny_vision_encoder)
    model.save_pretrained(tmp_path / "model", save_vision_encoder=True)
    tiny_processor.save_pretrained(tmp_path / "model")
    colours = ["red", "green", "blue"]
    validation = make_dataset([Image.new("RGB", (28, 28), c) for c in colours], colours,
                              [[f"a {c} square"] for c in colours], "validation")  # fmt: skip
    export = ExportEDJE(dirpath=str(tmp_path / "model"))
    loaded = type(model).from_pretrained(tmp_path / "model")
    datamodule = SimpleNamespace(first_stage=Colours(), store=None)
    fused = export._choose_fusion(loaded, tiny_processor, validation, datamodule)
    report = evaluate(validation, Colours(), loaded, tiny_processor, k=3, fusion=None,
                      device="cpu", show_progress_bar=False)  # fmt: skip
    best = choose_fusion_weights(report).weights
    # The validation report it returns carries the fused row for the weights it chose, as if
    # evaluated with them.
    direct = evaluate(validation, Colours(), loaded, tiny_processor, k=3, fusion=best,
                      device="cpu", show_progress_bar=False)  # fmt: skip
    assert fused.fusion_weights == list(best) and fused.fused_metrics == direct.fused_metrics
    saved = EDJEConfig.from_pretrained(tmp_path / "model")
    assert (saved.fusion_edje_weight, saved.fusion_first_stage_weight) == best
    again = type(model).from_pretrained(tmp_path / "model")
    assert again.config.fusion_first_stage_weight == best[1]


# ---- the guard ------------------------------------------------------------------------------


def test_a_reranker_worse_than_the_first_stage_is_called_out_in_report_and_card(
    tiny_processor, tiny_vision_encoder
):
    report = toy_report(toy_candidates())
    report.first_stage_metrics = {"image_retrieval_recall@1": 0.8, "text_retrieval_recall@1": 0.9}
    report.reranked_metrics = {"image_retrieval_recall@1": 0.1, "text_retrieval_recall@1": 0.95}
    warning = report.regressions()
    assert "reranked T2I R@1 10.0% < first stage 80.0%" in warning
    assert "I2T" not in warning and "fused score" in warning
    card = render_model_card(make_tiny_model(tiny_processor, tiny_vision_encoder),
                             warning=warning)  # fmt: skip
    first_lines = card.split("---", 2)[2].strip().splitlines()[:3]
    assert any(
        "**Warning.**" in line and "10.0% < first stage 80.0%" in line for line in first_lines
    )
    report.reranked_metrics = dict(report.first_stage_metrics)
    assert report.regressions() is None


# ---- rank_many and serve with first-stage scores --------------------------------------------


@pytest.fixture(scope="module")
def fused_reranker(tiny_processor, tiny_vision_encoder, tmp_path_factory):
    model = spread_weights_(make_tiny_model(tiny_processor, tiny_vision_encoder))
    model.config.fusion_edje_weight, model.config.fusion_first_stage_weight = 1.0, 20.0
    path = tmp_path_factory.mktemp("fusion") / "store"
    with TokenStore.create(path, token_shape=(4, 32), fingerprint=model.store_fingerprint()) as w:
        w.add([f"img{i}" for i in range(5)], torch.randn(5, 4, 32))
    return EDJEReranker(model, store=path, processor=tiny_processor, device="cpu")


def test_rank_many_and_rank_order_by_the_fused_score(fused_reranker):
    ids = [[f"img{i}" for i in range(5)]]
    first = [[0.5, 0.1, 0.9, 0.3, 0.7]]
    plain = fused_reranker.rank_many(["a red square"], ids)[0]
    logit = {h["image_id"]: float(torch.logit(torch.tensor(h["score"]))) for h in plain}
    fused = fused_reranker.rank_many(["a red square"], ids, first_stage_scores=first)[0]
    expected = {i: logit[i] + 20.0 * s for i, s in zip(ids[0], first[0], strict=True)}
    assert [h["image_id"] for h in fused] == sorted(expected, key=lambda i: -expected[i])
    for hit in fused:
        fused_score = float(torch.sigmoid(torch.tensor(expected[hit["image_id"]])))
        assert hit["score"] == pytest.approx(fused_score, abs=1e-5)
        assert hit["edje_score"] == pytest.approx(
            float(torch.sigmoid(torch.tensor(logit[hit["image_id"]]))), abs=1e-5
        )
    ranked = fused_reranker.rank("a red square", ids[0], first_stage_scores=first[0])
    assert [h["image_id"] for h in ranked] == [h["image_id"] for h in fused]


def test_rank_takes_first_stage_scores_as_a_tensor_and_refuses_a_wrong_count_unscored(
    fused_reranker, monkeypatch
):
    ids = [f"img{i}" for i in range(5)]
    first = [0.5, 0.1, 0.9, 0.3, 0.7]
    as_list = fused_reranker.rank("a red square", ids, first_stage_scores=first)
    as_tensor = fused_reranker.rank("a red square", ids, first_stage_scores=torch.tensor(first))
    assert as_tensor == as_list
    monkeypatch.setattr(fused_reranker.scorer, "score", None)  # scoring would raise TypeError
    with pytest.raises(ValueError, match=r"one first_stage_score per document \(5\), got 4"):
        fused_reranker.rank("a red square", ids, first_stage_scores=first[:4])


def test_serve_fuses_first_stage_scores_given_per_document(fused_reranker):
    ids = [f"img{i}" for i in range(5)]
    first = [0.5, 0.1, 0.9, 0.3, 0.7]
    logits = fused_reranker.predict([("a red square", i) for i in ids],
                                    activation_fn=torch.nn.Identity())  # fmt: skip
    expected = fuse(torch.tensor(logits), torch.tensor(first), (1.0, 20.0)).sigmoid()

    def post(url, payload):
        request = urllib.request.Request(f"{url}/v1/rerank", data=json.dumps(payload).encode())
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["results"]

    with serve_in_background(create_app(RerankerBackend(fused_reranker))) as url:
        results = post(url, {"query": "a red square", "documents": ids,
                             "first_stage_scores": first})  # fmt: skip
        plain = post(url, {"query": "a red square", "documents": ids})
    assert [r["index"] for r in results] == torch.argsort(expected, descending=True).tolist()
    for r in results:
        assert r["relevance_score"] == pytest.approx(float(expected[r["index"]]), abs=1e-5)
    assert {r["index"]: r["relevance_score"] for r in plain} == pytest.approx(
        {i: float(torch.sigmoid(torch.tensor(v))) for i, v in enumerate(logits)}, abs=1e-5
    )


def test_the_card_yaml_holds_a_model_index_equal_to_the_report(tiny_processor, tiny_vision_encoder):
    import yaml
    from huggingface_hub import ModelCard

    report = toy_report(toy_candidates())
    report.reranked_metrics = {"image_retrieval_recall@1": 0.333, "text_retrieval_recall@1": 0.667}
    report.fused_metrics = {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    model = make_tiny_model(tiny_processor, tiny_vision_encoder)
    card = render_model_card(model, report=report, repo_id="me/edje-toy",
                             datasets=["umaru97/flickr30k_train_val_test"])  # fmt: skip
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "edje" and metadata["metrics"] == ["recall"]
    assert metadata["license"] == "apache-2.0" and metadata["pipeline_tag"] == "text-ranking"
    assert metadata["datasets"] == ["umaru97/flickr30k_train_val_test"]
    (entry,) = metadata["model-index"]
    found = {m["name"]: m["value"] for result in entry["results"] for m in result["metrics"]}
    expected = {f"{row} {k}": v for row, table in (("reranked", report.reranked_metrics),
                ("fused", report.fused_metrics)) for k, v in table.items()}  # fmt: skip
    assert found == expected
    assert {r["dataset"]["split"] for r in entry["results"]} == {"validation"}
    # huggingface_hub reads the same metadata back.
    assert len(ModelCard(card).data.eval_results) == len(expected)


def test_fusion_keeps_the_first_stage_alone_unless_others_beat_it_by_more_than_chance():
    from edje.fusion import FIRST_STAGE_ALONE, choose_fusion, sign_test

    assert sign_test(3, 0) == 1 / 8 and sign_test(0, 0) == 1.0
    first = torch.tensor([1.0] * 30 + [0.0] * 30)
    lucky = first.clone()
    lucky[30:33] = 1.0  # three more hits on 60 queries: p = 1/8, chance
    grid = [(1.0, 0.0), (0.0, 1.0), (1.0, 5.0)]
    choice = choose_fusion(lambda w: lucky if w == (1.0, 5.0) else first, grid)
    assert choice.weights == FIRST_STAGE_ALONE and choice.score == 50.0
    assert {row["weights"]: round(row["p_value"], 3) for row in choice.table}[(1.0, 5.0)] == 0.125
    better = first.clone()
    better[30:45] = 1.0  # fifteen more, none fewer: p = 2^-15 < 0.05 / 2
    choice = choose_fusion(lambda w: better if w == (1.0, 5.0) else first, grid)
    assert choice.weights == (1.0, 5.0) and choice.score == 75.0


def test_per_query_hits_average_to_recall_at_1_each_way():
    from edje.evaluation.metrics import reranked_hits_at_1

    c = toy_candidates()
    c.t2i_rerank = torch.tensor([[0.0, 1.0, 0.5], [2.0, 1.0, 0.0], [0.0, 0.5, 1.0]])
    hits = reranked_hits_at_1(c.text_to_image, c.t2i, c.t2i_rerank, c.i2t, c.i2t_rerank)
    recall = reranked_recall_at_k(
        c.text_to_image, t2i_candidates=c.t2i, t2i_scores=c.t2i_rerank,
        i2t_candidates=c.i2t, i2t_scores=c.i2t_rerank, ks=[1],
    )  # fmt: skip
    assert len(hits) == 6
    assert hits[:3].mean() == pytest.approx(recall["image_retrieval_recall@1"])
    assert hits[3:].mean() == pytest.approx(recall["text_retrieval_recall@1"])


def test_first_stage_scores_past_float32_are_a_named_error_never_nan():
    with pytest.raises(ValueError, match=r"score 1e\+39 \(candidate 1\) is past float32's range"):
        fuse(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1e39], dtype=torch.float64), (1.0, 0.0))
    with pytest.raises(ValueError, match=r"score 1e\+38 x 20 \(candidate 0\)"):
        fuse(torch.tensor([1.0]), [1e38], (1.0, 20.0))


def test_serve_answers_overflowing_first_stage_scores_with_a_400(fused_reranker):
    payload = {"query": "a red square", "documents": ["img0", "img1"],
               "first_stage_scores": [0.5, 1e39]}  # fmt: skip
    with serve_in_background(create_app(RerankerBackend(fused_reranker))) as url:
        status, body = http_json(f"{url}/v1/rerank", payload)
        assert status == 400 and "past float32's range" in body["message"]
        assert http_json(f"{url}/health")[0] == 200  # and it goes on
