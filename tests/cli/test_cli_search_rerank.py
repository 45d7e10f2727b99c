"""`edje index`, `edje search` and `edje rerank` end to end, in-process, on a tiny random EDJE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edje import EDJEModel
from edje.cli import main
from edje.commands import UsageError
from edje.rerank import EDJEReranker
from edje.store import TokenStore
from tests.helpers.tiny import make_tiny_config

CAPTIONS = ["a cat", "a red circle", "dogs in the park", "two birds", "a boat", "snow"]


# Tiny models: one thread is faster than two competing for busy cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tiny_processor, tiny_vision_encoder, tmp_path_factory):
    """A saved model, photos, a compressed and a raw store of them, a first stage, captions."""
    root = tmp_path_factory.mktemp("cli")
    config = make_tiny_config(
        len(tiny_processor.tokenizer),
        tiny_processor.image_token_id,
        vision_image_processor=tiny_processor.image_processor.to_dict(),
    )
    torch.manual_seed(0)
    model = EDJEModel(config, vision_encoder=tiny_vision_encoder).eval()
    model.save_pretrained(root / "edje", save_vision_encoder=True)
    tiny_processor.save_pretrained(root / "edje")
    tiny_processor.image_processor.save_pretrained(root / "edje" / "vision_encoder")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    photos = [Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(5)]
    ids = [f"p{i}" for i in range(5)]  # as edje encode/index --images name p0.png ...
    for name, photo in zip(ids, photos, strict=True):
        photo.save(root / "photos" / f"{name}.png")
    with torch.no_grad():
        pixels = tiny_processor.image_processor(images=photos, return_tensors="pt")
        raw = model.encode_images(pixels["pixel_values"])
        compressed = model.compress(raw)
    for name, tokens, fingerprint in (
        ("store", compressed, model.store_fingerprint()),
        ("raw", raw, model.store_fingerprint(raw=True)),
    ):
        with TokenStore.create(
            root / name, token_shape=tokens.shape[1:], fingerprint=fingerprint
        ) as w:
            w.add(ids, tokens)
    from edje.first_stage import LinearProbeEmbedding

    torch.manual_seed(0)
    probe = LinearProbeEmbedding(
        vision=str(root / "edje" / "vision_encoder"), vision_dim=32, embedding_dim=8, image_size=28
    )
    probe.save_pretrained(root / "probe")
    (root / "captions.txt").write_text("\n".join(CAPTIONS[:3]) + "\n\n")
    (root / "captions.jsonl").write_text(
        "\n".join(json.dumps({"caption": c}) for c in CAPTIONS[3:]) + "\n"
    )
    return root, ids, photos


def run_json(capsys, argv: list[str]) -> list[dict]:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_search_caption_to_images_with_a_saved_index_and_a_raw_store(files, capsys):
    root, _, _ = files
    assert main(["index", "--first-stage", str(root / "probe"), "--images", str(root / "photos"),
                 "--out", str(root / "photos.index")]) == 0  # fmt: skip
    common = ["search", "--model", str(root / "edje"), "--first-stage", str(root / "probe")]
    common += ["--device", "cpu"]
    query = "a cat on a mat"
    indexed = [*common, "--store", str(root / "store"), "--index", str(root / "photos.index")]
    hits = run_json(capsys, [*indexed, "--k", "4", "--json", query])
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    expected = EDJEReranker(str(root / "edje"), store=root / "store", device="cpu").rank(
        query, [h["image_id"] for h in hits]
    )
    assert [h["image_id"] for h in hits] == [e["image_id"] for e in expected]
    assert [h["score"] for h in hits] == pytest.approx([e["score"] for e in expected], abs=1e-6)
    assert sorted(h["first_stage_rank"] for h in hits) == [0, 1, 2, 3]
    # raw store, no index: the first stage embeds the stored raw tokens (CLS), same candidates
    raw = run_json(capsys, [*common, "--store", str(root / "raw"), "--k", "4", "--json", query])
    assert {h["image_id"] for h in raw} == {h["image_id"] for h in hits}
    # the table, with --top
    assert main([*indexed, "--top", "2", query]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "image_id", "score", "first", "stage"]
    assert len(table) == 3 and table[1].split()[1] == hits[0]["image_id"]


def test_index_goes_on_past_bad_images_lists_them_and_exits_1(files, tmp_path, capsys):
    from edje.first_stage import VectorIndex

    root, ids, photos = files
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, photo in zip(ids, photos, strict=True):
        photo.save(folder / f"{name}.png")
    (folder / "truncated.png").write_bytes((folder / f"{ids[0]}.png").read_bytes()[:40])
    (folder / "empty.jpg").write_bytes(b"")
    argv = ["index", "--first-stage", str(root / "probe"), "--images", str(folder)]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "index")]) == 1
    err = capsys.readouterr().err
    assert "2 images could not be decoded (not indexed):" in err
    assert "  truncated: " in err and "  empty: " in err
    assert sorted(VectorIndex.load(tmp_path / "index").ids) == sorted(ids)  # the others indexed


def test_search_without_an_index_on_a_compressed_store_says_how_to_build_one(files):
    root, _, _ = files
    with pytest.raises(
        ValueError, match=r"holds compressed EDJE tokens.*edje index --first-stage.*as --index"
    ):
        main(["search", "--model", str(root / "edje"), "--first-stage", str(root / "probe"),
              "--store", str(root / "store"), "a cat"])  # fmt: skip


def test_index_from_a_raw_store_builds_the_asked_faiss_factory(files, tmp_path):
    from edje.first_stage import VectorIndex

    root, ids, _ = files
    argv = ["index", "--first-stage", str(root / "probe"), "--store", str(root / "raw")]
    assert (
        main([*argv, "--factory", "HNSW8", "--batch-size", "2", "--out", str(tmp_path / "i")]) == 0
    )
    index = VectorIndex.load(tmp_path / "i", require_ids=True)
    assert type(index.index).__name__ == "IndexHNSWFlat" and sorted(index.ids) == sorted(ids)


def test_search_beside_a_quickstart_model_needs_no_first_stage_and_hints_when_nothing_scores(
    files, tiny_processor, tmp_path, capsys
):
    import shutil

    root, _, _ = files
    model = EDJEModel.from_pretrained(root / "edje").eval()
    with torch.no_grad():
        model.itm_head.bias -= 40  # every pair scores ~0: a caption the model does not know
    model.config.example_captions = ["a small red circle", "a big blue square"]
    model.save_pretrained(tmp_path / "model", save_vision_encoder=True)
    tiny_processor.save_pretrained(tmp_path / "model")
    tiny_processor.image_processor.save_pretrained(tmp_path / "model" / "vision_encoder")
    shutil.copytree(root / "probe", tmp_path / "first_stage")  # as edje quickstart leaves them
    shutil.copytree(root / "raw", tmp_path / "raw.store")
    hits = run_json(capsys, ["search", "--model", str(tmp_path / "model"), "--device", "cpu",
                             "--k", "3", "--json", "a cat"])  # fmt: skip
    assert len(hits) == 3
    assert main(["search", "--model", str(tmp_path / "model"), "--k", "3", "a cat"]) == 0
    err = capsys.readouterr().err
    assert f"--first-stage {tmp_path / 'first_stage'} (beside the model)" in err
    assert f"--store {tmp_path / 'raw.store'} (beside the model)" in err
    assert "every score is below 0.01" in err and "'a small red circle'; 'a big blue square'" in err
    with pytest.raises(UsageError, match="give --first-stage"):
        main(["search", "--model", str(root / "edje"), "--store", str(root / "raw"), "a cat"])
    # One first stage per data set, as the quickstart leaves them: one is taken, two are named.
    shutil.move(tmp_path / "first_stage", tmp_path / "builtin")
    (tmp_path / "first_stage").mkdir()
    shutil.move(tmp_path / "builtin", tmp_path / "first_stage" / "builtin")
    assert main(["search", "--model", str(tmp_path / "model"), "--k", "3", "a cat"]) == 0
    taken = tmp_path / "first_stage" / "builtin"
    assert f"--first-stage {taken} (beside the model)" in capsys.readouterr().err
    shutil.copytree(tmp_path / "first_stage" / "builtin", tmp_path / "first_stage" / "emoji")
    with pytest.raises(UsageError, match=r"give --first-stage: one of .*builtin, .*emoji"):
        main(["search", "--model", str(tmp_path / "model"), "--k", "3", "a cat"])


def test_search_image_to_captions(files, capsys):
    root, _, photos = files
    common = ["search", "--images", "--model", str(root / "edje"), "--json", "--device", "cpu"]
    common += ["--first-stage", str(root / "probe"), str(root / "photos" / "p0.png")]
    for name, captions in (("captions.txt", CAPTIONS[:3]), ("captions.jsonl", CAPTIONS[3:])):
        hits = run_json(capsys, [*common, "--captions", str(root / name)])
        assert sorted(h["caption"] for h in hits) == sorted(captions)
        reranker = EDJEReranker(str(root / "edje"), device="cpu")
        expected = reranker.predict([(h["caption"], photos[0]) for h in hits])
        assert [h["score"] for h in hits] == pytest.approx(expected.tolist(), abs=1e-6)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_rerank_streams_jsonl_to_jsonl(files, tmp_path, monkeypatch):
    root, ids, _ = files
    sizes, predict = [], EDJEReranker.predict

    def recording(self, pairs, batch_size=32, **options):
        sizes.append(batch_size)
        return predict(self, pairs, batch_size=batch_size, **options)

    monkeypatch.setattr(EDJEReranker, "predict", recording)
    records = [
        {"query": "a cat", "document": ids[0]},
        {"query": "two birds", "documents": [ids[1], str(root / "photos" / "p2.png"), ids[3]]},
        {"query": "a boat", "document": ids[4], "extra": 7},
    ]
    source, target = tmp_path / "pairs.jsonl", tmp_path / "scores.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    argv = rerank_argv(root, source, target, batch_size=2)
    assert main(argv) == 0
    assert set(sizes) == {2}  # --batch-size pairs per forward, whatever a line holds
    out = [json.loads(line) for line in target.read_text().splitlines()]
    reranker = EDJEReranker(str(root / "edje"), store=root / "store", device="cpu")
    pairs = [("a cat", ids[0]), *(("two birds", d) for d in records[1]["documents"])]
    expected = reranker.predict([*pairs, ("a boat", ids[4])]).tolist()
    assert out[0] == {**records[0], "score": pytest.approx(expected[0], abs=1e-6)}
    assert out[1]["scores"] == pytest.approx(expected[1:4], abs=1e-6)
    assert out[2]["extra"] == 7 and out[2]["score"] == pytest.approx(expected[4], abs=1e-6)
    assert main([*argv, "--logits"]) == 0
    logits = [json.loads(line) for line in target.read_text().splitlines()]
    assert torch.tensor(logits[0]["score"]).sigmoid().item() == pytest.approx(expected[0], abs=1e-6)


def rerank_argv(root, source, target, *, batch_size: int) -> list[str]:
    """`edje rerank` over the fixture's model and store, on the CPU."""
    return [
        *("rerank", "--model", str(root / "edje"), "--store", str(root / "store")),
        *("--device", "cpu", "--input", str(source), "--output", str(target)),
        *("--batch-size", str(batch_size)),
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not JSON"),
        ('{"query": "", "document": "p0"}', '"query" must be'),
        ('{"query": "a cat"}', 'exactly one of "document"'),
        ('{"query": "a cat", "document": "nope.png"}', "'nope.png' is neither an image id"),
    ],
)
def test_rerank_stops_at_a_malformed_line_and_leaves_no_output(files, tmp_path, bad_line, message):
    root, _, _ = files
    source, target = tmp_path / "pairs.jsonl", tmp_path / "scores.jsonl"
    good = json.dumps({"query": "a cat", "document": "p0"})
    source.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(UsageError, match=f"pairs.jsonl:3: .*{message}"):
        main(rerank_argv(root, source, target, batch_size=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # nothing partial


def test_help_has_examples(capsys):
    for command in ("search", "rerank", "index"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example" in capsys.readouterr().out


def test_search_and_rerank_take_dtype_and_backend(files, tmp_path, capsys):
    root, ids, _ = files
    search = ["search", "--model", str(root / "edje"), "--first-stage", str(root / "probe"),
              "--store", str(root / "raw"), "--device", "cpu", "--json", "a cat"]  # fmt: skip
    default = run_json(capsys, search)
    chosen = run_json(capsys, [*search, "--backend", "torch", "--dtype", "float32"])
    assert [h["image_id"] for h in chosen] == [h["image_id"] for h in default]
    assert [h["score"] for h in chosen] == pytest.approx([h["score"] for h in default], abs=1e-5)
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"query": "a cat", "documents": ids}) + "\n")
    outputs = []
    for extra in ([], ["--backend", "torch", "--dtype", "float32"]):
        target = tmp_path / f"scores{len(outputs)}.jsonl"
        assert main([*rerank_argv(root, source, target, batch_size=4), *extra]) == 0
        outputs.append(json.loads(target.read_text())["scores"])
    assert outputs[1] == pytest.approx(outputs[0], abs=1e-5)
    with pytest.raises(SystemExit) as refused:  # a dtype edje does not score in: usage error
        main([*search, "--dtype", "int4"])
    assert refused.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_calibrate_stores_the_bound_and_search_in_exact_mode_gives_fp32s_hits(
    files, tmp_path, capsys
):
    import shutil

    root, _, _ = files
    model = tmp_path / "edje"
    shutil.copytree(root / "edje", model)  # calibrate writes its config.json
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na red circle\ntwo dogs on grass\n")
    search = ["search", "--model", str(model), "--first-stage", str(root / "probe"), "--store",
              str(root / "raw"), "--device", "cpu", "--json", "--top", "2", "a cat"]  # fmt: skip
    with pytest.raises(ValueError, match="edje calibrate"):  # no bound yet
        main([*search, "--precision", "exact"])
    calibrate = ["calibrate", "--model", str(model), "--store", str(root / "raw"),
                 "--captions", str(captions), "--pairs", "6", "--per-caption", "2",
                 "--device", "cpu"]  # fmt: skip
    assert main(calibrate) == 0
    record = json.loads((model / "config.json").read_text())["score_error_bounds"]["bfloat16"]
    assert record["pairs"] == 6 and record["bound"] == 2 * record["max_abs_diff"] > 0
    assert (record["captions"], record["top"]) == (3, 2) and "top 2 of" in record["method"]
    capsys.readouterr()
    exact = run_json(capsys, [*search, "--precision", "exact"])
    default = run_json(capsys, search)
    assert [h["image_id"] for h in exact] == [h["image_id"] for h in default]
    assert [h["score"] for h in exact] == pytest.approx([h["score"] for h in default], abs=1e-6)


def test_a_folder_of_first_stages_is_refused_in_one_line_naming_them(files, tmp_path):
    import shutil
    import subprocess
    import sys

    from edje.first_stage import load_embedding_model

    root, _, _ = files
    folder = tmp_path / "first_stage"  # as edje quickstart leaves it: one per data set
    for name in ("builtin", "emoji"):
        shutil.copytree(root / "probe", folder / name)
    with pytest.raises(ValueError, match=r"folder of 2 first stages \(builtin, emoji\)"):
        load_embedding_model(folder)
    # Every command loads first stages through it: one line, exit code 2, no traceback.
    argv = ["search", "--model", str(root / "edje"), "--first-stage", str(folder),
            "--store", str(root / "store"), "--device", "cpu", "a cat"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", "import sys, edje_cli; sys.argv[1:] = sys.argv[2:]; edje_cli.run()",
         "edje", *argv], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "pass the one made for your images" in result.stderr


def test_a_served_index_is_checked_against_the_store_and_first_stage_at_start(files):
    from edje.first_stage import VectorIndex, load_embedding_model
    from edje.serving.search_page import Collection

    root, ids, _ = files
    reranker = EDJEReranker(str(root / "edje"), store=root / "raw", device="cpu")
    probe = load_embedding_model(root / "probe")
    vectors = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    other = VectorIndex(dim=8)
    other.add(vectors, ids=[f"elsewhere-{i}.png" for i in range(5)])
    with pytest.raises(ValueError, match=r"names 5 images the store .* does not hold"):
        Collection(reranker, probe, other)
    wide = VectorIndex(dim=16)
    wide.add(torch.randn(5, 16), ids=ids)
    with pytest.raises(ValueError, match=r"16-wide vectors, the first stage embeds to 8"):
        Collection(reranker, probe, wide)
    # An IVF index (no direct map when loaded) describes as an exact one does.
    ivf = VectorIndex.from_store(reranker.store, probe, factory="IVF1,Flat")
    collection = Collection(reranker, probe, ivf, captions=CAPTIONS)
    exact = Collection(reranker, probe, VectorIndex.from_store(reranker.store, probe))
    exact.captions = CAPTIONS
    assert collection.describe(ids[0], k=3)["reranked"] == exact.describe(ids[0], k=3)["reranked"]


def test_a_bad_index_factory_is_named_before_any_image_is_embedded(files, tmp_path, capsys):
    root, _, _ = files
    argv = ["index", "--first-stage", str(root / "probe"), "--images", str(root / "photos"),
            "--out", str(tmp_path / "index"), "--factory", "garbage"]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"'garbage' is not a faiss index_factory string"):
        main(argv)
    assert "embedded" not in capsys.readouterr().out and not (tmp_path / "index").exists()


def test_a_lone_surrogate_in_a_rerank_line_is_named_and_nothing_is_written(files, tmp_path):
    root, _, _ = files
    (tmp_path / "pairs.jsonl").write_text('{"query": "a \\ud800 cat", "document": "p0.png"}\n')
    argv = [
        "rerank",
        "--model",
        str(root / "edje"),
        "--store",
        str(root / "store"),
        "--input",
        str(tmp_path / "pairs.jsonl"),
        "--output",
        str(tmp_path / "out.jsonl"),
    ]
    with pytest.raises(
        UsageError, match=r"pairs\.jsonl:1: the query .* lone surrogate \(U\+D800\)"
    ):
        main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_index_decodes_a_few_images_at_a_time_each_reduced_at_once(tmp_path):
    from edje.commands.index import DECODED_AT_ONCE, _embed_images

    big = Image.new("RGB", (2100, 2100), "red")
    found = []
    for i in range(DECODED_AT_ONCE + 4):
        big.save(tmp_path / f"{i}.png")
        found.append((f"{i}.png", str(tmp_path / f"{i}.png")))

    class Recording:
        def __init__(self) -> None:
            self.groups: list[list[tuple[int, int]]] = []

        def encode_images(self, images, batch_size=64):
            self.groups.append([image.size for image in images])
            return torch.zeros(len(images), 4)

    first_stage = Recording()
    ids, embeddings, failures = _embed_images(first_stage, found, batch_size=64)
    assert ids == [i for i, _ in found] and embeddings.shape == (len(found), 4) and not failures
    assert [len(g) for g in first_stage.groups] == [DECODED_AT_ONCE, 4]  # not all 64 at once
    assert {size for g in first_stage.groups for size in g} == {(1050, 1050)}  # 2100 / 2


def test_eval_in_exact_mode_gives_exactly_the_fp32_report(files, tmp_path):
    """Recall@1..k reads every candidate's order: `edje eval --precision exact` scores them
    all in fp32, and its report holds the very numbers of `--precision float32`'s."""
    import shutil

    root, ids, _ = files
    data = tmp_path / "data"
    shutil.copytree(root / "photos", data)
    lines = [{"file_name": f"{i}.png", "caption": c} for i, c in zip(ids, CAPTIONS, strict=False)]
    (data / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["eval", "--model", str(root / "edje"), "--first-stage", str(root / "probe"),
            "--data", str(data), "--store", str(root / "raw"), "--k", "3",
            "--device", "cpu"]  # fmt: skip
    reports = {}
    for precision in ("float32", "exact"):
        assert main([*argv, "--precision", precision, "--out", str(tmp_path / precision)]) == 0
        report = json.loads((tmp_path / precision / "report.json").read_text())
        reports[precision] = {k: v for k, v in report.items()
                              if k not in ("seconds", "pairs_per_second")}  # fmt: skip
    assert reports["float32"]["pairs_scored"] > 0
    assert reports["exact"] == reports["float32"]


def test_the_search_page_in_exact_mode_shows_fp32s_top_n(files):
    """`/v1/search` and `/v1/describe` with `top_n` < k over real HTTP: the exact-mode service
    shows the fp32 service's top n (ids, captions, scores) after its bf16 + fp32 phases."""
    from edje.first_stage import VectorIndex, load_embedding_model
    from edje.serving.app import RerankerBackend, create_app, serve_in_background
    from edje.serving.search_page import Collection, add_search_page
    from tests.helpers.loopback import http_json

    root, ids, _ = files
    probe = load_embedding_model(root / "probe")
    answers, counts = {}, {}
    for precision in ("float32", "exact"):
        reranker = EDJEReranker(str(root / "edje"), store=root / "raw", device="cpu",
                                precision=precision, error_bound=0.01)  # fmt: skip
        index = VectorIndex.from_store(reranker.store, probe)
        app = create_app(RerankerBackend(reranker))
        add_search_page(app, Collection(reranker, probe, index, captions=CAPTIONS))
        with serve_in_background(app) as url:
            search = http_json(f"{url}/v1/search", {"query": "a cat", "k": 5, "top_n": 2})
            describe = http_json(f"{url}/v1/describe", {"image_id": ids[0], "k": 6, "top_n": 3})
        answers[precision] = [search[1]["reranked"], describe[1]["reranked"]]
        assert search[0] == describe[0] == 200, (search, describe)
        counts[precision] = reranker.exact_counts
    assert [len(hits) for hits in answers["exact"]] == [2, 3]
    for got, want in zip(answers["exact"], answers["float32"], strict=True):
        assert [h["rank"] for h in got] == [h["rank"] for h in want]
        assert [h.get("image_id", h.get("caption")) for h in got] == [
            h.get("image_id", h.get("caption")) for h in want
        ]
        assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-6)
    assert counts["float32"] is None
    assert counts["exact"]["queries"] == 2 and counts["exact"]["candidates"] == 5 + 6
