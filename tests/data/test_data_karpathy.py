"""Flickr30k / COCO Karpathy loaders: the column mapping checked against each repository's
schema with tiny local parquet files of the same columns (no Hub access)."""

from __future__ import annotations

import datasets
import pytest
from PIL import Image

from edje.data import SCHEMA, load_coco_karpathy, load_flickr30k
from edje.data.karpathy import COCO_SOURCES, FLICKR30K_SOURCES
from tests.helpers.data_files import FLICKR_FEATURES, flickr_rows, write_parquet


@pytest.fixture(scope="module")
def flickr_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr30k_train_val_test")
    for split, first, n in (("train", 0, 4), ("val", 10, 2), ("test", 20, 3)):
        path = root / "data" / f"{split}-00000-of-00001-abc.parquet"
        write_parquet(path, flickr_rows(split, first, n), FLICKR_FEATURES)
    return root


def test_flickr30k_column_mapping_matches_umaru97_repo_schema_offline(flickr_copy):
    test = load_flickr30k("test", data_dir=flickr_copy)
    assert test.features == SCHEMA
    assert list(test["image_id"]) == ["1000020", "1000021", "1000022"]
    assert test[0]["captions"] == [f"caption {j} of 1000020.jpg" for j in range(5)]
    assert set(test["split"]) == {"test"}
    assert test[2]["image"].getpixel((0, 0)) == (22, 0, 0)
    validation = load_flickr30k("val", data_dir=flickr_copy)  # the repo calls it "val"
    assert len(validation) == 2 and set(validation["split"]) == {"validation"}


def test_flickr30k_data_files_dict_or_list_use_the_same_mapping(flickr_copy):
    files = sorted(str(p) for p in flickr_copy.rglob("test-*.parquet"))
    for data_files in ({"test": files}, files):
        test = load_flickr30k("test", data_files=data_files, max_captions=2)
        assert len(test) == 3
        assert test[0]["captions"] == ["caption 0 of 1000020.jpg", "caption 1 of 1000020.jpg"]


def test_hub_path_asks_for_only_the_split_files(flickr_copy, monkeypatch):
    """The Hub call is redirected to the local copy: checks what is asked for, not the Hub."""
    real_load, calls = datasets.load_dataset, []

    def fake_load(path, data_files=None, split=None, **kwargs):
        calls.append((path, data_files, split))
        ((name, pattern),) = data_files.items()
        local = sorted(str(p) for p in flickr_copy.glob(pattern))
        return real_load("parquet", data_files={name: local}, split=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    test = load_flickr30k("test")
    assert calls == [("umaru97/flickr30k_train_val_test", {"test": "data/test-*.parquet"}, "test")]
    assert len(test) == 3 and test[0]["image_id"] == "1000020"


def coco_rows(split: str, first: int, n: int) -> dict:
    """Rows with yerevann/coco-karpathy's columns (captions and URLs, no images)."""
    folder = "train2014" if split in ("train", "restval") else "val2014"
    ids = [first + i for i in range(n)]
    names = [f"COCO_{folder}_{i:012d}.jpg" for i in ids]
    return {
        "filepath": [folder] * n,
        "sentids": [[5 * i + j for j in range(6)] for i in ids],
        "filename": names,
        "imgid": ids,
        "split": [split] * n,
        "sentences": [[f"sentence {j} of {i}" for j in range(6)] for i in ids],  # 6: trimmed to 5
        "cocoid": ids,
        "url": [f"http://images.cocodataset.org/{folder}/{name}" for name in names],
    }


@pytest.fixture(scope="module")
def coco_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco-karpathy")
    for split, first, n in (
        ("train", 100, 3),
        ("restval", 200, 2),
        ("validation", 300, 2),
        ("test", 400, 3),
    ):
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", coco_rows(split, first, n))
    images = root / "coco2014"
    for split, first, n in (("test", 400, 3),):
        for name in coco_rows(split, first, n)["filename"]:
            (images / "val2014").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (9, 9, 9)).save(images / "val2014" / name)
    return root


def test_coco_column_mapping_matches_yerevann_repo_schema_offline(coco_copy):
    test = load_coco_karpathy("test", data_dir=coco_copy, images_dir=coco_copy / "coco2014")
    assert test.features == SCHEMA
    assert list(test["image_id"]) == ["400", "401", "402"]
    assert test[0]["captions"] == [f"sentence {j} of 400" for j in range(5)]
    assert test[0]["image"].getpixel((0, 0)) == (9, 9, 9)
    train = load_coco_karpathy("train", data_dir=coco_copy, images_dir=None)
    assert list(train["image_id"]) == ["100", "101", "102", "200", "201"]  # train + restval


def test_coco_without_images_dir_keeps_urls_for_lazy_fetching(coco_copy):
    test = load_coco_karpathy("test", data_dir=coco_copy, max_captions=None)
    assert len(test["captions"][0]) == 6  # column access: no image is fetched
    raw = test.cast_column("image", datasets.Image(decode=False))  # no download in tests
    assert (
        raw[0]["image"]["path"]
        == "http://images.cocodataset.org/val2014/COCO_val2014_000000000400.jpg"
    )


def test_coco_missing_local_images_are_listed(coco_copy, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"3 image\(s\) not found .*COCO_val2014_000000000400"
    ):
        load_coco_karpathy("test", data_dir=coco_copy, images_dir=tmp_path)


def test_a_copy_with_other_columns_is_rejected_naming_them(tmp_path):
    rows = flickr_rows("test", 0, 1)
    rows["captions"] = rows.pop("caption")
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(
        ValueError, match=r"\['caption'\] not found.*available columns: .*'captions'"
    ):
        load_flickr30k("test", data_dir=tmp_path)


def test_unknown_split_repo_and_missing_files_raise(flickr_copy, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown split 'restval'; expected one of \['train', 'validation', 'test'\]",
    ):
        load_flickr30k("restval", data_dir=flickr_copy)
    with pytest.raises(ValueError, match="no column mapping for 'someone/flickr'"):
        load_flickr30k("test", repo_id="someone/flickr")
    with pytest.raises(FileNotFoundError, match="no parquet files for split 'test'"):
        load_flickr30k("test", data_dir=tmp_path)


@pytest.mark.hub
@pytest.mark.parametrize("source", [*FLICKR30K_SOURCES.values(), *COCO_SOURCES.values()])
def test_hub_repository_still_has_the_mapped_columns_and_splits(source):
    """Run with ``-m hub`` where the Hub is reachable: streams one row of each split."""
    for names in source.splits.values():
        for name in names:
            row = next(iter(datasets.load_dataset(source.repo_id, split=name, streaming=True)))
            assert set(source.columns) <= set(row), (source.repo_id, name, sorted(row))


def test_a_copy_holding_only_the_test_split_loads_it_alone(tmp_path):
    """Evaluating Flickr30k's 1k test needs only its test parquet: no other split is read."""
    from edje.commands.eval import load_split
    from edje.data import load_data

    root = tmp_path / "flickr30k"
    write_parquet(root / "data" / "test-00000-of-00001.parquet", flickr_rows("test", 20, 3),
                  FLICKR_FEATURES)  # fmt: skip
    splits = load_data("flickr30k", data_dir=str(root), splits=["test"])
    assert list(splits) == ["test"] and splits["test"]["image_id"] == [
        "1000020", "1000021", "1000022",
    ]  # fmt: skip
    assert load_split(["flickr30k", str(root)], "test")["image_id"] == splits["test"]["image_id"]
    with pytest.raises(FileNotFoundError, match="no parquet files for split 'train'"):
        load_data("flickr30k", data_dir=str(root))  # every split: train's files are missing
