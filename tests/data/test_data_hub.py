"""Hub data set ids for every `--data` (edje.data.hub), offline: a small imagefolder set put in
the datasets cache where an online `load_dataset` of its repo id leaves it, and local
DatasetDicts standing in for `datasets.load_dataset` where the test asserts the exact call."""

from __future__ import annotations

import shutil
import sys
from unittest.mock import patch

import datasets
import pytest
from datasets.data_files import DataFilesDict
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image

from edje.data import SCHEMA, load_data
from tests.helpers.data_files import write_images, write_jsonl

REPO = "user/my-captions"


def cache_like_the_hub(local, repo_id, cache, work):
    """`local` (split folders in imagefolder's layout) prepared into `cache` as a Hub load of
    `repo_id` leaves it: `<owner>___<name>/<config>/<version>/<hash>`, which datasets reads
    back offline."""
    owner, name = repo_id.split("/")
    files = DataFilesDict.from_patterns({s.name: [str(s / "*")] for s in local.iterdir()})
    builder = ImageFolder(cache_dir=str(work), dataset_name=name, data_files=files, hash="c0ffee")
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / "default" / "0.0.0"
    target.mkdir(parents=True)
    shutil.move(builder.cache_dir, target / "c0ffee")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """REPO in an otherwise empty datasets cache: train/ and val/ with a `text` column."""
    local = tmp_path / "my-captions"
    for split, count in (("train", 3), ("val", 2)):
        write_images(local / split, [f"{i}.png" for i in range(count)])
        write_jsonl(local / split, [{"file_name": f"{i}.png", "text": f"{split} {i}"}
                                    for i in range(count)])  # fmt: skip
    cache = tmp_path / "datasets-cache"
    cache_like_the_hub(local, REPO, cache, tmp_path / "work")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return local


def test_hub_dataset_id_in_the_datasets_cache_loads_offline_as_imagefolder_reads_it(hub_cache):
    assert datasets.config.HF_HUB_OFFLINE  # the real load_dataset, from the cache only
    ours = load_data(REPO)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(hub_cache))
    assert sorted(ours) == ["train", "validation"]  # the repo's "val", nothing held out
    assert ours["validation"]["image_id"] == ["val/0", "val/1"]
    assert set(ours["validation"]["split"]) == {"validation"}
    for split in ("train", "validation"):
        assert ours[split].features == SCHEMA
        pixels = [image.getpixel((0, 0)) for image in theirs[split]["image"]]
        assert [image.getpixel((0, 0)) for image in ours[split]["image"]] == pixels
        assert ours[split]["captions"] == [[text] for text in theirs[split]["text"]]


def flickr_1k_test() -> datasets.DatasetDict:
    """nlphuji/flickr_1k_test_image_text_retrieval's columns and split, two rows."""
    names = ["1007129816.jpg", "1009434119.jpg"]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (5, 4), (i, 0, 0)) for i in range(2)],
        "caption": [[f"caption {j} of {n}" for j in range(5)] for n in names],
        "sentids": [[str(5 * i + j) for j in range(5)] for i in range(2)],
        "split": ["test", "test"],
        "img_id": ["0", "1"],
        "filename": names,
    })})  # fmt: skip


def load_dataset_asserting(monkeypatch, repo_id, returned):
    """datasets.load_dataset replaced: it must be called once as `load_dataset(repo_id)`."""
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        assert (args, kwargs) == ((repo_id,), {}), (args, kwargs)
        return returned

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_hub_dataset_id_flickr_1k_columns_found_by_name_with_the_exact_load_dataset_call(
    monkeypatch,
):
    repo = "nlphuji/flickr_1k_test_image_text_retrieval"
    calls = load_dataset_asserting(monkeypatch, repo, flickr_1k_test())
    test = load_data(repo, splits=["test"])["test"]
    assert len(calls) == 1
    assert test.features == SCHEMA and test["image_id"] == ["1007129816", "1009434119"]
    assert test[1]["captions"] == [f"caption {j} of 1009434119.jpg" for j in range(5)]
    assert test[1]["image"].getpixel((0, 0)) == (1, 0, 0)

    from edje.commands.eval import load_split

    assert load_split([repo], "test")["image_id"] == test["image_id"]


def test_hub_dataset_named_columns_split_aliases_merged_rows_with_the_exact_load_dataset_call(
    monkeypatch,
):
    """One row per caption (COCO style) under other column names, splits `dev` and `testing`."""

    def rows(first):
        return datasets.Dataset.from_dict({
            "jpg": [Image.new("RGB", (4, 4), (first + i // 2, 0, 0)) for i in range(4)],
            "sentence": [f"photo {first + i // 2}, caption {i % 2}" for i in range(4)],
            "photo": [f"p{first + i // 2}" for i in range(4)],
            "id": list(range(4)),  # one per caption: not an image id
        })  # fmt: skip

    repo = "someone/captions-by-row"
    load_dataset_asserting(monkeypatch, repo, datasets.DatasetDict(dev=rows(0), testing=rows(10)))
    splits = load_data(repo, image_column="jpg", caption_column="sentence", id_column="photo")
    assert sorted(splits) == ["test", "validation"]
    assert splits["test"]["image_id"] == ["p10", "p11"]
    assert splits["test"]["captions"] == [
        ["photo 10, caption 0", "photo 10, caption 1"],
        ["photo 11, caption 0", "photo 11, caption 1"],
    ]
    assert splits["validation"][1]["image"].getpixel((0, 0)) == (1, 0, 0)
    found = load_data(repo, image_column="jpg", caption_column="sentence")["test"]
    assert found["image_id"] == ["testing/0", "testing/1", "testing/2", "testing/3"]  # no id column


def test_hub_dataset_without_known_columns_names_those_it_has_with_the_exact_load_dataset_call(
    monkeypatch,
):
    only = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "label": ["cat"]})
    load_dataset_asserting(monkeypatch, "user/labels", datasets.DatasetDict(train=only))
    with pytest.raises(ValueError, match=r"user/labels \(train split\): no caption column 'caption'"
                       r" or 'captions' or 'text' or 'sentences' or 'sentence'; its columns are "
                       r"\['image', 'label'\]"):  # fmt: skip
        load_data("user/labels")
    with pytest.raises(ValueError, match=r"no image column 'photo'; its columns are"):
        load_data("user/labels", image_column="photo", caption_column="label")
    only = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "text": ["a cat"]})
    load_dataset_asserting(monkeypatch, "user/odd", datasets.DatasetDict(holdout=only))
    with pytest.raises(ValueError, match=r"no train, validation or test split; its splits are "
                       r"\['holdout'\]"):  # fmt: skip
        load_data("user/odd")


def test_hub_dataset_ids_repeated_across_splits_are_refused_with_the_exact_load_dataset_call(
    monkeypatch,
):
    def split():
        return datasets.Dataset.from_dict(
            {"image": [Image.new("RGB", (4, 4))], "text": ["a cat"], "image_id": ["7"]}
        )

    twice = datasets.DatasetDict(train=split(), test=split())
    load_dataset_asserting(monkeypatch, "user/ids", twice)
    with pytest.raises(ValueError, match=r"image ids of user/ids collide \('7' is in two rows; "
                       r"the second in test\)"):  # fmt: skip
        load_data("user/ids")


def test_only_owner_name_shaped_names_that_are_not_folders_go_to_the_hub(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError(f"load_dataset called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", never)
    for name in ("flickr", "./user/x", "user/x/y", "user//x"):
        with pytest.raises(ValueError, match=r"a Hub data set id \(owner/name\), got"):
            load_data(name)
    folder = write_images(tmp_path / "user" / "photos", ["a.png"])
    write_jsonl(folder, [{"file_name": "a.png", "caption": "a dark square"}])
    monkeypatch.chdir(tmp_path)
    assert load_data("user/photos")["train"]["image_id"] == ["a"]  # the local folder wins
    with pytest.raises(ValueError, match=r"image_column: column options are for a Hub data set "
                       r"\(and caption_column for a folder's metadata\); 'user/photos' is a "
                       r"folder"):  # fmt: skip
        load_data("user/photos", image_column="jpg")
    with pytest.raises(ValueError, match=r"id_column: column options .* 'builtin' is neither"):
        load_data("builtin", id_column="photo")


def test_hub_ids_are_named_in_a_model_cards_datasets(tmp_path):
    from edje.data.load import hub_datasets

    assert hub_datasets(f"builtin+{REPO}+coco+{tmp_path}") == [REPO, "yerevann/coco-karpathy"]


@pytest.mark.parametrize("command", ["eval", "encode"])
def test_an_uncached_hub_id_offline_is_one_line_and_exit_code_2_through_the_cli(
    command, tmp_path, monkeypatch, capsys
):
    from edje.cli import run

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    argv = {
        "eval": ["eval", "--first-stage", "train-builtin", "--data", "nobody/absent-set"],
        "encode": ["encode", "--vision", "x", "--data", "nobody/absent-set", "--out",
                   str(tmp_path / "s")],
    }[command]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info, patch.object(sys, "argv", ["edje", *argv]):
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("edje: error: 'nobody/absent-set' is neither a local folder nor a "
                             "Hub data set in the datasets cache")  # fmt: skip
    assert "the Hub is offline (HF_HUB_OFFLINE=1)" in err[0]
    assert not (tmp_path / "s").exists()


def test_encode_eval_and_fit_pass_their_column_options_to_the_hub_loader(monkeypatch):
    from edje.cli import build_parser
    from edje.commands.encode import _load_source
    from edje.commands.eval import load_split
    from edje.training.datamodule import EDJEDataModule

    one = datasets.Dataset.from_dict(
        {"pic": [Image.new("RGB", (4, 4))], "words": ["a cat"], "key": ["k.jpg"]}
    )
    load_dataset_asserting(monkeypatch, "user/renamed", datasets.DatasetDict(test=one))
    options = ["--caption-column", "words", "--image-column", "pic", "--id-column", "key"]
    args = build_parser().parse_args(
        ["encode", "--vision", "v", "--data", "user/renamed", "--split", "testing", "--out", "o",
         *options]
    )  # fmt: skip
    assert list(_load_source(args)["image_id"]) == ["k"]
    columns = dict(caption_column="words", image_column="pic", id_column="key")
    assert load_split(["user/renamed"], "test", **columns)["captions"] == [["a cat"]]
    data = EDJEDataModule(data="user/renamed", **columns)
    assert data._load()["test"]["image_id"] == ["k"]
