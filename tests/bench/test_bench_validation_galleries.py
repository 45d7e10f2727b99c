"""bench/validation_galleries.py writes galleries of validation captions that icons-validation
and earlier galleries do not hold, one image per caption, and says when the split runs out."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers.icons import fixture_icon_source
from tests.helpers.paths import ROOT

BENCH = ROOT / "bench" / "validation_galleries.py"
spec = importlib.util.spec_from_file_location("bench_validation_galleries", BENCH)
galleries = importlib.util.module_from_spec(spec)
spec.loader.exec_module(galleries)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The fixture corpus with one image per evaluation set: its validation shards hold three
    samples, two of them one caption, and `icons-validation` one of the two captions."""
    from edje.data.icon_shards import build_icon_corpus

    out = tmp_path_factory.mktemp("icons")
    build_icon_corpus(
        out, source=fixture_icon_source(), shard_size=4, workers=1, show_progress=False,
        eval_size=1,
    )  # fmt: skip
    return out


def captions(folder):
    lines = (folder / "test" / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line)["caption"] for line in lines]


def test_a_gallery_holds_the_validation_captions_icons_validation_does_not(corpus, tmp_path):
    shards = {caption for _, caption, _ in galleries.validation_samples(corpus)}
    held = captions(corpus / "icons-validation")
    [folder] = galleries.write_galleries(corpus, tmp_path, 1, size=1)
    [caption] = captions(folder)
    assert len(shards) == 2 and held[0] in shards
    assert caption in shards - set(held)
    # fluent-emoji's drawing of icons-validation's caption stays out
    assert [p.name for p in folder.glob("test/*.png")] == ["streamline-emojis__airplane.png"]
    [image] = folder.glob("test/*.png")
    assert image.read_bytes().startswith(b"\x89PNG")

    written = image.stat().st_mtime_ns
    assert galleries.write_galleries(corpus, tmp_path, 1, size=1) == [folder]
    assert image.stat().st_mtime_ns == written  # read, not written again


def test_more_galleries_than_the_split_holds_is_an_error_naming_both(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"2 galleries of 1 need 2 captions .* holds 1\."):
        galleries.write_galleries(corpus, tmp_path, 2, size=1)
    assert list(tmp_path.iterdir()) == []


def test_a_validation_sample_without_its_image_is_an_error_naming_the_shard_and_file(tmp_path):
    import io
    import tarfile

    (tmp_path / "validation").mkdir()
    shard = tmp_path / "validation" / "validation-000000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("icon__cat.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    with pytest.raises(
        ValueError, match=r"validation-000000\.tar has icon__cat\.txt but no icon__cat\.png"
    ):
        list(galleries.validation_samples(tmp_path))
