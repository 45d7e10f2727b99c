"""One picture, four doors: `edje encode`, `EDJEReranker`, evaluation and `edje serve` turn a
transparent PNG (composited over white) and a sideways phone JPEG (turned by its EXIF tag) into
the same image tokens, hence the same score; and every scoring backend ranks the shipped model's
candidates alike."""

from __future__ import annotations

import base64
import json
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from edje._utils import load_rgb
from edje.data.schema import make_dataset
from edje.evaluation import evaluate
from edje.first_stage import EmbeddingModel
from edje.rerank import EDJEReranker
from edje.serving.app import RerankerBackend, create_app, serve_in_background
from edje.store.encode import encode_images
from tests.helpers.tiny import TINY_IMAGE_SIZE, make_tiny_model, spread_weights_

CAPTION = "a half transparent red disc"


def transparent_png() -> Image.Image:
    """A red disc on fully transparent pixels, with a soft half-transparent band."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (28, 28, 4), dtype=np.uint8)
    yy, xx = np.mgrid[:28, :28]
    radius = np.hypot(yy - 14, xx - 14)
    rgba[..., 3] = np.where(radius < 8, 255, np.where(radius < 11, 128, 0))
    return Image.fromarray(rgba, "RGBA")


class Flat(EmbeddingModel):
    """A first stage that finds every image equally good: the reranker's logits decide."""

    embedding_dim = 2

    def encode_texts(self, texts, batch_size=256, show_progress_bar=None):
        return torch.nn.functional.normalize(torch.ones(len(texts), 2), dim=-1)

    def encode_images(self, images, batch_size=64, show_progress_bar=None):
        return torch.nn.functional.normalize(torch.ones(len(images), 2), dim=-1)


@pytest.fixture(scope="module")
def model(tiny_processor, tiny_vision_encoder):
    model = spread_weights_(make_tiny_model(tiny_processor, tiny_vision_encoder))
    with torch.no_grad():  # an adapter that passes pixel differences on to the score
        for p in model.adapter.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


def logit_of(model, processor, picture: Image.Image) -> float:
    inputs = processor(text=[CAPTION], images=[picture], return_tensors="pt")
    with torch.no_grad():
        return float(model(**inputs).logits[0])


def logits_through_every_door(model, processor, file, tmp_path) -> dict[str, float]:
    """EDJE's logit for `CAPTION` and the picture in `file`, through each door that decodes it:
    the reranker (PIL image, Path, str, bytes, array), `edje encode`'s store, evaluation and `edje
    serve`."""
    reranker = EDJEReranker(model, processor=processor, device="cpu")
    identity = torch.nn.Identity()
    logits = {}
    documents = {"PIL": Image.open(file), "Path": file, "str": str(file),
                 "bytes": file.read_bytes(), "array": np.asarray(load_rgb(file))}  # fmt: skip
    for door, document in documents.items():
        logits[door] = float(reranker.predict([(CAPTION, document)], activation_fn=identity)[0])

    store_path = tmp_path / "doors.store"
    encode_images(
        file.parent,
        store_path,
        vision_encoder=model.vision_encoder,
        image_processor=processor.image_processor,
        compressor=model.compress,
        fingerprint=model.store_fingerprint(),
        accelerator="cpu",
        devices=1,
        progress=False,
    )
    stored = EDJEReranker(model, store=store_path, processor=processor, device="cpu")
    logits["store"] = float(stored.predict([(CAPTION, file.stem)], activation_fn=identity)[0])

    dataset = make_dataset([Image.open(file), Image.new("RGB", (28, 28))], ["pic", "black"],
                           [[CAPTION], ["a black square"]], "test")  # fmt: skip
    candidates = evaluate(dataset, Flat(), model, processor, k=2, ks=(1,), device="cpu").candidates
    column = candidates.t2i[0].tolist().index(0)  # the picture among the caption's candidates
    logits["evaluate"] = float(candidates.t2i_rerank[0, column])

    document = {"image": base64.b64encode(file.read_bytes()).decode()}
    payload = json.dumps({"query": CAPTION, "documents": [document]}).encode()
    with serve_in_background(create_app(RerankerBackend(reranker))) as url:
        request = urllib.request.Request(f"{url}/v1/rerank", data=payload, method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            score = json.loads(response.read())["results"][0]["relevance_score"]
    logits["serve"] = float(torch.logit(torch.tensor(score, dtype=torch.float64)))
    return logits


def assert_every_door_gives(logits: dict[str, float], reference: float) -> None:
    for door, logit in logits.items():
        tolerance = 1e-2 if door == "store" else 1e-4  # the store keeps float16 tokens
        assert logit == pytest.approx(reference, abs=tolerance), door


def test_a_transparent_png_scores_the_same_through_every_door(model, tiny_processor, tmp_path):
    picture = transparent_png()
    folder = tmp_path / "images"
    folder.mkdir()
    picture.save(folder / "disc.png")
    white = Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture)
    reference = logit_of(model, tiny_processor, white.convert("RGB"))
    # The doors must agree on white: a plain convert("RGB") (black behind) scores otherwise.
    assert abs(logit_of(model, tiny_processor, picture.convert("RGB")) - reference) > 1e-3
    assert_every_door_gives(
        logits_through_every_door(model, tiny_processor, folder / "disc.png", tmp_path), reference
    )


def test_a_sideways_phone_jpeg_scores_as_its_upright_copy_through_every_door(
    model, tiny_processor, tmp_path
):
    from transformers.image_utils import load_image

    folder = tmp_path / "images"
    folder.mkdir()
    sideways = folder / "phone.jpg"
    rng = np.random.default_rng(1)
    pixels = Image.fromarray(rng.integers(0, 255, (24, 48, 3), dtype=np.uint8))  # 48 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    pixels.save(sideways, exif=exif, quality=95)
    upright = load_image(str(sideways))  # transformers' loader turns it; so does datasets.Image
    assert upright.size == (24, 48) and load_rgb(sideways).size == (24, 48)
    reference = logit_of(model, tiny_processor, upright)
    # A decoder that ignores the tag scores otherwise: the test has teeth.
    untagged = Image.fromarray(np.asarray(Image.open(sideways)))
    assert abs(logit_of(model, tiny_processor, untagged) - reference) > 1e-3
    assert_every_door_gives(logits_through_every_door(model, tiny_processor, sideways, tmp_path),
                            reference)  # fmt: skip


def test_every_backend_ranks_the_shipped_models_candidates_alike():
    from edje import EDJEModel, EDJEProcessor
    from edje.quickstart import shipped_checkpoint

    folder = shipped_checkpoint()
    model = EDJEModel.from_pretrained(folder).eval()
    processor = EDJEProcessor.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    # Candidates spread like stored tokens: the shipped adapter's output on random raw tokens.
    raw = torch.randn(12, model.config.vision_num_tokens, model.config.vision_hidden_size,
                      generator=generator)  # fmt: skip
    with torch.no_grad():
        candidates = model.compress(raw * 50)
    captions = ["a small red circle left of a large blue square", "a green triangle"]
    rankings, logits = {}, {}
    for backend in ("torch", "fast", "onnx"):
        reranker = EDJEReranker(model, processor=processor, device="cpu", backend=backend)
        logits[backend] = torch.stack(
            [reranker.scorer.score(caption, candidates).cpu() for caption in captions]
        )
        rankings[backend] = [
            [hit["corpus_id"] for hit in reranker.rank(caption, candidates)] for caption in captions
        ]
    assert rankings["fast"] == rankings["torch"] == rankings["onnx"]
    torch.testing.assert_close(logits["fast"], logits["torch"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits["onnx"], logits["torch"], atol=1e-4, rtol=0)
    assert logits["torch"].std() > 0.05  # the candidates are told apart: the test has teeth


def test_a_large_picture_scores_as_the_processor_makes_it_through_every_door(
    model, tiny_processor, tmp_path
):
    """A 1,536 px picture of 8 px stripes reaches the image processor whole through every door
    (it was box-reduced to 56 px first): the stored tokens are the processor's, and so is every
    door's logit."""
    from edje.image_tokens import reduced
    from edje.store import TokenStore

    folder = tmp_path / "images"
    folder.mkdir()
    stripe = (np.arange(1536) // 8 % 2 * 255).astype(np.uint8)[None, :].repeat(1536, 0)
    picture = Image.fromarray(np.stack([stripe, stripe // 2, 255 - stripe], axis=-1))
    picture.save(folder / "big.png")
    image_processor = tiny_processor.image_processor

    def tokens_of(image: Image.Image) -> torch.Tensor:
        pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return model.compress(model.encode_images(pixels))

    reference = logit_of(model, tiny_processor, picture)
    box_reduced = reduced(picture, TINY_IMAGE_SIZE)  # the processor resizes to that side
    # What the doors made of it before: other tokens, another logit. The test has teeth.
    assert (tokens_of(box_reduced) - tokens_of(picture)).abs().max() > 0.02
    assert abs(logit_of(model, tiny_processor, box_reduced) - reference) > 1e-3  # 10 x 1e-4
    assert_every_door_gives(logits_through_every_door(model, tiny_processor, folder / "big.png",
                                                      tmp_path), reference)  # fmt: skip
    stored = TokenStore.open(tmp_path / "doors.store").gather(["big"])
    torch.testing.assert_close(stored.float(), tokens_of(picture).half().float(), atol=0, rtol=0)
