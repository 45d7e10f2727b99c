"""EDJEReranker on a tiny random EDJE: scores equal the model's, every document kind agrees,
rank_many equals rank per query, and every misuse gets a clear error."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from PIL import Image

from edje.rerank import EDJEReranker
from edje.store import TokenStore
from tests.helpers.tiny import make_tiny_model

IDS = [f"img{i}" for i in range(6)]
CAPTIONS = ["a cat", "a red circle on a big blue square", "a cat", "dogs", "two birds in a tree"]


# Tiny models: one thread is faster than two competing for busy cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_processor, tiny_vision_encoder):
    return make_tiny_model(tiny_processor, tiny_vision_encoder)


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    shapes = [(30, 40), (28, 28), (50, 30), (33, 33), (40, 20), (29, 31)]
    return [Image.fromarray(rng.integers(0, 255, (*s, 3), dtype=np.uint8)) for s in shapes]


@pytest.fixture(scope="module")
def store(model, tiny_processor, photos, tmp_path_factory):
    """A compressed fp16 store of the photos' tokens, made by `model`."""
    path = tmp_path_factory.mktemp("rerank") / "store"
    with torch.no_grad():
        pixels = tiny_processor.image_processor(images=photos, return_tensors="pt")
        tokens = model.compress(model.encode_images(pixels["pixel_values"]))
    with TokenStore.create(path, token_shape=(4, 32), fingerprint=model.store_fingerprint()) as w:
        w.add(IDS, tokens)
    return TokenStore.open(path)


@pytest.fixture(scope="module")
def reranker(model, tiny_processor, store):
    return EDJEReranker(model, store=store, processor=tiny_processor, device="cpu")


def reference_logits(model, processor, captions, tokens) -> torch.Tensor:
    """EDJEModel.forward, one pair at a time (no batching to get wrong)."""
    with torch.no_grad():
        rows = [
            model(**processor(text=[c], image_tokens=t[None])).logits
            for c, t in zip(captions, tokens, strict=True)
        ]
    return torch.cat(rows)


def test_predict_equals_sigmoid_of_forward_in_the_order_given(reranker, model, tiny_processor):
    tokens = torch.randn(len(CAPTIONS), 4, 32, generator=torch.Generator().manual_seed(1))
    pairs = list(zip(CAPTIONS, tokens, strict=True))
    expected = reference_logits(model, tiny_processor, CAPTIONS, tokens)
    scores = reranker.predict(pairs, batch_size=2)  # batches cut across sorted captions
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected.sigmoid().numpy(), atol=1e-5, rtol=0)
    logits = reranker.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
    assert isinstance(logits, torch.Tensor)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    as_list = reranker.predict(pairs, convert_to_numpy=False)
    assert isinstance(as_list, list) and as_list == pytest.approx(scores.tolist(), abs=1e-6)
    single = reranker.predict(pairs[1])  # one pair: one score
    assert single == pytest.approx(float(scores[1]), abs=1e-6)
    slow = EDJEReranker(model, processor=tiny_processor, device="cpu", backend="torch")
    np.testing.assert_allclose(slow.predict(pairs, batch_size=3), scores, atol=1e-5, rtol=0)


def test_every_document_kind_ranks_alike(reranker, store, photos, tmp_path, monkeypatch):
    monkeypatch.setattr("edje.rerank.PIXEL_BATCH", 4)  # pixels encoded in two batches
    paths = []
    for i, photo in enumerate(photos):
        paths.append(tmp_path / f"photo{i}.png")
        photo.save(paths[-1])
    by_id = reranker.rank("a cat", IDS)
    by_tensor = reranker.rank("a cat", store.gather(IDS).float())
    by_pil = reranker.rank("a cat", photos)
    by_path = reranker.rank("a cat", [str(p) for p in paths])
    by_pathlib = reranker.rank("a cat", paths)
    by_bytes = reranker.rank("a cat", [p.read_bytes() for p in paths])
    by_array = reranker.rank("a cat", [np.asarray(photo) for photo in photos])
    by_dict = reranker.rank(
        "a cat", [{"image": photo} for photo in photos]
    )  # sentence-transformers'
    by_datasets = reranker.rank("a cat", [{"bytes": None, "path": str(p)} for p in paths])
    mixed = reranker.rank("a cat", [IDS[0], photos[1], str(paths[2]), *store.gather(IDS[3:])])
    kinds = (
        by_tensor,
        by_pil,
        by_path,
        by_pathlib,
        by_bytes,
        by_array,
        by_dict,
        by_datasets,
        mixed,
    )
    for hits in kinds:
        assert [h["corpus_id"] for h in hits] == [h["corpus_id"] for h in by_id]
        # stored tokens are fp16; pixels are encoded in fp32
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in by_id], abs=1e-3)
    assert [h["image_id"] for h in by_id] == [IDS[h["corpus_id"]] for h in by_id]
    assert all("image_id" not in h for h in by_pil)
    assert [h.get("image_id") for h in sorted(mixed, key=lambda h: h["corpus_id"])] == [
        "img0", None, None, None, None, None
    ]  # fmt: skip
    scores = [h["score"] for h in by_id]
    assert scores == sorted(scores, reverse=True)


def test_the_default_dtype_is_float32(model, tiny_processor):
    """The model's own answer (and the authors' evaluation dtype) unless bfloat16 is asked
    for: bfloat16 moves logits by about 1e-2 and can swap close candidates."""
    assert EDJEReranker(model, processor=tiny_processor, device="cpu").dtype == torch.float32


@pytest.mark.gpu
def test_the_default_dtype_on_cuda_is_float32_too(model, tiny_processor):
    """It used to be bfloat16 on CUDA."""
    assert EDJEReranker(model, processor=tiny_processor, device="cuda").dtype == torch.float32


def test_rank_top_k_return_documents_and_stable_ties(reranker, store):
    top = reranker.rank("dogs", IDS, top_k=2, return_documents=True)
    assert len(top) == 2 and top == [
        {**h, "text": IDS[h["corpus_id"]]} for h in reranker.rank("dogs", IDS)[:2]
    ]
    same = store.get(IDS[0]).float()
    ties = reranker.rank("dogs", [same, same.clone(), same.clone()])
    assert [h["corpus_id"] for h in ties] == [0, 1, 2]  # equal scores keep the input order
    assert reranker.rank("dogs", []) == []


# What CrossEncoder takes that EDJE has no use for: text prompts, and multi-process pools
# (EDJE scores on the reranker's device); `kwargs` go to its tokenizer.
NOT_FOR_IMAGES = {"self", "prompt_name", "prompt", "device", "pool", "chunk_size", "kwargs"}


def test_predict_and_rank_take_cross_encoders_arguments_and_give_its_keys(reranker):
    """Against the sentence-transformers installed with edje's dev extras (6.3 here)."""
    import inspect

    from sentence_transformers import CrossEncoder

    for name in ("predict", "rank"):
        theirs = set(inspect.signature(getattr(CrossEncoder, name)).parameters) - NOT_FOR_IMAGES
        ours = set(inspect.signature(getattr(EDJEReranker, name)).parameters)
        assert theirs <= ours, (name, sorted(theirs - ours))
    pairs = [("dogs", IDS[0]), ("dogs", IDS[1])]
    scores = reranker.predict(pairs)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
    for alias in ({"inputs": pairs}, {"sentences": pairs}):
        assert np.array_equal(reranker.predict(**alias), scores)
    assert np.array_equal(reranker.predict(pairs, apply_softmax=True), scores)  # one logit
    logits = reranker.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
    assert torch.allclose(torch.sigmoid(logits), torch.from_numpy(scores))
    hits = reranker.rank("dogs", IDS, top_k=3, return_documents=True, activation_fn=None)
    # CrossEncoder.rank's keys, plus edje's image_id for store ids.
    assert all(set(h) == {"corpus_id", "score", "text", "image_id"} for h in hits)
    assert [h["text"] for h in hits] == [IDS[h["corpus_id"]] for h in hits]


def test_rank_gives_plain_python_floats_that_json_takes(reranker):
    import json

    hits = reranker.rank("dogs", IDS, return_documents=True, first_stage_scores=np.ones(6))
    assert all(type(h["score"]) is float and type(h["first_stage_score"]) is float for h in hits)
    assert json.loads(json.dumps(hits)) == hits
    with pytest.warns(FutureWarning, match="convert_to_tensor"):  # ignored, as in ST 6
        assert reranker.rank("dogs", IDS, convert_to_tensor=True) == reranker.rank("dogs", IDS)


def test_an_image_query_ranks_captions(reranker, model, tiny_processor, store, photos):
    """sentence-transformers 6's CrossEncoder.rank takes an image as the query: image ->
    captions, scored as the same pairs given to predict."""
    captions = ["a cat", "dogs", "two birds in a tree", "a red circle on a big blue square"]
    tokens = store.get(IDS[2]).float()
    expected = reranker.predict([(caption, tokens) for caption in captions])
    for query in (tokens, {"image": tokens}):
        hits = reranker.rank(query, captions, return_documents=True, batch_size=3)
        assert [h["corpus_id"] for h in hits] == np.argsort(-expected, kind="stable").tolist()
        assert [h["score"] for h in hits] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
        assert [h["text"] for h in hits] == [captions[h["corpus_id"]] for h in hits]
    by_photo = reranker.rank(photos[2], captions, top_k=2)
    assert len(by_photo) == 2 and all(type(h["score"]) is float for h in by_photo)
    assert reranker.rank(photos[2], []) == []
    with pytest.raises(ValueError, match="document 1 must be a non-empty caption"):
        reranker.rank(photos[2], ["a cat", 3])
    with pytest.raises(ValueError, match=r"query must be a store id.*got int"):
        reranker.rank(7, captions)


def test_rank_many_on_faiss_positions_equals_rank_per_query(reranker, store):
    from edje.first_stage import VectorIndex

    generator = torch.Generator().manual_seed(2)
    order = [3, 0, 5, 1, 4, 2]  # the index holds the images in another order than the store
    index = VectorIndex(dim=8)
    index.add(torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1),
              ids=[IDS[i] for i in order])  # fmt: skip
    queries = ["a cat", "dogs", "two birds in a tree"]
    first_scores, positions = index.search(torch.randn(3, 8, generator=generator), k=4)
    results = reranker.rank_many(queries, positions, first_scores, ids=index.ids, batch_size=8)
    assert len(results) == 3
    for q, (query, hits) in enumerate(zip(queries, results, strict=True)):
        candidates = [index.ids[p] for p in positions[q].tolist()]
        expected = reranker.rank(query, candidates)
        assert [h["image_id"] for h in hits] == [h["image_id"] for h in expected]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-6)
        for hit in hits:
            column = hit["first_stage_rank"]
            assert hit["corpus_id"] == positions[q, column].item()
            assert index.ids[hit["corpus_id"]] == hit["image_id"]
            assert hit["first_stage_score"] == pytest.approx(first_scores[q, column].item())
    # str ids, a FAISS "no result" (-1) dropped, store rows when no ids are given, top_k
    by_name = reranker.rank_many(["dogs"], [["img2", "img4"]], top_k=1)
    assert len(by_name[0]) == 1 and by_name[0][0]["image_id"] in ("img2", "img4")
    by_row = reranker.rank_many(["dogs", "a cat"], [[2, 4, -1], [1, 0, 3]])
    assert {h["image_id"] for h in by_row[0]} == {"img2", "img4"}
    assert by_row[0][0]["image_id"] == by_name[0][0]["image_id"]
    assert {h["corpus_id"] for h in by_row[1]} == {0, 1, 3}


def test_model_folder_and_raw_store(model, tiny_processor, store, tmp_path):
    model.save_pretrained(tmp_path / "edje", save_vision_encoder=True)
    tiny_processor.save_pretrained(tmp_path / "edje")
    loaded = EDJEReranker(str(tmp_path / "edje"), store=store.path, device="cpu")
    tokens = store.gather(IDS).float()
    direct = EDJEReranker(model, processor=tiny_processor, device="cpu").rank("a cat", tokens)
    assert loaded.rank("a cat", IDS) == [{**h, "image_id": IDS[h["corpus_id"]]} for h in direct]
    # A store of raw vision tokens: the adapter compresses them when read.
    raw = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    fingerprint = model.store_fingerprint(raw=True)
    with TokenStore.create(tmp_path / "raw", token_shape=(5, 32), fingerprint=fingerprint) as w:
        w.add(["a", "b"], raw)
    raw_reranker = EDJEReranker(
        model, store=tmp_path / "raw", processor=tiny_processor, device="cpu"
    )
    with torch.no_grad():
        compressed = model.compress(TokenStore.open(tmp_path / "raw").gather(["a", "b"]).float())
    assert [h["score"] for h in raw_reranker.rank("dogs", ["a", "b"])] == pytest.approx(
        [h["score"] for h in raw_reranker.rank("dogs", compressed)], abs=1e-6
    )


def test_foreign_store_refused_unless_forced(tiny_processor, tiny_vision_encoder, store):
    other = make_tiny_model(tiny_processor, tiny_vision_encoder, seed=1)
    with pytest.raises(ValueError, match="adapter_sha256"):
        EDJEReranker(other, store=store, processor=tiny_processor, device="cpu")
    with pytest.warns(UserWarning, match="adapter_sha256"):
        EDJEReranker(other, store=store, processor=tiny_processor, force_store=True, device="cpu")


def test_errors_name_what_was_expected_and_what_came(reranker, model, tiny_processor, tmp_path):
    with pytest.raises(KeyError, match="'img99'"):
        reranker.rank("a cat", ["img0", "img99"])
    with pytest.raises(ValueError, match="query must be a non-empty caption"):
        reranker.rank("  ", IDS)
    with pytest.raises(ValueError, match="pair 1 must be a non-empty caption"):
        reranker.predict([("a cat", "img0"), ("", "img1")])
    with pytest.raises(ValueError, match="pair 0 must be"):
        reranker.predict([("a cat",)])
    storeless = EDJEReranker(model, processor=tiny_processor, device="cpu")
    with pytest.raises(ValueError, match="no store was given"):
        storeless.rank("a cat", ["img0"])
    with pytest.raises(ValueError, match="no store"):
        storeless.rank_many(["a cat"], [[0, 1]])
    with pytest.raises(ValueError, match=r"\[m, d\] = \[4, 32\], got \[4, 16\]"):
        reranker.rank("a cat", [torch.zeros(4, 16)])
    with pytest.raises(ValueError, match=r"\[K, m, d\].*got \[4, 32\]"):
        reranker.rank("a cat", torch.zeros(4, 32))
    with pytest.raises(ValueError, match="got int"):
        reranker.rank("a cat", [3])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        reranker.rank("a cat", [tmp_path / "missing.png"])
    # What was given is named: a URL is not "not in the store", undecodable bytes say so.
    with pytest.raises(ValueError, match=r"document 1 is a URL \('https://x.org/a.jpg'\)"):
        reranker.rank("a cat", ["img0", "https://x.org/a.jpg"])
    with pytest.raises(ValueError, match="document 0 is not a decodable image"):
        reranker.rank("a cat", [b"not an image"])
    with pytest.raises(ValueError, match=r"uint8 \[H, W\].*got float32 \[4, 32\]"):
        reranker.rank("a cat", [np.zeros((4, 32), np.float32)])
    with pytest.raises(ValueError, match=r"\{\"image\": \.\.\.\}.*keys \['image', 'text'\]"):
        reranker.rank("a cat", [{"image": "img0", "text": "a cat"}])
    calls = {
        "predict": lambda: reranker.predict([("a cat", "img0")], batch_size=0),
        "rank": lambda: reranker.rank("a cat", IDS, batch_size=0),
        "rank_many": lambda: reranker.rank_many(["a cat"], [[0]], batch_size=0),
    }
    for method, call in calls.items():
        with pytest.raises(ValueError, match=f"{method}: batch_size must be a positive integer"):
            call()
    with pytest.raises(ValueError, match="position 6 is past the 6 ids"):
        reranker.rank_many(["a cat"], [[0, 6]])
    with pytest.raises(ValueError, match="2 rows for 1 queries"):
        reranker.rank_many(["a cat"], [[0], [1]])
    with pytest.raises(ValueError, match="EDJEModel object needs its processor"):
        EDJEReranker(model)


def test_docstring_example_runs():
    import edje.rerank

    result = doctest.testmod(edje.rerank, optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed
