"""`edje encode` end to end in this process: raw and --model stores, exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edje.cli import main
from edje.commands import UsageError
from edje.store import TokenStore


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return images


def _args(*extra):
    return ["encode", "--accelerator", "cpu", "--devices", "1", "--num-workers", "0",
            "--batch-size", "2", "--no-progress", *map(str, extra)]  # fmt: skip


def test_encode_raw_store_from_a_vision_folder(
    tmp_path, folder, tiny_vision_encoder, tiny_image_processor, capsys
):
    tiny_vision_encoder.save_pretrained(tmp_path / "vision")
    tiny_image_processor.save_pretrained(tmp_path / "vision")
    code = main(_args("--vision", tmp_path / "vision", "--images", folder, "--out", tmp_path / "s"))
    assert code == 0
    assert "4 images" in capsys.readouterr().out
    store = TokenStore.open(tmp_path / "s")
    assert store.token_shape == (5, 32) and store.fingerprint["adapter_sha256"] == "raw"
    (folder / "bad.jpg").write_bytes(b"")
    code = main(
        _args(
            "--vision",
            tmp_path / "vision",
            "--images",
            folder,
            "--out",
            tmp_path / "s",
            "--dtype",
            "float16",
        )
    )
    assert code == 1  # resumed: the 4 stored images skipped, the bad one failed
    assert "bad.jpg" in capsys.readouterr().err
    assert TokenStore.open(tmp_path / "s").failures.keys() == {"bad"}


def test_encode_compressed_store_with_model(tmp_path, folder, tiny_model, tiny_processor):
    tiny_model.save_pretrained(tmp_path / "edje", save_vision_encoder=True)
    tiny_processor.save_pretrained(tmp_path / "edje")
    code = main(
        _args(
            "--model",
            tmp_path / "edje",
            "--images",
            folder,
            "--out",
            tmp_path / "s",
            "--dtype",
            "int8",
        )
    )
    assert code == 0
    store = TokenStore.open(tmp_path / "s")
    assert store.token_shape == tuple(tiny_model.config.image_token_shape) and store.dtype == "int8"
    pixels = tiny_processor.image_processor(
        images=[Image.open(folder / "2.png").convert("RGB")], return_tensors="pt"
    )
    with torch.no_grad():
        expected = tiny_model.compress(tiny_model.encode_images(pixels["pixel_values"]))[0]
    torch.testing.assert_close(store.get("2").float(), expected, atol=0.05, rtol=0.05)
    if hasattr(tiny_model, "store_fingerprint"):
        store.check_fingerprint(tiny_model.store_fingerprint())


def test_encode_needs_vision_or_model(tmp_path, folder):
    with pytest.raises(UsageError, match="--vision"):
        main(_args("--images", folder, "--out", tmp_path / "s"))


def test_encode_a_saved_dataset_with_named_columns(
    tmp_path, folder, tiny_vision_encoder, tiny_image_processor
):
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    tiny_vision_encoder.save_pretrained(tmp_path / "vision")
    tiny_image_processor.save_pretrained(tmp_path / "vision")
    rows = {"key": ["a", "b"], "picture": [str(folder / "0.png"), str(folder / "1.png")]}
    ds = Dataset.from_dict(rows).cast_column("picture", ImageFeature())
    DatasetDict({"test": ds}).save_to_disk(tmp_path / "ds")
    dataset = ["--dataset", tmp_path / "ds", "--split", "test", "--id-column", "key"]
    columns = ["--image-column", "picture", "--out", tmp_path / "s"]
    code = main(_args("--vision", tmp_path / "vision", *dataset, *columns))
    assert code == 0 and TokenStore.open(tmp_path / "s").ids == ["a", "b"]


@pytest.mark.parametrize("size", ["0", "-1", "two"])
def test_a_batch_size_below_one_is_refused_before_anything_is_made(
    tmp_path, folder, size, tiny_vision_encoder, tiny_image_processor, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "--images", str(folder), "--out", str(tmp_path / "s"),
              "--batch-size", size])  # fmt: skip
    assert exit_info.value.code == 2
    assert f"--batch-size: expected a whole number >= 1, got {size}" in capsys.readouterr().err
    from edje.store.encode import encode_images

    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        encode_images(folder, tmp_path / "s", vision_encoder=tiny_vision_encoder,
                      image_processor=tiny_image_processor, batch_size=0)  # fmt: skip
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "option, refused",
    [
        ({"devices": 0}, r"devices=0"),
        ({"num_workers": -1}, r"num_workers must be 0 or more, got -1"),
        ({"precision": "garbage"}, r"Precision 'garbage' is invalid"),
        ({"accelerator": "garbage"}, r"invalid accelerator name"),
        ({"strategy": "garbage"}, r"invalid strategy name"),
        ({"source": "empty"}, r"no images in .*empty.*nothing to encode"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "-".join(map(str, v.items())),
)
def test_bad_encode_options_and_an_empty_folder_are_refused_before_a_store_folder_is_made(
    tmp_path, folder, option, refused, tiny_vision_encoder, tiny_image_processor
):
    from edje.store.encode import encode_images

    (tmp_path / "empty").mkdir()
    source = tmp_path / option.pop("source") if "source" in option else folder
    with pytest.raises(ValueError, match=refused):
        encode_images(source, tmp_path / "s", vision_encoder=tiny_vision_encoder,
                      image_processor=tiny_image_processor, **option)  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_encode_of_an_empty_folder_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    import sys

    from edje.cli import run

    (tmp_path / "empty").mkdir()
    argv = ["edje", *_args("--vision", "edje:dinov2-small", "--images", tmp_path / "empty",
                           "--out", tmp_path / "s")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2 and not (tmp_path / "s").exists()
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no images in" in error[0]


def test_encode_reads_flickr30k_from_a_local_copy_of_one_split(
    tmp_path, tiny_model, tiny_processor
):
    """`edje encode --data flickr30k DIR --split test`: the test parquet alone, ids as eval's."""
    import datasets

    from tests.helpers.data_files import FLICKR_FEATURES, flickr_rows, write_parquet

    root = tmp_path / "flickr30k"
    write_parquet(root / "data" / "test-00000-of-00001.parquet", flickr_rows("test", 20, 2),
                  datasets.Features(FLICKR_FEATURES))  # fmt: skip
    tiny_model.save_pretrained(tmp_path / "model", save_vision_encoder=True)
    tiny_processor.save_pretrained(tmp_path / "model")
    code = main(_args("--model", tmp_path / "model", "--data", "flickr30k", root,
                      "--split", "test", "--out", tmp_path / "store"))  # fmt: skip
    assert code == 0
    assert TokenStore.open(tmp_path / "store").ids == ["1000020", "1000021"]
