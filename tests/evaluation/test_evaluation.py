"""Two-stage evaluation on a tiny random EDJE: metrics recomputed independently, files, CLI."""

from __future__ import annotations

import copy
import doctest
import importlib
import json
import re
import zlib

import pytest
import torch
from datasets import concatenate_datasets

from edje.commands import UsageError
from edje.evaluation import evaluate
from edje.evaluation.metrics import recall_at_k, reranked_recall_at_k
from edje.evaluation.report import EvaluationReport
from edje.first_stage import EmbeddingModel

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
RGB = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
       "yellow": (235, 205, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}  # fmt: skip
K, EXTRA_K, KS = 5, (2, 10), (1, 5, 10)


def _jitter(key: bytes, dim: int) -> torch.Tensor:
    """A small fixed vector per item, so that no two scores tie."""
    return torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(key)))


class ColourEmbedding(EmbeddingModel):
    """A cheap first stage that knows colours: captions count colour words, images count pixels
    of each colour. Enough signal to rank, and no ties."""

    embedding_dim = len(COLOURS)
    name = "colour-counts"

    def encode_texts(self, texts, batch_size=256, show_progress_bar=None):
        rows = [
            torch.tensor([float(c in t.split()) for c in COLOURS]) + 0.05 * _jitter(t.encode(), 6)
            for t in texts
        ]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def encode_images(self, images, batch_size=64, show_progress_bar=None):
        rows = []
        for image in images:
            data = image.convert("RGB").tobytes()
            pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 3)
            counts = torch.stack([(pixels == torch.tensor(RGB[c])).all(1).sum() for c in COLOURS])
            rows.append(counts.float() / len(pixels) + 0.05 * _jitter(data, 6))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


# Tiny models: one thread is faster than two competing for busy cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dataset():
    from edje.data import make_builtin_dataset

    sizes = dict(n_train_triplets=1, n_train_single=0, n_val_triplets=0, n_test_triplets=4)
    return make_builtin_dataset(seed=0, **sizes)["test"]  # 12 images, 24 captions


@pytest.fixture(scope="module")
def reranker(tiny_processor, tiny_vision_encoder):
    """A tiny random EDJE shared by the module (tests that change weights build their own)."""
    from edje import EDJEModel
    from tests.helpers.tiny import make_tiny_config

    torch.manual_seed(0)
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    return EDJEModel(config, vision_encoder=tiny_vision_encoder).eval()


@pytest.fixture(scope="module")
def report(tiny_dataset, reranker, tiny_processor):
    return evaluate(
        tiny_dataset,
        ColourEmbedding(),
        reranker,
        tiny_processor,
        k=K,
        extra_k=EXTRA_K,
        ks=KS,
        batch_size=16,
        device="cpu",
        dataset_name="builtin",
        show_progress_bar=False,
    )


def _compressed_tokens(model, processor, dataset) -> torch.Tensor:
    images = [image.convert("RGB") for image in dataset["image"]]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.compress(model.encode_images(pixels))


def test_docstring_examples_run():
    for name in ("edje.evaluation.retrieval", "edje.evaluation.report", "edje.fusion"):
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, name


def test_report_structure(report, tiny_dataset):
    keys = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in KS}
    assert set(report.first_stage_metrics) == keys
    assert set(report.reranked_metrics) == keys
    assert sorted(report.reranked_by_depth) == [2, 5, 10] and report.depths == [2, 5, 10]
    assert report.dataset == {"name": "builtin", "split": "test", "images": 12, "captions": 24}
    assert report.first_stage == "colour-counts" and report.device == "cpu"
    # The deepest list (10) is scored once, both ways.
    assert report.pairs_scored == (24 + 12) * 10
    assert report.candidates.t2i.shape == (24, 10) and report.candidates.i2t.shape == (12, 10)
    assert report.curves["k"] == list(range(1, 11))
    assert {"embed", "search", "image_tokens", "rerank", "total"} <= set(report.seconds)
    assert report.first_stage_recall_from == "full score matrix"


def test_first_stage_recall_is_recall_at_k_on_the_full_matrix(report, tiny_dataset):
    from edje.data import flatten_captions

    texts, text_to_image = flatten_captions(tiny_dataset)
    model = ColourEmbedding()
    scores = model.encode_texts(texts) @ model.encode_images(tiny_dataset["image"]).T
    assert report.first_stage_metrics == recall_at_k(scores, text_to_image, ks=KS)
    # The candidates are the exact top 10 (the jitter leaves no ties).
    assert torch.equal(report.candidates.t2i, scores.topk(10, dim=1).indices)
    assert torch.equal(report.candidates.i2t, scores.T.topk(10, dim=1).indices)


def test_reranked_recall_matches_scores_recomputed_pair_by_pair(
    report, tiny_dataset, reranker, tiny_processor
):
    from edje.data import flatten_captions

    texts, text_to_image = flatten_captions(tiny_dataset)
    tokens = _compressed_tokens(reranker, tiny_processor, tiny_dataset)
    cands = report.candidates

    def logits(text, images) -> torch.Tensor:  # one query's list, as the processor pairs it
        with torch.no_grad():
            return reranker(**tiny_processor(text=text, image_tokens=tokens[images])).logits

    t2i = torch.stack([logits(texts[t], cands.t2i[t]) for t in range(24)])
    i2t = torch.stack([logits([texts[t] for t in cands.i2t[i]], [i]) for i in range(12)])
    torch.testing.assert_close(cands.t2i_rerank, t2i, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cands.i2t_rerank, i2t, atol=1e-4, rtol=1e-4)
    for depth in (2, 5, 10):
        expected = reranked_recall_at_k(
            text_to_image,
            t2i_candidates=cands.t2i[:, :depth],
            t2i_scores=t2i[:, :depth],
            i2t_candidates=cands.i2t[:, :depth],
            i2t_scores=i2t[:, :depth],
            ks=[k for k in KS if k <= depth],
        )
        for name, value in report.reranked_by_depth[depth].items():
            k = int(name.rsplit("@", 1)[1])
            # Past the depth the reranked top k holds the first stage's items: same recall.
            reference = expected[name] if k <= depth else report.first_stage_metrics[name]
            assert value == pytest.approx(reference), (depth, name)


def test_a_model_scoring_every_pair_the_same_does_not_improve_recall(
    tiny_dataset, tiny_model, tiny_processor
):
    with torch.no_grad():
        tiny_model.itm_head.weight.zero_()
        tiny_model.itm_head.bias.zero_()
    report = evaluate(
        tiny_dataset, ColourEmbedding(), tiny_model, tiny_processor, k=K, show_progress_bar=False
    )
    assert (report.candidates.t2i_rerank == 0).all()
    for direction in ("image", "text"):
        reranked = report.reranked_metrics
        assert reranked[f"{direction}_retrieval_recall@1"] == 0.0  # ties go against the query
        assert (
            reranked[f"{direction}_retrieval_recall@1"]
            <= report.first_stage_metrics[f"{direction}_retrieval_recall@1"]
        )
        # All K tied: a hit only once the whole list is in the top k, i.e. the first stage's.
        name = f"{direction}_retrieval_recall@5"
        assert reranked[name] == report.first_stage_metrics[name]


def test_first_stage_only_and_faiss_candidate_recall(tiny_dataset):
    full = evaluate(tiny_dataset, ColourEmbedding(), k=K, ks=KS, show_progress_bar=False)
    assert full.model is None and full.reranked_metrics == {} and full.pairs_scored == 0
    # Without the full matrix, recall comes from the FAISS lists: the same without ties.
    lists = evaluate(
        tiny_dataset, ColourEmbedding(), k=K, ks=KS, full_matrix_limit=0, show_progress_bar=False
    )
    assert lists.first_stage_recall_from == "faiss candidates"
    assert lists.first_stage_metrics == pytest.approx(full.first_stage_metrics)


def test_token_store_paths_give_the_models_scores(
    tiny_dataset, reranker, tiny_processor, report, tmp_path
):
    from edje.store import TokenStore

    ids = list(tiny_dataset["image_id"])
    compressed = _compressed_tokens(reranker, tiny_processor, tiny_dataset)
    images = [image.convert("RGB") for image in tiny_dataset["image"]]
    pixels = tiny_processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        raw = reranker.encode_images(pixels)
    for name, tokens in (("compressed", compressed), ("raw", raw)):
        fingerprint = reranker.store_fingerprint(raw=name == "raw")
        with TokenStore.create(
            tmp_path / name, token_shape=tokens.shape[1:], fingerprint=fingerprint
        ) as writer:
            writer.add(ids[::-1], tokens.flip(0))  # stored in another order: read by id
        from_store = evaluate(
            tiny_dataset,
            ColourEmbedding(),
            reranker,
            tiny_processor,
            TokenStore.open(tmp_path / name),
            k=K,
            show_progress_bar=False,
        )
        # float16 storage: close to the float32 scores, not equal.
        torch.testing.assert_close(
            from_store.candidates.t2i_rerank,
            report.candidates.t2i_rerank[:, :K],
            atol=2e-2,
            rtol=2e-2,
        )
    with TokenStore.create(
        tmp_path / "partial",
        token_shape=compressed.shape[1:],
        fingerprint=reranker.store_fingerprint(),
    ) as writer:
        writer.add(ids[:3], compressed[:3])
    missing = rf"the data has \[{ids[3]!r}, .*the store ids such as \[{ids[0]!r}"
    with pytest.raises(ValueError, match=missing):
        evaluate(
            tiny_dataset,
            ColourEmbedding(),
            reranker,
            tiny_processor,
            TokenStore.open(tmp_path / "partial"),
            show_progress_bar=False,
        )


def test_a_store_encoded_from_a_data_folder_serves_its_evaluation(
    reranker, tiny_processor, tmp_path
):
    """One image-id rule: `edje encode --images DIR` stores the ids `load_data(DIR)` gives."""
    import json

    from PIL import Image

    from edje.data import load_data
    from edje.store import TokenStore
    from edje.store.encode import encode_images

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rows = []
    for i, (name, colour) in enumerate([("a.png", "red"), ("sub/b.jpg", "blue"),
                                        ("c.jpeg", "green")]):  # fmt: skip
        Image.new("RGB", (28, 28), colour).save(folder / name)
        rows.append({"file_name": name, "caption": f"a {colour} square {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    encode_images(folder, tmp_path / "store", vision_encoder=reranker.vision_encoder,
                  image_processor=tiny_processor.image_processor, compressor=reranker.compress,
                  fingerprint=reranker.store_fingerprint(), accelerator="cpu", devices=1,
                  progress=False)  # fmt: skip
    store = TokenStore.open(tmp_path / "store")
    data = load_data(str(folder), splits=["train", "validation"])
    dataset = concatenate_datasets(list(data.values()))
    assert sorted(store.ids) == sorted(dataset["image_id"]) == ["a", "c", "sub/b"]
    report = evaluate(dataset, ColourEmbedding(), reranker, tiny_processor, store, k=2,
                      ks=(1,), show_progress_bar=False)  # fmt: skip
    assert report.candidates.t2i_rerank is not None


def test_a_store_from_another_adapter_is_refused_unless_forced(
    tiny_dataset, reranker, tiny_processor, tmp_path
):
    from edje.store import TokenStore

    ids = list(tiny_dataset["image_id"])
    tokens = _compressed_tokens(reranker, tiny_processor, tiny_dataset)
    foreign = dict(reranker.store_fingerprint(), adapter_sha256="0" * 64)
    with TokenStore.create(
        tmp_path / "foreign", token_shape=tokens.shape[1:], fingerprint=foreign
    ) as writer:
        writer.add(ids, tokens)
    store = TokenStore.open(tmp_path / "foreign")
    args = (tiny_dataset, ColourEmbedding(), reranker, tiny_processor, store)
    with pytest.raises(ValueError, match="adapter_sha256"):
        evaluate(*args, k=K, show_progress_bar=False)
    with pytest.warns(UserWarning, match="adapter_sha256"):
        evaluate(*args, k=K, show_progress_bar=False, force_store=True)


def clip_benchmark_recall(scores: torch.Tensor, text_to_image: torch.Tensor, k: int) -> dict:
    """clip_benchmark's definition (metrics/zeroshot_retrieval.py): per query, 1 when a correct
    item is in the top k, else 0, averaged over queries: a fraction in 0-1."""
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True

    def rate(s, p):
        return p.gather(1, s.topk(k, dim=1).indices).any(1).float().mean().item()

    return {f"image_retrieval_recall@{k}": rate(scores, positive),
            f"text_retrieval_recall@{k}": rate(scores.T, positive.T)}  # fmt: skip


def test_report_json_holds_clip_benchmarks_keys_on_its_0_1_scale(report, tiny_dataset, tmp_path):
    from edje.data import flatten_captions

    texts, text_to_image = flatten_captions(tiny_dataset)
    model = ColourEmbedding()
    scores = model.encode_texts(texts) @ model.encode_images(tiny_dataset["image"]).T
    saved = json.loads(report.save(tmp_path, plot=False)["json"].read_text())
    for k in KS:
        for key, value in clip_benchmark_recall(scores, text_to_image, k).items():
            assert saved["first_stage_metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert 0.0 < saved["first_stage_metrics"]["image_retrieval_recall@1"] < 1.0  # has teeth
    # The table shows percent, as papers do.
    first = saved["first_stage_metrics"]
    row = [100 * first[f"{d}_retrieval_recall@{k}"] for d in ("image", "text") for k in KS]
    assert "| first stage | " + " | ".join(f"{v:.1f}" for v in row) + " |" in report.to_markdown()


def test_files_json_round_trip_markdown_and_pngs(report, tiny_dataset, tmp_path):
    paths = report.save(tmp_path, dataset=tiny_dataset, contact_sheet=3)
    assert set(paths) == {"json", "markdown", "plot", "contact_sheet"}
    loaded = EvaluationReport.from_json(paths["json"].read_text())
    assert loaded == report
    data = json.loads(paths["json"].read_text())
    assert (
        data["first_stage_metrics"]["image_retrieval_recall@1"]
        == report.first_stage_metrics["image_retrieval_recall@1"]
    )
    assert data["pairs_scored"] == 360 and data["pairs_per_second"] > 0
    markdown = paths["markdown"].read_text()
    assert "| first stage |" in markdown and "| reranked (top 5) |" in markdown
    assert "T2I R@1" in markdown and "I2T R@10" in markdown
    from PIL import Image

    for kind in ("plot", "contact_sheet"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(paths[kind]) as image:
            image.verify()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_clear_errors(tiny_dataset, reranker):
    with pytest.raises(ValueError, match="model and processor together"):
        evaluate(tiny_dataset, ColourEmbedding(), reranker, show_progress_bar=False)
    with pytest.raises(ValueError, match=r"ks must be positive integers, got \[0\]"):
        evaluate(tiny_dataset, ColourEmbedding(), ks=(0,), show_progress_bar=False)
    with pytest.raises(ValueError, match="lacks column"):
        evaluate(tiny_dataset.remove_columns("captions"), ColourEmbedding())
    from datasets import DatasetDict

    with pytest.raises(ValueError, match=r"expected one split.*got splits \['test'\]"):
        evaluate(DatasetDict(test=tiny_dataset), ColourEmbedding())


# ---- the command line ---------------------------------------------------------------------------


def test_eval_help_has_an_example(capsys):
    from edje.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "--first-stage" in out and "--contact-sheet" in out


def test_eval_command_names_the_data_it_expects():
    from edje.commands.eval import load_split

    with pytest.raises(UsageError, match=re.escape("expected one of ('builtin', 'emoji'")):
        load_split(["folder"], "test")
    with pytest.raises(UsageError, match="got 'imagenet'"):
        load_split(["imagenet"], "test")


def test_eval_command_end_to_end_on_a_folder(
    tmp_path, tiny_model, tiny_processor, offline_dinov2_dir, capsys
):
    from edje.cli import main
    from edje.data import save_builtin_dataset
    from edje.first_stage import LinearProbeEmbedding

    sizes = dict(n_train_triplets=1, n_train_single=0, n_val_triplets=0, n_test_triplets=2)
    save_builtin_dataset(tmp_path / "data", seed=0, **sizes)
    blind = copy.deepcopy(tiny_model)
    with torch.no_grad():  # every pair gets the same logit: a reranker that ranks nothing
        blind.itm_head.weight.zero_()
    blind.save_pretrained(tmp_path / "model", save_vision_encoder=True)
    tiny_processor.save_pretrained(tmp_path / "model")
    LinearProbeEmbedding().save_pretrained(tmp_path / "probe")  # untrained: fine for plumbing
    code = main(
        [
            "eval",
            "--model", str(tmp_path / "model"),
            "--first-stage", str(tmp_path / "probe"),
            "--data", "folder", str(tmp_path / "data" / "test"),
            "--k", "3",
            "--out", str(tmp_path / "out"),
            "--contact-sheet", "2",
            "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert "| reranked (top 3) |" in printed.out
    # A folder without split folders is evaluated whole, and says so.
    assert "has no train/ validation/ test/ folders; evaluating all 6" in printed.err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["contact_sheet.png", "recall_at_k.png", "report.json", "report.md"]
    text = (tmp_path / "out" / "report.json").read_text()
    report = json.loads(text)
    assert report["dataset"]["images"] == 6 and report["pairs_scored"] == (12 + 6) * 3
    # Tied logits rank every true match last: worse than the first stage, and stderr says so.
    warning = EvaluationReport.from_json(text).regressions()
    assert warning is not None and f"warning: {warning}" in printed.err
