"""The real user's path with the authors' checkpoint, offline: the commands of
docs/authors_checkpoint.md run against a fake Hugging Face cache (`tests/helpers/fake_hub.py`: tiny
random models in the real classes under the real repo ids), and edje's first stage, logits and
eval table are compared with the authors' protocol re-implemented here from the facts of their
public code (shahafwa/EDJE): every caption cleaned (`pre_caption`: HTML entities decoded, `_` a
space, punctuation removed, lowercased, whitespace collapsed), SigLIP embeddings (text padded to
64 tokens) ranked by dot product, and the reranker's forward over SigLIP's `last_hidden_state`
(`reference_logits`)."""

from __future__ import annotations

import html
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edje.cli import main
from tests.helpers.authors import authors_tokenizer, reference_logits
from tests.helpers.data_files import FLICKR_FEATURES, write_parquet
from tests.helpers.fake_hub import AUTHORS, SIGLIP, WORDS, build_fake_hub
from tests.helpers.loopback import http_json
from tests.helpers.paths import ROOT

IMAGES, K = 12, 10
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def authors_pre_caption(caption: str) -> str:
    text = html.unescape(html.unescape(caption)).strip().replace("_", " ")
    text = re.sub(f"[{re.escape(string.punctuation)}]", "", text).lower()
    return re.sub(r"\s+", " ", text).strip()


def flickr_style_rows(count: int) -> dict:
    """Flickr30k's test parquet columns; captions capitalised and ending in " .", as theirs."""
    rng = np.random.default_rng(0)
    pick = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    names = [f"{1000092795 + i}.jpg" for i in range(count)]
    return {
        "image": [
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in names
        ],
        "caption": [
            [f"{pick(6).capitalize()} {pick(2).title()} ." for _ in range(5)] for _ in names
        ],
        "sentids": [[str(5 * i + j) for j in range(5)] for i in range(count)],
        "split": ["test"] * count,
        "img_id": [str(i) for i in range(count)],
        "filename": names,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The fake Hub, a Flickr30k test parquet, and `edje convert` of the authors' repo."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("real-user")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
        layout, siglip = build_fake_hub(root / "hub")
        rows = flickr_style_rows(IMAGES)
        write_parquet(root / "flickr30k" / "data" / "test-00000-of-00001.parquet", rows,
                      FLICKR_FEATURES)  # fmt: skip
        assert main(["convert", AUTHORS, "--out", str(root / "edje-authors")]) == 0
        yield dict(root=root, layout=layout, siglip=siglip, rows=rows, patch=patch)


@pytest.fixture(scope="module")
def reference(world):
    """The authors' protocol on the same data: cleaned captions, SigLIP top-k, their logits."""
    from transformers import AutoProcessor

    siglip, rows = world["siglip"], world["rows"]
    processor = AutoProcessor.from_pretrained(SIGLIP)
    captions = [authors_pre_caption(c) for five in rows["caption"] for c in five]
    owner = torch.arange(IMAGES).repeat_interleave(5)
    with torch.no_grad():
        text = processor.tokenizer(captions, padding="max_length", max_length=64,
                                   truncation=True, return_tensors="pt")  # fmt: skip
        texts = siglip.get_text_features(**text).pooler_output  # what the tokenizer gives
        pixels = processor.image_processor(images=rows["image"], return_tensors="pt")
        vision = siglip.vision_model(**pixels)
        images, raw = vision.pooler_output, vision.last_hidden_state  # raw: (I, 576, 32)
    similarity = (
        torch.nn.functional.normalize(texts, dim=-1)
        @ torch.nn.functional.normalize(images, dim=-1).T
    )
    t2i = similarity.topk(K, dim=1).indices  # (T, K)
    i2t = similarity.T.topk(K, dim=1).indices  # (I, K)
    tokenizer = authors_tokenizer()

    def logits(caption_rows, image_rows):
        out, _ = reference_logits(world["layout"], tokenizer,
                                  [captions[c] for c in caption_rows], raw[image_rows])  # fmt: skip
        return out

    t2i_logits = logits(torch.arange(len(captions)).repeat_interleave(K), t2i.flatten())
    i2t_logits = logits(i2t.flatten(), torch.arange(IMAGES).repeat_interleave(K))
    return dict(similarity=similarity, t2i=t2i, i2t=i2t, owner=owner,
                t2i_logits=t2i_logits.view(-1, K), i2t_logits=i2t_logits.view(-1, K))  # fmt: skip


def reference_table(ref) -> dict[str, float]:
    """R@1/5/10 both ways (fractions, clip_benchmark's scale, as report.json keeps them) as
    their evaluation counts them: a hit when the caption's image (or any of the image's
    captions) is in the first k of the top 10, as the first stage ranks them
    and as the logits rerank them (sorted descending, stable)."""
    owner = ref["owner"]
    t2i_order = ref["t2i"].gather(1, ref["t2i_logits"].argsort(dim=1, descending=True, stable=True))
    i2t_order = ref["i2t"].gather(1, ref["i2t_logits"].argsort(dim=1, descending=True, stable=True))
    table = {}
    for k in (1, 5, 10):
        hit = (ref["t2i"][:, :k] == owner[:, None]).any(1)
        table[f"first stage image_retrieval_recall@{k}"] = hit.double().mean()
        hit = (owner[ref["i2t"][:, :k]] == torch.arange(IMAGES)[:, None]).any(1)
        table[f"first stage text_retrieval_recall@{k}"] = hit.double().mean()
        hit = (t2i_order[:, :k] == owner[:, None]).any(1)
        table[f"reranked image_retrieval_recall@{k}"] = hit.double().mean()
        hit = (owner[i2t_order[:, :k]] == torch.arange(IMAGES)[:, None]).any(1)
        table[f"reranked text_retrieval_recall@{k}"] = hit.double().mean()
    return {name: float(value) for name, value in table.items()}


def test_eval_with_siglip2_as_first_stage_gives_the_authors_candidates_logits_and_table(
    world, reference
):
    from edje import EDJEModel, EDJEProcessor
    from edje.commands.eval import load_split
    from edje.evaluation import evaluate
    from edje.first_stage import load_embedding_model

    root = world["root"]
    data = ["flickr30k", str(root / "flickr30k")]
    args = ["eval", "--model", str(root / "edje-authors"), "--first-stage", SIGLIP,
            "--data", *data, "--out", str(root / "eval"), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((root / "eval" / "report.json").read_text())
    table = {f"{row} {name}": value for row in ("first stage", "reranked")
             for name, value in report[f"{row.replace(' ', '_')}_metrics"].items()}  # fmt: skip
    assert table == pytest.approx(reference_table(reference), abs=1e-9)
    # The same run through the library: candidates and logits, pair by pair.
    model = EDJEModel.from_pretrained(root / "edje-authors")
    processor = EDJEProcessor.from_pretrained(root / "edje-authors")
    result = evaluate(load_split(data, "test"), load_embedding_model(SIGLIP), model, processor,
                      k=K, device="cpu", show_progress_bar=False)  # fmt: skip
    candidates = result.candidates
    assert torch.equal(candidates.t2i, reference["t2i"])  # every caption's top 10
    assert torch.equal(candidates.i2t, reference["i2t"])
    assert reference["t2i_logits"].std() > 0.1  # the comparison means something
    torch.testing.assert_close(candidates.t2i_rerank, reference["t2i_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(candidates.i2t_rerank, reference["i2t_logits"], rtol=0, atol=1e-5)


def test_encode_then_rerank_and_serve_from_the_store_without_the_vision_tower(world, reference):
    from edje.rerank import EDJEReranker
    from edje.serving import app as serving
    from edje.serving.app import serve_in_background

    root, model = world["root"], str(world["root"] / "edje-authors")
    store = str(root / "flickr.store")
    assert main(["encode", "--model", model, "--data", "flickr30k", str(root / "flickr30k"),
                 "--split", "test", "--out", store, "--accelerator", "cpu", "--devices", "1",
                 "--num-workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert main(["eval", "--model", model, "--first-stage", SIGLIP, "--data", "flickr30k",
                 str(root / "flickr30k"), "--store", store, "--device", "cpu"]) == 0  # fmt: skip
    # The vision tower's weights leave the cache: reading the store must not need them.
    weights = next((root / "hub").glob("models--google--siglip2*/snapshots/*/model.safetensors"))
    weights.rename(weights.with_suffix(".away"))
    try:
        ids = [name.removesuffix(".jpg") for name in world["rows"]["filename"]]
        query = world["rows"]["caption"][0][0]  # "Xxx ... ." as Flickr30k writes captions
        reranker = EDJEReranker(model, store=store, device="cpu")
        hits = reranker.rank(query, ids[:K], activation_fn=torch.nn.Identity())
        expected = reference["t2i_logits"][0]  # the same caption against its 10 candidates
        by_id = {ids[i]: float(v) for i, v in zip(reference["t2i"][0], expected, strict=True)}
        for hit in hits:
            if hit["image_id"] in by_id:
                assert hit["score"] == pytest.approx(by_id[hit["image_id"]], abs=2e-2)  # fp16
        many = reranker.rank_many([query], reference["t2i"][:1], ids=ids)[0]
        assert sorted(h["image_id"] for h in many) == sorted(ids[i] for i in reference["t2i"][0])
        served = {}

        def run_server(app, host, port):  # `edje serve`'s server, on a free loopback port
            with serve_in_background(app) as url:
                served["reply"] = http_json(f"{url}/v1/rerank", {
                    "model": Path(model).name,  # served under its folder's name
                    "query": query, "documents": ids[:3], "top_n": 2})  # fmt: skip

        world["patch"].setattr(serving, "run_server", run_server)
        assert main(["serve", "--model", model, "--store", store, "--device", "cpu"]) == 0
        status, body = served["reply"]
        assert status == 200 and len(body["results"]) == 2
    finally:
        weights.with_suffix(".away").rename(weights)


def test_fit_the_custom_recipe_from_the_converted_model_with_siglip2_first_stage(world):
    root = world["root"]
    folder = root / "photos"
    folder.mkdir()
    rows = []
    for i, (image, five) in enumerate(zip(world["rows"]["image"], world["rows"]["caption"],
                                          strict=True)):  # fmt: skip
        image.save(folder / f"{i:03d}.png")
        rows += [{"file_name": f"{i:03d}.png", "caption": caption} for caption in five]
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    recipe = ROOT / "recipes" / "finetune_custom.yaml"
    args = ["fit", "--config", str(recipe), "--data.data", str(folder),
            "--model.network.init_args.pretrained", str(root / "edje-authors"),
            "--data.first_stage", SIGLIP, "--data.fit_first_stage", "false",
            "--data.store", str(root / "fit.store"), "--data.batch_size", "8",
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
            "--trainer.precision", "32", "--trainer.default_root_dir", str(root / "run"),
            "--trainer.callbacks.dirpath", str(root / "fitted"),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]  # fmt: skip
    assert main(args) == 0
    from edje import EDJEModel

    fitted = EDJEModel.from_pretrained(root / "fitted")
    assert fitted.config.normalize_captions and fitted.config.vision_encoder_name == SIGLIP
