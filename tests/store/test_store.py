"""TokenStore: real safetensors shards in tmp folders, round trips, laziness, damage, atomicity."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from edje.store import StoreCorruptError, TokenStore
from edje.store import format as store_format
from edje.store.fingerprint import fingerprint_diff

M, D = 4, 8


def _ids(n: int, start: int = 0) -> list[str]:
    return [f"img{i:04d}.jpg" for i in range(start, start + n)]


def _make(path, dtype="float16", n=10, shard_size=4, batch=3, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, M, D) * 3
    with TokenStore.create(
        path, token_shape=(M, D), dtype=dtype, fingerprint={"adapter_sha256": "raw"},
        shard_size=shard_size,
    ) as w:  # fmt: skip
        for k in range(0, n, batch):
            w.add(_ids(n)[k : k + batch], x[k : k + batch])
    return x


@pytest.mark.parametrize(
    "dtype, torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
def test_round_trip_is_exact_for_float_dtypes(tmp_path, dtype, torch_dtype):
    x = _make(tmp_path / "s", dtype)
    store = TokenStore.open(tmp_path / "s")
    assert len(store) == 10 and store.ids == _ids(10) and store.dtype == dtype
    got = store.gather(_ids(10))
    assert got.dtype == torch_dtype and got.shape == (10, M, D)
    assert torch.equal(got, x.to(torch_dtype))
    assert torch.equal(store.get("img0003.jpg"), x[3].to(torch_dtype))


def test_int8_error_is_within_half_a_step_per_token(tmp_path):
    x = _make(tmp_path / "s", "int8")
    store = TokenStore.open(tmp_path / "s")
    got = store.gather(_ids(10)).float()
    bound = x.abs().amax(-1, keepdim=True) / 254  # scale / 2, per token
    assert ((got - x).abs() <= bound * 1.01 + 1e-3).all()
    assert store.bytes_per_image == M * D + M * 4
    from safetensors.torch import load_file

    shard = load_file(tmp_path / "s" / store.manifest["shards"][0]["file"])  # plain safetensors
    assert shard["tokens"].dtype == torch.int8 and shard["scales"].dtype == torch.float32
    rows = len(store.manifest["shards"][0]["ids"])
    assert torch.equal((shard["tokens"] * shard["scales"].unsqueeze(-1)).half(), got[:rows].half())
    assert TokenStore.open(tmp_path / "s").token_dtype == torch.float16


def test_int8_paper_shape_fits_25_kb():
    class _Fake:
        dtype, token_shape = "int8", (64, 384)

    assert TokenStore.bytes_per_image.fget(_Fake()) <= 25_000


def test_gather_keeps_the_order_given_across_shards_with_repeats(tmp_path):
    x = _make(tmp_path / "s", n=23, shard_size=5, batch=2)
    store = TokenStore.open(tmp_path / "s")
    assert len(store.manifest["shards"]) > 3
    order = [17, 0, 22, 3, 3, 9, 14, 1, 22]
    assert torch.equal(store.gather([_ids(23)[i] for i in order]), x[order].half())
    assert torch.equal(store.gather_rows(order), x[order].half())
    assert store.gather([]).shape == (0, M, D)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_to_device_gives_the_same_tokens_as_memory_map(tmp_path, dtype):
    _make(tmp_path / "s", dtype, n=11)
    store = TokenStore.open(tmp_path / "s")
    order = _ids(11)[::-2]
    mapped = store.gather(order)
    assert store.device is None
    assert store.to("cpu") is store and store.device == torch.device("cpu")
    assert torch.equal(store.gather(order), mapped)


def test_ids_contains_and_missing_id_error(tmp_path):
    _make(tmp_path / "s")
    store = TokenStore.open(tmp_path / "s")
    assert "img0000.jpg" in store and "nope.jpg" not in store and 3 not in store
    with pytest.raises(KeyError, match=r"nope.jpg"):
        store.gather(["img0000.jpg", "nope.jpg"])


def test_shards_are_plain_safetensors_with_self_describing_headers(tmp_path):
    x = _make(tmp_path / "s", n=6, shard_size=6, batch=6)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["token_shape"] == [M, D]
    shard = manifest["shards"][0]
    with safe_open(tmp_path / "s" / shard["file"], "pt") as f:
        assert torch.equal(f.get_tensor("tokens"), x.half())
        meta = f.metadata()
    assert json.loads(meta["ids"]) == _ids(6) == shard["ids"]
    assert meta["data_sha256"] == shard["data_sha256"]
    assert json.loads(meta["fingerprint"]) == {"adapter_sha256": "raw"}


def test_open_reads_only_the_manifest(tmp_path, monkeypatch):
    _make(tmp_path / "s", n=12)
    calls = []
    real_header, real_memmap = store_format.read_shard_header, np.memmap

    def spy_header(path):
        calls.append(("header", os.path.basename(path)))
        return real_header(path)

    def spy_memmap(*args, **kwargs):
        calls.append(("memmap", os.path.basename(args[0])))
        return real_memmap(*args, **kwargs)

    monkeypatch.setattr("edje.store.reader.read_shard_header", spy_header)
    monkeypatch.setattr(np, "memmap", spy_memmap)
    store = TokenStore.open(tmp_path / "s")
    assert len(store) == 12 and "img0005.jpg" in store and store.fingerprint
    assert calls == []
    store.get("img0007.jpg")  # second shard only (rows 6..11)
    second = "r000-000001.safetensors"
    assert calls[0] == ("header", second) and set(calls[1:]) == {("memmap", second)}  # + sums
    mapped = len(calls)
    store.gather(["img0006.jpg", "img0011.jpg"])
    assert len(calls) == mapped  # mapped once, then reused


def test_truncated_shard_is_detected_on_open_naming_the_file(tmp_path):
    _make(tmp_path / "s")
    shard = tmp_path / "s" / "shards" / "r000-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreCorruptError, match=r"r000-000001.safetensors.*truncated"):
        TokenStore.open(tmp_path / "s")


def test_missing_shard_is_detected_on_open(tmp_path):
    _make(tmp_path / "s")
    (tmp_path / "s" / "shards" / "r000-000000.safetensors").unlink()
    with pytest.raises(StoreCorruptError, match=r"r000-000000.safetensors.*missing"):
        TokenStore.open(tmp_path / "s")


def test_corrupt_data_is_detected_by_verify_naming_the_file(tmp_path):
    _make(tmp_path / "s")
    shard = tmp_path / "s" / "shards" / "r000-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = TokenStore.open(tmp_path / "s")  # same size: open is cheap and does not hash
    with pytest.raises(StoreCorruptError, match=r"r000-000001.safetensors.*sha256"):
        store.verify()
    with pytest.raises(StoreCorruptError, match=r"r000-000001.safetensors"):
        TokenStore.open(tmp_path / "s", verify=True)


def _flip_token_byte(store_path, shard_name: str, row: int) -> None:
    """Flip one byte inside `row`'s tokens, leaving header and size as they were."""
    shard = store_path / "shards" / shard_name
    header = store_format.read_shard_header(shard)
    tokens = header.tensors["tokens"]
    data = bytearray(shard.read_bytes())
    data[tokens.offset + row * (tokens.nbytes // tokens.shape[0]) + 5] ^= 0x10
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_a_flipped_token_byte_is_a_named_error_on_every_read_path(tmp_path, dtype):
    _make(tmp_path / "s", dtype=dtype)
    _flip_token_byte(tmp_path / "s", "r000-000000.safetensors", row=1)
    store = TokenStore.open(tmp_path / "s")
    store.get("img0000.jpg")  # the rows around it still read
    corrupt = r"r000-000000\.safetensors.*'img0001\.jpg' \(row 1\).*checksum"
    with pytest.raises(StoreCorruptError, match=corrupt):
        store.get("img0001.jpg")
    with pytest.raises(StoreCorruptError, match=corrupt):
        store.gather_rows([5, 1, 0])
    with pytest.raises(StoreCorruptError, match=corrupt):
        TokenStore.open(tmp_path / "s").to("cpu")


def _shard_without_checks(path, tokens: np.ndarray, ids: list[str]) -> None:
    """A version 1 shard (no row checksums), as edje wrote before row checksums."""
    metadata = {
        "format": store_format.FORMAT, "dtype": "float16", "ids": json.dumps(ids),
        "failures": "{}", "fingerprint": "{}",
    }  # fmt: skip
    raw = memoryview(np.ascontiguousarray(tokens, np.float16).reshape(-1)).cast("B")
    store_format.write_shard(path, {"tokens": ("F16", tokens.shape, raw)}, metadata)


def test_a_version_1_store_still_reads_and_a_flipped_byte_in_it_is_refused(tmp_path):
    from edje.store.writer import finalize

    (tmp_path / "s" / "shards").mkdir(parents=True)
    tokens = np.random.default_rng(0).standard_normal((3, M, D)).astype(np.float16)
    _shard_without_checks(tmp_path / "s/shards/r000-000000.safetensors", tokens, _ids(3))
    manifest = finalize(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    store = TokenStore.open(tmp_path / "s", verify=True)
    assert torch.equal(store.get("img0002.jpg"), torch.from_numpy(tokens[2]))
    _flip_token_byte(tmp_path / "s", "r000-000000.safetensors", row=2)
    with pytest.raises(StoreCorruptError, match=r"r000-000000\.safetensors.*sha256"):
        TokenStore.open(tmp_path / "s").get("img0000.jpg")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 9}))
    with pytest.raises(StoreCorruptError, match=r"versions 1, 2.*version=9"):
        TokenStore.open(tmp_path / "s")


def test_nan_tokens_with_consistent_hashes_fail_verify_naming_the_image(tmp_path, capsys):
    from edje.cli import main
    from edje.store.writer import finalize

    (tmp_path / "s" / "shards").mkdir(parents=True)
    tokens = np.ones((3, M, D), np.float16)
    tokens[1, 2, 3] = np.nan
    _shard_without_checks(tmp_path / "s/shards/r000-000000.safetensors", tokens, _ids(3))
    finalize(tmp_path / "s")
    with pytest.raises(StoreCorruptError, match=r"NaN or inf tokens \(image 'img0001\.jpg'\)"):
        TokenStore.open(tmp_path / "s").verify()
    assert main(["verify", str(tmp_path / "s")]) == 1
    assert "img0001.jpg" in capsys.readouterr().err


def test_tokens_past_the_store_dtypes_range_are_refused_at_write_time(tmp_path):
    with TokenStore.create(tmp_path / "s", token_shape=(M, D), dtype="float16") as writer:
        with pytest.raises(ValueError, match=r"\['b'\] hold NaN or inf once stored as float16"):
            writer.add(["a", "b"], torch.stack([torch.ones(M, D), torch.full((M, D), 1e5)]))
        writer.add(["a"], torch.ones(1, M, D))  # nothing of the refused call was kept
    assert TokenStore.open(tmp_path / "s", verify=True).ids == ["a"]


def test_corrupt_header_is_detected_on_first_read_naming_the_file(tmp_path):
    _make(tmp_path / "s")
    shard = tmp_path / "s" / "shards" / "r000-000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[10:14] = b"\xff\xfe\x00\x01"
    shard.write_bytes(bytes(data))
    store = TokenStore.open(tmp_path / "s")
    with pytest.raises(StoreCorruptError, match=r"r000-000000.safetensors"):
        store.get("img0000.jpg")
    assert torch.isfinite(store.get("img0009.jpg").float()).all()  # other shards still read


def test_corrupt_manifest_is_reported(tmp_path):
    _make(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match=r"manifest.json"):
        TokenStore.open(tmp_path / "s")


def test_duplicate_ids_are_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "s"
    w = TokenStore.create(path, token_shape=(M, D), shard_size=2)
    with pytest.raises(ValueError, match=r"duplicate ids.*'a'"):
        w.add(["a", "b", "a"], torch.zeros(3, M, D))
    assert list((path / "shards").iterdir()) == [] and w.done_ids == frozenset()
    w.add(["a"], torch.zeros(1, M, D))
    with pytest.raises(ValueError, match=r"duplicate ids.*'a'"):
        w.add(["c", "a"], torch.zeros(2, M, D))  # would fill the shard: nothing flushed
    with pytest.raises(ValueError, match=r"duplicate ids.*'a'"):
        w.add_failures({"a": "broken"})
    assert list((path / "shards").iterdir()) == []
    w.close()
    assert TokenStore.open(path).ids == ["a"]
    with pytest.raises(ValueError, match=r"duplicate ids.*'a'"):  # also against a resumed store
        TokenStore.create(path, token_shape=(M, D), resume=True).add(["a"], torch.zeros(1, M, D))


def test_bad_shapes_types_and_values_are_refused(tmp_path):
    w = TokenStore.create(tmp_path / "s", token_shape=(M, D))
    with pytest.raises(ValueError, match=r"shape \[2, 4, 8\].*got \[2, 4, 9\]"):
        w.add(["a", "b"], torch.zeros(2, M, D + 1))
    with pytest.raises(TypeError, match=r"strings"):
        w.add([1], torch.zeros(1, M, D))
    with pytest.raises(ValueError, match=r"NaN"):
        w.add(["a", "b"], torch.tensor([0.0, float("nan")]).view(2, 1, 1).expand(2, M, D))
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        TokenStore.create(tmp_path / "t", token_shape=(M, D), dtype="float32")


def test_existing_store_needs_resume_or_overwrite(tmp_path):
    _make(tmp_path / "s")
    with pytest.raises(FileExistsError, match=r"resume=True.*overwrite=True"):
        TokenStore.create(tmp_path / "s", token_shape=(M, D))
    with TokenStore.create(tmp_path / "s", token_shape=(M, D), overwrite=True) as w:
        w.add(["z"], torch.ones(1, M, D))
    assert TokenStore.open(tmp_path / "s").ids == ["z"]


def test_overwrite_deletes_only_what_edje_wrote_and_refuses_a_folder_with_other_files(tmp_path):
    _make(tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("mine")  # beside the store: kept
    with TokenStore.create(tmp_path / "s", token_shape=(M, D), overwrite=True) as w:
        w.add(["z"], torch.ones(1, M, D))
    assert TokenStore.open(tmp_path / "s").ids == ["z"]
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    # A user's own shards/ folder (photos) is no store: neither replaced nor written into.
    photos = tmp_path / "photos" / "shards"
    photos.mkdir(parents=True)
    (photos / "holiday.jpg").write_bytes(b"jpeg")
    (photos / "r000-000000.safetensors").write_bytes(b"edje-named")
    for options in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(FileExistsError, match=r"1 files edje did not write.*holiday\.jpg"):
            TokenStore.create(tmp_path / "photos", token_shape=(M, D), **options)
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.jpg", "r000-000000.safetensors"]
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["shards"]
    # A manifest.json that is not a store's is not ours to replace either.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(FileExistsError, match=r"manifest\.json"):
        TokenStore.create(tmp_path / "other", token_shape=(M, D), overwrite=True)
    assert (tmp_path / "other" / "manifest.json").read_text() == '{"name": "my web app"}'


def test_resume_refuses_a_store_of_another_shape_or_fingerprint(tmp_path):
    _make(tmp_path / "s")
    with pytest.raises(StoreCorruptError, match=r"expects float16 \[4, 9\]"):
        TokenStore.create(
            tmp_path / "s", token_shape=(M, D + 1), resume=True,
            fingerprint={"adapter_sha256": "raw"},
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot resume .*fingerprint.*overwrite=True"):
        TokenStore.create(tmp_path / "s", token_shape=(M, D), resume=True, fingerprint={"x": 1})


def test_failures_are_kept_with_reasons_and_tried_again_on_resume(tmp_path):
    with TokenStore.create(tmp_path / "s", token_shape=(M, D), shard_size=2) as w:
        w.add(["a"], torch.ones(1, M, D), failures={"b.jpg": "cannot identify image file"})
        w.add_failures({"c.jpg": "truncated"})
    store = TokenStore.open(tmp_path / "s")
    assert store.ids == ["a"]
    assert store.failures == {"b.jpg": "cannot identify image file", "c.jpg": "truncated"}
    assert "b.jpg" not in store
    with pytest.raises(KeyError, match=r"failed to encode"):
        store.get("b.jpg")
    resumed = TokenStore.create(tmp_path / "s", token_shape=(M, D), resume=True)
    assert resumed.done_ids == {"a"}  # the failed images are tried again
    with resumed:
        resumed.add(["b.jpg"], torch.full((1, M, D), 2.0), failures={"c.jpg": "still truncated"})
    store = TokenStore.open(tmp_path / "s")
    assert store.ids == ["a", "b.jpg"] and store.failures == {"c.jpg": "still truncated"}
    assert torch.equal(store.get("b.jpg").float(), torch.full((M, D), 2.0))
    store.verify()


def test_shard_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    x = _make(tmp_path / "s", n=4, shard_size=4, batch=4)
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    w = TokenStore.create(tmp_path / "s", token_shape=(M, D), resume=True, shard_size=2,
                          fingerprint={"adapter_sha256": "raw"})  # fmt: skip
    real_fsync = os.fsync

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match=r"disk full"):
        w.add(["new1", "new2"], torch.zeros(2, M, D))  # fills a shard -> flush -> crash
    monkeypatch.setattr(os, "fsync", real_fsync)
    names = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    assert names == ["r000-000000.safetensors"]  # no half shard, no temporary left
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    assert torch.equal(TokenStore.open(tmp_path / "s").gather(_ids(4)), x.half())


def test_leftover_temporaries_are_invisible_to_readers_and_removed_on_resume(tmp_path):
    _make(tmp_path / "s")
    junk = tmp_path / "s" / "shards" / "r000-000099.safetensors.tmp-12345"
    junk.write_bytes(b"half a shard")
    (tmp_path / "s" / "manifest.json.tmp-12345").write_text("{")
    assert len(TokenStore.open(tmp_path / "s")) == 10
    TokenStore.create(tmp_path / "s", token_shape=(M, D), resume=True,
                      fingerprint={"adapter_sha256": "raw"})  # fmt: skip
    assert not junk.exists() and not (tmp_path / "s" / "manifest.json.tmp-12345").exists()


def test_store_pickles_without_its_memory_maps(tmp_path):
    x = _make(tmp_path / "s")
    store = TokenStore.open(tmp_path / "s")
    store.get("img0001.jpg")
    clone = pickle.loads(pickle.dumps(store))
    assert all(m is None for m in clone._mapped)
    assert torch.equal(clone.gather(_ids(10)), x.half())


def test_empty_store_opens(tmp_path):
    TokenStore.create(tmp_path / "s", token_shape=(M, D)).close()
    store = TokenStore.open(tmp_path / "s")
    assert len(store) == 0 and store.ids == [] and store.to("cpu").gather([]).shape == (0, M, D)


def test_check_fingerprint_names_both_and_differing_fields(tmp_path):
    fp = {"vision_weights_sha256": "aaa", "adapter_sha256": "raw", "edje_version": "0.1",
          "image_processor": {"size": {"height": 224}}}  # fmt: skip
    with TokenStore.create(tmp_path / "s", token_shape=(M, D), fingerprint=fp) as w:
        w.add(["a"], torch.zeros(1, M, D))
    store = TokenStore.open(tmp_path / "s")
    store.check_fingerprint({**fp, "edje_version": "9.9", "vision_name": "other/name"})
    other = {**fp, "adapter_sha256": "bbb", "image_processor": {"size": {"height": 112}}}
    with pytest.raises(ValueError) as info:
        store.check_fingerprint(other)
    msg = str(info.value)
    assert "adapter_sha256: store='raw', expected='bbb'" in msg
    assert "image_processor.size.height: store=224, expected=112" in msg
    assert "store fingerprint:" in msg and "expected fingerprint:" in msg
    assert "vision_weights_sha256" not in msg.split("store fingerprint")[0]
    with pytest.warns(UserWarning, match=r"adapter_sha256"):
        store.check_fingerprint(other, force=True)


def test_fingerprint_diff_reports_missing_fields():
    assert fingerprint_diff({"a": 1}, {"a": 1, "b": 2}) == {"b": (None, 2)}
    assert fingerprint_diff({"a": 1, "c": 3}, {"a": 1}) == {}  # only what is expected counts
    assert fingerprint_diff({"a": {"x": 1}}, {"a": {"x": 2}}) == {"a.x": (1, 2)}


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_dtype_argument_for_int8_and_float_stores(tmp_path, out):
    x = _make(tmp_path / "q", "int8")
    q = TokenStore.open(tmp_path / "q")
    got = q.gather(_ids(10), dtype=out)
    assert got.dtype == out
    assert ((got.float() - x).abs() <= x.abs().amax(-1, keepdim=True) / 127 + 1e-2).all()
    assert torch.equal(q.to("cpu").gather(_ids(10), dtype=out), got)
    _make(tmp_path / "f", "float16")
    assert TokenStore.open(tmp_path / "f").gather(_ids(3), dtype=out).dtype == out


def test_files_and_folders_edje_writes_get_the_umasks_modes_not_0600(tmp_path):
    import stat

    from edje._utils import atomic_folder

    old = os.umask(0o022)
    try:
        _make(tmp_path / "s")
        with atomic_folder(tmp_path / "model") as folder:
            (folder / "config.json").write_text("{}")
    finally:
        os.umask(old)
    files = [tmp_path / "s" / "manifest.json", *(tmp_path / "s" / "shards").iterdir()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def _edit(manifest: dict, change) -> dict:
    edited = json.loads(json.dumps(manifest))
    change(edited)
    return edited


MANIFEST_LIES = {
    "a shard outside the store": (
        lambda m: m["shards"][0].update(file="../../etc/passwd"),
        "names the file '../../etc",
    ),
    "an absolute shard path": (
        lambda m: m["shards"][0].update(file="/etc/passwd"),
        "names the file '/etc/passwd'",
    ),
    "a shard listed twice": (lambda m: m["shards"].append(m["shards"][0]), "listed twice"),
    "an unknown dtype": (lambda m: m.update(dtype="float32"), "dtype 'float32', expected one of"),
    "a count that does not add up": (lambda m: m.update(count=-3), "count -3, but its shards"),
    "rows that are not the ids": (lambda m: m["shards"][0].update(rows=-1), "rows -1 for 6 ids"),
    "ids that are not strings": (lambda m: m["shards"][0]["ids"].__setitem__(0, 7), "strings"),
    "a 3-D token shape": (lambda m: m.update(token_shape=[4, 8, 2]), "token_shape [4, 8, 2]"),
}


@pytest.mark.parametrize("lie", MANIFEST_LIES, ids=list(MANIFEST_LIES))
def test_a_manifest_that_lies_is_refused_at_open_naming_the_field(tmp_path, lie):
    change, message = MANIFEST_LIES[lie]
    _make(tmp_path / "s")
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest_path.write_text(json.dumps(_edit(json.loads(manifest_path.read_text()), change)))
    with pytest.raises(StoreCorruptError, match=re.escape(message)):
        TokenStore.open(tmp_path / "s")


def test_swapped_ids_and_a_foreign_fingerprint_are_caught_at_the_first_read(tmp_path):
    _make(tmp_path / "s")
    manifest_path = tmp_path / "s" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    for change in (
        lambda m: m["shards"][0]["ids"].reverse(),  # would serve another image's tokens
        lambda m: m.update(fingerprint={"adapter_sha256": "another adapter"}),
    ):
        manifest_path.write_text(json.dumps(_edit(good, change)))
        store = TokenStore.open(tmp_path / "s")
        with pytest.raises(StoreCorruptError, match="ids or fingerprint"):
            store.gather([store.ids[0]])


def test_a_second_writer_of_a_store_is_refused_at_once_naming_the_first(tmp_path):
    from edje.store import StoreBusyError

    first = TokenStore.create(tmp_path / "s", token_shape=(M, D))
    first.add(["a"], torch.ones(1, M, D))
    with pytest.raises(StoreBusyError, match=rf"another process \(pid {os.getpid()}\) is writing"):
        TokenStore.create(tmp_path / "s", token_shape=(M, D), resume=True)
    first.close()
    with TokenStore.create(tmp_path / "s", token_shape=(M, D), resume=True) as second:
        second.add(["b"], torch.ones(1, M, D))
    assert TokenStore.open(tmp_path / "s").ids == ["a", "b"]


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_a_link_or_fifo_at_the_lock_name_is_refused_and_its_target_left_alone(tmp_path, planted):
    from edje.store.lock import LOCK_NAME, StoreLockError

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (tmp_path / "s").mkdir()
    lock = tmp_path / "s" / LOCK_NAME
    lock.symlink_to(victim) if planted == "symlink" else os.mkfifo(lock)
    with pytest.raises(
        StoreLockError, match=r"edje-write\.lock is (a symbolic link|not a regular)"
    ):
        TokenStore.create(tmp_path / "s", token_shape=(M, D))
    assert victim.read_text() == "the user's file"
    assert os.path.lexists(lock)  # not edje's to remove either


def test_an_encode_into_a_store_another_process_is_writing_fails_and_leaves_it_alone(
    tmp_path, tiny_vision_encoder, tiny_image_processor
):
    import subprocess
    import sys

    from PIL import Image

    from edje.store import StoreBusyError
    from edje.store.encode import encode_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (28, 28), (200, 10, 10)).save(folder / "a.png")
    _make(tmp_path / "s", n=2, shard_size=2, batch=2)
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "s").rglob("*") if p.is_file())
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from edje.store import store_lock\n"
         f"with store_lock({str(tmp_path / 's')!r}):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusyError, match=f"pid {holder.pid}"):
            encode_images(
                folder, tmp_path / "s", vision_encoder=tiny_vision_encoder,
                image_processor=tiny_image_processor, accelerator="cpu", devices=1,
                progress=False, overwrite=True,
            )  # fmt: skip
    finally:
        holder.communicate("")
    after = sorted((p.name, p.read_bytes()) for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert after == before  # nothing written, nothing deleted


def _verify(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edje.cli", "verify", str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _nan_tokens(shard) -> None:
    """Overwrite a shard's token bytes with NaN (fp16 0xffff) in place."""
    raw = bytearray(shard.read_bytes())
    header_size = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + header_size])["tokens"]["data_offsets"]
    raw[8 + header_size + start : 8 + header_size + end] = b"\xff" * (end - start)
    shard.write_bytes(bytes(raw))


def test_edje_verify_says_intact_or_names_the_corrupt_shard(tmp_path):
    _make(tmp_path / "s", n=4, shard_size=2, batch=2)
    ok = _verify(tmp_path / "s")
    assert ok.returncode == 0 and "intact: 4 images in 2 shards" in ok.stdout, ok.stderr
    shard = sorted((tmp_path / "s" / "shards").iterdir())[1]
    _nan_tokens(shard)
    TokenStore.open(tmp_path / "s")  # still opens: only a whole read finds a flipped byte
    bad = _verify(tmp_path / "s")
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert "is corrupt" in line and shard.name in line and "sha256" in line, line


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    code = "import sys; from edje.cli import run; sys.argv = ['edje', *sys.argv[1:]]; run()"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )


def test_a_fifo_in_a_store_or_given_as_a_shard_is_refused_not_waited_on(tmp_path):
    _make(tmp_path / "s", n=2)
    (tmp_path / "s" / "manifest.json").unlink()
    os.mkfifo(tmp_path / "s" / "manifest.json")
    verify = _run_cli("verify", str(tmp_path / "s"))
    assert verify.returncode == 2 and "manifest.json is a FIFO" in verify.stderr
    assert len(verify.stderr.strip().splitlines()) == 1
    os.mkfifo(tmp_path / "shard.tar")
    encode = _run_cli("encode", "--vision", "x", "--shards", str(tmp_path / "shard.tar"),
                      "--out", str(tmp_path / "out"))  # fmt: skip
    assert encode.returncode == 2 and "shard.tar is a FIFO" in encode.stderr, encode.stderr
    assert not (tmp_path / "out").exists()


ODD_MANIFESTS = {
    "a list": [],
    "a string": "store",
    "fingerprint a list": {"fingerprint": []},
    "nested ids": {"shards": [{"ids": [["a"]]}]},
    "sha256 a number": {"shards": [{"data_sha256": 7}]},
}


@pytest.mark.parametrize("odd", sorted(ODD_MANIFESTS))
def test_verify_on_odd_json_is_a_named_corruption_not_a_traceback(tmp_path, odd, capsys):
    from edje.cli import main

    _make(tmp_path / "s", n=2)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    change = ODD_MANIFESTS[odd]
    if isinstance(change, dict):
        for key, value in change.items():
            if key == "shards":
                manifest["shards"][0].update(value[0])
            else:
                manifest[key] = value
    else:
        manifest = change
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(tmp_path / "s")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is corrupt" in error[0] and "manifest" in error[0], error


def test_a_shard_header_of_odd_json_is_named_corrupt(tmp_path):
    (tmp_path / "s").mkdir()
    for n, header in enumerate([b"[1,2,3] ", b'{"__metadata__":[1]}', b'{"__metadata__":{"a":1}}']):
        shard = tmp_path / "s" / f"r000-00000{n}.safetensors"
        shard.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(StoreCorruptError, match="not a safetensors header"):
            store_format.read_shard_header(shard)
