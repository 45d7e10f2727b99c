"""encode_images / compress_store in this process: sources, bad images, modes, tokens."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from edje._utils import load_rgb
from edje.store import TokenStore
from edje.store.encode import compress_store, encode_images, find_images
from edje.store.fingerprint import state_dict_sha256


def _photo(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few bytes that claims a huge size (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _encode(source, out, encoder, processor, **kwargs):
    kwargs = {
        "batch_size": 3,
        "shard_size": 4,
        "accelerator": "cpu",
        "devices": 1,
        "progress": False,
        **kwargs,
    }
    return encode_images(source, out, vision_encoder=encoder, image_processor=processor, **kwargs)


@pytest.fixture
def photo_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        _photo(i).save(folder / f"{i}.png")
    _photo(9).save(folder / "sub" / "deep.jpg")
    (folder / "notes.txt").write_text("not listed: not an image suffix")
    return folder


def test_folder_tokens_match_the_vision_encoder(
    photo_folder, tmp_path, tiny_vision_encoder, tiny_image_processor
):
    result = _encode(photo_folder, tmp_path / "raw", tiny_vision_encoder, tiny_image_processor)
    assert result.ok and result.count == 6 and result.encoded == 6 and result.skipped == 0
    store = TokenStore.open(tmp_path / "raw")
    assert store.ids == ["0", "1", "2", "3", "4", "sub/deep"]  # paths without their suffix
    assert store.token_shape == (5, 32) and store.bytes_per_image == 5 * 32 * 2
    pixels = tiny_image_processor(images=[load_rgb(photo_folder / "3.png")], return_tensors="pt")
    with torch.no_grad():
        expected = tiny_vision_encoder(pixel_values=pixels["pixel_values"]).last_hidden_state[0]
    torch.testing.assert_close(store.get("3").float(), expected, atol=2e-3, rtol=2e-3)
    fp = store.fingerprint
    assert fp["adapter_sha256"] == "raw"
    assert fp["vision_weights_sha256"] == state_dict_sha256(tiny_vision_encoder)
    assert fp["image_processor"]["size"] == {"height": 28, "width": 28}


def test_compressor_and_compress_store_agree(
    photo_folder, tmp_path, tiny_vision_encoder, tiny_image_processor
):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    direct = _encode(
        photo_folder, tmp_path / "c", tiny_vision_encoder, tiny_image_processor, compressor=linear
    )
    assert direct.ok and TokenStore.open(tmp_path / "c").token_shape == (5, 16)
    _encode(
        photo_folder, tmp_path / "raw", tiny_vision_encoder, tiny_image_processor, dtype="bfloat16"
    )
    raw = TokenStore.open(tmp_path / "raw")
    result = compress_store(
        raw, tmp_path / "c2", linear, batch_size=4, shard_size=4, progress=False
    )
    assert result.ok and result.count == 6
    c2 = TokenStore.open(tmp_path / "c2")
    with torch.no_grad():
        expected = linear(raw.gather(raw.ids).float()).half()
    assert torch.equal(c2.gather(raw.ids), expected)
    assert c2.fingerprint["adapter_sha256"] == state_dict_sha256(linear)
    assert c2.fingerprint["vision_weights_sha256"] == raw.fingerprint["vision_weights_sha256"]
    c = TokenStore.open(tmp_path / "c")
    assert c.fingerprint == {**c2.fingerprint}  # same encoder, same adapter: same fingerprint
    torch.testing.assert_close(
        c.gather(raw.ids).float(), c2.gather(raw.ids).float(), atol=0.05, rtol=0.05
    )
    again = compress_store(raw, tmp_path / "c2", linear, batch_size=4, progress=False)
    assert again.encoded == 0 and again.skipped == 6  # resumable: nothing left to do


def test_bad_images_are_failures_with_reasons(tmp_path, tiny_vision_encoder, tiny_image_processor):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _photo(0).save(folder / "good.png")
    (folder / "truncated.jpg").write_bytes(_jpeg_bytes(_photo(1, (64, 64)))[:400])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    (folder / "bomb.png").write_bytes(_bomb_png(100_000, 100_000))
    assert (folder / "bomb.png").stat().st_size < 200
    result = _encode(
        folder, tmp_path / "s", tiny_vision_encoder, tiny_image_processor, num_workers=2
    )
    assert not result.ok and result.count == 1
    reasons = TokenStore.open(tmp_path / "s").failures
    assert reasons == result.failures
    assert sorted(reasons) == ["bomb", "text", "truncated", "zero"]
    assert "decompression bomb" in reasons["bomb"]
    assert "truncated" in reasons["truncated"].lower()
    assert "cannot identify image file" in reasons["zero"]
    assert "cannot identify image file" in reasons["text"]
    assert "4 images could not be encoded" in result.summary()


def test_images_past_the_bomb_warning_threshold_are_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 30 = 1200: warning zone
    buf = io.BytesIO()
    _photo(0).save(buf, "PNG")
    with pytest.raises(ValueError, match="decompression bomb"):
        load_rgb(buf.getvalue())


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1", "PT"])
def test_modes_are_converted_to_rgb(mode):
    base = _photo(3)
    if mode == "PT":  # palette with a transparent index
        img = base.convert("P")
        img.info["transparency"] = 0
    else:
        img = (
            base.convert(mode)
            if mode != "I;16"
            else Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 256)
        )
    buf = io.BytesIO()
    img.save(
        buf,
        "TIFF" if mode in ("CMYK", "I;16") else "PNG",
        **({"transparency": 0} if mode == "PT" else {}),
    )
    out = load_rgb(buf.getvalue())
    assert out.mode == "RGB" and out.size == base.size
    if mode == "I;16":
        assert (
            np.abs(np.asarray(out)[..., 0].astype(int) - np.asarray(base.convert("L"))).max() <= 1
        )


def test_transparency_is_composited_over_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_list_of_paths_and_dataset_sources(
    photo_folder, tmp_path, tiny_vision_encoder, tiny_image_processor
):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    paths = [str(photo_folder / f"{i}.png") for i in range(3)]
    r = _encode(
        paths, tmp_path / "a", tiny_vision_encoder, tiny_image_processor, ids=["x", "y", "z"]
    )
    assert r.ok and TokenStore.open(tmp_path / "a").ids == ["x", "y", "z"]
    r = _encode(paths, tmp_path / "b", tiny_vision_encoder, tiny_image_processor)
    assert TokenStore.open(tmp_path / "b").ids == paths

    images = [(photo_folder / f"{i}.png").read_bytes() for i in range(3)] + [b"broken"]
    ds = Dataset.from_dict(
        {"key": [10, 11, 12, 13], "picture": [{"bytes": b, "path": None} for b in images]}
    )
    ds = ds.cast_column("picture", ImageFeature())
    r = _encode(
        ds,
        tmp_path / "c",
        tiny_vision_encoder,
        tiny_image_processor,
        id_column="key",
        image_column="picture",
    )
    store = TokenStore.open(tmp_path / "c")
    assert store.ids == ["10", "11", "12"] and list(r.failures) == ["13"]
    assert torch.equal(store.get("11"), TokenStore.open(tmp_path / "a").get("y"))
    with pytest.raises(KeyError, match="no column 'id'"):
        _encode(ds, tmp_path / "d", tiny_vision_encoder, tiny_image_processor)


def test_duplicate_source_ids_are_refused_before_anything_is_written(
    tmp_path, tiny_vision_encoder, tiny_image_processor
):
    _photo(0).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="duplicate ids"):
        _encode([tmp_path / "a.png"] * 2, tmp_path / "s", tiny_vision_encoder, tiny_image_processor)
    assert not (tmp_path / "s").exists()


def test_rerun_skips_done_images_and_adds_new_ones(
    photo_folder, tmp_path, tiny_vision_encoder, tiny_image_processor
):
    first = _encode(photo_folder, tmp_path / "s", tiny_vision_encoder, tiny_image_processor)
    before = TokenStore.open(tmp_path / "s").gather(
        first_ids := TokenStore.open(tmp_path / "s").ids
    )
    _photo(7).save(photo_folder / "new.png")
    again = _encode(photo_folder, tmp_path / "s", tiny_vision_encoder, tiny_image_processor)
    assert (again.skipped, again.encoded, again.count) == (6, 1, 7)
    assert torch.equal(TokenStore.open(tmp_path / "s").gather(first_ids), before)
    assert first.count == 6
    with pytest.raises(ValueError, match="cannot resume"):
        _encode(
            photo_folder,
            tmp_path / "s",
            tiny_vision_encoder,
            tiny_image_processor,
            fingerprint={"x": 1},
        )
    assert (
        _encode(
            photo_folder, tmp_path / "s", tiny_vision_encoder, tiny_image_processor, overwrite=True
        ).encoded
        == 7
    )


def test_find_images_ids_are_relative_paths_without_suffix_as_data_folders_name_them(
    photo_folder,
):
    assert [i for i, _ in find_images(photo_folder)] == ["0", "1", "2", "3", "4", "sub/deep"]


class _ModelWithAdapter(torch.nn.Module):
    """Stands in for EDJEModel: `compress` runs `adapter`; `store_fingerprint` as expected."""

    def __init__(self, claimed_adapter: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.adapter = torch.nn.Linear(32, 8)
        self.joint = torch.nn.Linear(8, 1)  # not part of the adapter hash
        self.claimed = claimed_adapter

    def compress(self, tokens):
        return self.adapter(tokens)

    def store_fingerprint(self):
        return {"adapter_sha256": self.claimed or state_dict_sha256(self.adapter)}


def test_bound_compress_hashes_only_the_adapter_and_warns_on_disagreement(
    photo_folder, tmp_path, tiny_vision_encoder, tiny_image_processor
):
    model = _ModelWithAdapter()
    _encode(
        photo_folder,
        tmp_path / "a",
        tiny_vision_encoder,
        tiny_image_processor,
        compressor=model.compress,
    )
    store = TokenStore.open(tmp_path / "a")
    assert store.fingerprint["adapter_sha256"] == state_dict_sha256(model.adapter)
    store.check_fingerprint(model.store_fingerprint())
    liar = _ModelWithAdapter(claimed_adapter="0" * 64)
    with pytest.warns(UserWarning, match="adapter_sha256"):
        _encode(
            photo_folder,
            tmp_path / "b",
            tiny_vision_encoder,
            tiny_image_processor,
            compressor=liar.compress,
        )
    with pytest.raises(ValueError, match="adapter_sha256: store="):
        TokenStore.open(tmp_path / "b").check_fingerprint(liar.store_fingerprint())


def test_model_form_makes_the_same_store_as_the_bound_compress_form(
    photo_folder, tmp_path, tiny_vision_encoder, tiny_image_processor
):
    from edje.store.encode import encode_store

    assert encode_images is encode_store  # the older name, kept
    model = _ModelWithAdapter()
    _encode(photo_folder, tmp_path / "old", tiny_vision_encoder, tiny_image_processor,
            compressor=model.compress)  # fmt: skip
    _encode(photo_folder, tmp_path / "new", tiny_vision_encoder, tiny_image_processor,
            model=model)  # fmt: skip
    old, new = TokenStore.open(tmp_path / "old"), TokenStore.open(tmp_path / "new")
    assert new.fingerprint == old.fingerprint and new.ids == old.ids
    assert torch.equal(new.gather(new.ids), old.gather(old.ids))
    with pytest.raises(ValueError, match="not both"):
        _encode(photo_folder, tmp_path / "both", tiny_vision_encoder, tiny_image_processor,
                model=model, compressor=model.compress)  # fmt: skip


def test_every_rank_gets_a_batch_even_when_there_is_no_work():
    from edje.store.encode import rank_batches

    assert rank_batches(5, 0, 2) == [0, 2, 4] and rank_batches(5, 1, 2) == [1, 3]
    assert rank_batches(1, 1, 2) == [1] and rank_batches(0, 0, 1) == [0]  # [n]: an empty batch


def test_rerun_with_nothing_left_rebuilds_a_lost_manifest(
    photo_folder, tmp_path, tiny_vision_encoder, tiny_image_processor
):
    _encode(photo_folder, tmp_path / "s", tiny_vision_encoder, tiny_image_processor)
    before = TokenStore.open(tmp_path / "s").manifest
    (tmp_path / "s" / "manifest.json").unlink()  # as if killed between last shard and manifest
    again = _encode(
        photo_folder, tmp_path / "s", tiny_vision_encoder, tiny_image_processor, num_workers=2
    )
    assert (again.encoded, again.skipped) == (0, 6)
    assert TokenStore.open(tmp_path / "s").manifest == before


def test_an_image_that_failed_is_tried_again_and_its_failure_cleared_once_repaired(
    tmp_path, tiny_vision_encoder, tiny_image_processor
):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _photo(0).save(folder / "good.png")
    (folder / "broken.png").write_text("not an image yet")
    first = _encode(folder, tmp_path / "s", tiny_vision_encoder, tiny_image_processor)
    assert not first.ok and sorted(first.failures) == ["broken"]
    _photo(1).save(folder / "broken.png")  # repaired
    again = _encode(folder, tmp_path / "s", tiny_vision_encoder, tiny_image_processor)
    assert again.ok and again.encoded == 1 and again.skipped == 1
    store = TokenStore.open(tmp_path / "s")
    assert sorted(store.ids) == ["broken", "good"] and store.failures == {}
    store.verify()
