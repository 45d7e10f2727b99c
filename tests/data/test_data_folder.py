"""Your own data: an image folder with metadata.jsonl / .csv / .parquet laid out as datasets'
imagefolder, and from_dataset."""

from __future__ import annotations

import csv

import datasets
import pytest
from PIL import Image

from edje.data import (
    SCHEMA,
    from_dataset,
    load_data,
    load_image_folder,
    read_captions,
    save_builtin_dataset,
)
from tests.helpers.data_files import write_images, write_jsonl


def write_csv(folder, header, rows):
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_jsonl_rows_for_one_file_merge_and_ids_default_to_the_path_without_suffix(tmp_path):
    folder = write_images(tmp_path / "photos", ["a.png", "sub/b.jpg"])
    write_jsonl(
        folder,
        [
            {"file_name": "a.png", "caption": "a dark square"},
            {"file_name": "sub/b.jpg", "captions": ["a red square", " red "], "extra": 1},
            {"file_name": "a.png", "captions": ["nearly black"]},
        ],
    )
    ds = load_image_folder(folder)
    assert ds.features == SCHEMA
    assert list(ds["image_id"]) == ["a", "sub/b"]  # as edje encode --images names them
    assert list(ds["captions"]) == [["a dark square", "nearly black"], ["a red square", "red"]]
    assert list(ds["split"]) == ["photos", "photos"]
    assert ds[1]["image"].getpixel((0, 0)) == (40, 0, 0)


def test_csv_with_caption_and_json_list_captions_and_explicit_ids(tmp_path):
    folder = write_images(tmp_path / "x", ["one.png", "two.png"])
    write_csv(
        folder,
        ["file_name", "caption", "captions", "image_id"],
        [["one.png", "first", "", "id-1"], ["two.png", "", '["second", "2nd"]', "id-2"]],
    )
    ds = load_image_folder(folder, split="test")
    assert list(ds["image_id"]) == ["id-1", "id-2"]
    assert list(ds["captions"]) == [["first"], ["second", "2nd"]]
    assert set(ds["split"]) == {"test"}


def test_builtin_set_saved_as_a_folder_loads_back(tmp_path):
    sizes = dict(n_train_triplets=2, n_train_single=1, n_val_triplets=1, n_test_triplets=2)
    out = save_builtin_dataset(tmp_path / "shapes", seed=0, image_size=32, **sizes)
    ds = load_image_folder(out / "test")
    assert len(ds) == 6 and set(ds["split"]) == {"test"}
    assert ds[0]["image_id"] == "test-0000-scene" and len(ds[0]["captions"]) == 2


def test_missing_listed_file_names_the_file(tmp_path):
    folder = write_images(tmp_path / "f", ["a.png"])
    write_jsonl(
        folder, [{"file_name": "a.png", "caption": "x"}, {"file_name": "gone.png", "caption": "y"}]
    )
    with pytest.raises(FileNotFoundError, match=r"'gone\.png' is listed but .*gone\.png"):
        load_image_folder(folder)


@pytest.mark.parametrize("caption", ["", "   ", [], ["ok", " "]])
def test_empty_or_whitespace_caption_names_the_row(tmp_path, caption):
    folder = write_images(tmp_path / "f", ["a.png", "b.png"])
    write_jsonl(
        folder,
        [{"file_name": "a.png", "caption": "fine"}, {"file_name": "b.png", "captions": caption}],
    )
    with pytest.raises(ValueError, match=r"row 2 \(b\.png\)"):
        load_image_folder(folder)


def test_uncaptioned_images_raise_or_are_skipped_with_a_warning(tmp_path):
    folder = write_images(tmp_path / "f", ["a.png", "b.png", "c.png"])
    write_jsonl(folder, [{"file_name": "a.png", "caption": "x"}])
    with pytest.raises(ValueError, match=r"2 image\(s\) .* no caption .*'b\.png', 'c\.png'"):
        load_image_folder(folder)
    with pytest.warns(UserWarning, match="skipped"):
        ds = load_image_folder(folder, skip_uncaptioned=True)
    assert list(ds["image_id"]) == ["a"]


def test_wrong_metadata_columns_list_expected_and_given(tmp_path):
    folder = write_images(tmp_path / "f", ["a.png"])
    write_csv(folder, ["path", "label"], [["a.png", "x"]])
    with pytest.raises(
        ValueError,
        match=r"expected columns 'file_name' and 'caption', 'captions' or 'text' .*"
        r"\['label', 'path'\]; name another caption column with caption_column=",
    ):
        load_image_folder(folder)
    write_csv(folder, ["file_name", "label"], [["a.png", "x"]])
    with pytest.raises(ValueError, match=r"expected columns 'file_name' and 'description'"):
        load_image_folder(folder, caption_column="description")
    assert load_image_folder(folder, caption_column="label")["captions"] == [["x"]]


# ---- the layout of datasets' imagefolder ----


def write_parquet(folder, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), folder / "metadata.parquet")


def test_split_aliases_a_text_column_and_parquet_read_as_imagefolder_reads_them(tmp_path):
    """train/, val/ and testing/ with metadata.parquet and a `text` column: the splits, images
    and captions edje reads equal datasets.load_dataset("imagefolder") on the same folder."""
    root = tmp_path / "photos"
    for split, count in (("train", 3), ("val", 2), ("testing", 2)):
        names = [f"{i}.png" for i in range(count)]
        write_images(root / split, names)
        write_parquet(root / split, [{"file_name": n, "text": f"{split} {n}"} for n in names])
    ours = load_data(str(root))
    theirs = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "c"))
    assert sorted(ours) == sorted(theirs) == ["test", "train", "validation"]  # nothing held out

    def pictures(split):  # (caption, first pixel) per image, in file order
        pairs = [(c[0] if isinstance(c, list) else c, image.getpixel((0, 0)))
                 for c, image in zip(split["captions" if "captions" in split.features else "text"],
                                     split["image"], strict=True)]  # fmt: skip
        return sorted(pairs)

    for split in ("train", "validation", "test"):
        assert pictures(ours[split]) == pictures(theirs[split]), split
    assert ours["validation"]["image_id"] == ["val/0", "val/1"]
    assert set(ours["validation"]["split"]) == {"validation"}


def test_a_text_column_in_jsonl_and_list_captions_in_parquet(tmp_path):
    folder = write_images(tmp_path / "f", ["a.png", "b.png"])
    write_jsonl(folder, [{"file_name": "a.png", "text": "a dark square"},
                         {"file_name": "b.png", "text": "a red square"}])  # fmt: skip
    assert load_image_folder(folder)["captions"] == [["a dark square"], ["a red square"]]
    (folder / "metadata.jsonl").unlink()
    write_parquet(folder, [{"file_name": "a.png", "captions": ["dark", "black"]},
                           {"file_name": "b.png", "captions": ["red"]}])  # fmt: skip
    assert load_image_folder(folder)["captions"] == [["dark", "black"], ["red"]]


def test_images_beside_the_split_folders_are_named_as_not_read(tmp_path):
    folder = write_images(tmp_path / "train", ["a.png"])
    write_jsonl(folder, [{"file_name": "a.png", "caption": "a"}])
    write_images(tmp_path, ["stray.png", "extra/b.png"])
    with pytest.warns(UserWarning, match=r"2 image\(s\) outside them are not read, e.g. "
                      r"\['extra/b.png', 'stray.png'\]"):  # fmt: skip
        splits = load_data(str(tmp_path))
    assert sorted(i for s in splits.values() for i in s["image_id"]) == ["train/a"]


def test_two_folders_of_one_split_are_refused_not_merged(tmp_path):
    for split in ("val", "validation", "train"):
        folder = write_images(tmp_path / split, ["a.png"])
        write_jsonl(folder, [{"file_name": "a.png", "caption": split}])
    with pytest.raises(ValueError, match=r"2 validation folders \(validation/, val/\); keep one"):
        load_data(str(tmp_path))
    with pytest.raises(ValueError, match="caption_column: column options are for a Hub data"):
        load_data("builtin", caption_column="text")


def test_eval_reads_a_split_by_its_alias_and_a_caption_column(tmp_path):
    from edje.commands.eval import load_split

    for split in ("train", "dev"):
        folder = write_images(tmp_path / split, ["a.png"])
        write_jsonl(folder, [{"file_name": "a.png", "description": f"a {split} square"}])
    dev = load_split([str(tmp_path)], "val", caption_column="description")
    assert dev["captions"] == [["a dev square"]] and dev["image_id"] == ["dev/a"]


def test_duplicate_ids_name_both_files(tmp_path):
    folder = write_images(tmp_path / "f", ["a/x.png", "a/x.jpg"])
    write_jsonl(
        folder, [{"file_name": "a/x.png", "caption": "1"}, {"file_name": "a/x.jpg", "caption": "2"}]
    )
    both = r"image_id 'a/x' is used by both 'a/x\.png' and 'a/x\.jpg'"
    with pytest.raises(ValueError, match=both):
        load_image_folder(folder)


def test_missing_metadata_and_both_metadata_files(tmp_path):
    folder = write_images(tmp_path / "f", ["a.png"])
    with pytest.raises(FileNotFoundError, match="no metadata"):
        load_image_folder(folder)
    write_jsonl(folder, [{"file_name": "a.png", "caption": "x"}])
    write_csv(folder, ["file_name", "caption"], [["a.png", "x"]])
    with pytest.raises(ValueError, match="keep one"):
        load_image_folder(folder)


# ---- from_dataset ----


def image_rows(n):
    return [Image.new("RGB", (4, 4), (i, i, i)) for i in range(n)]


def test_from_dataset_one_row_per_caption_merges_by_id():
    ds = datasets.Dataset.from_dict(
        {"jpg": image_rows(3), "txt": ["a", "b", "c"], "cocoid": [7, 7, 9], "other": [0, 1, 2]}
    )
    out = from_dataset(
        ds, image_column="jpg", caption_column="txt", id_column="cocoid", split="test"
    )
    assert out.features == SCHEMA
    assert list(out["image_id"]) == ["7", "9"]
    assert list(out["captions"]) == [["a", "b"], ["c"]]
    assert out[1]["image"].getpixel((0, 0)) == (2, 2, 2)


def test_from_dataset_list_captions_row_ids_and_max_captions():
    ds = datasets.Dataset.from_dict({"image": image_rows(2), "caption": [["a", "b", "c"], ["d"]]})
    out = from_dataset(ds, max_captions=2)
    assert list(out["image_id"]) == ["0", "1"]
    assert list(out["captions"]) == [["a", "b"], ["d"]]
    assert set(out["split"]) == {"train"}


def test_from_dataset_missing_column_lists_available_ones():
    ds = datasets.Dataset.from_dict({"image": image_rows(1), "text": ["a"]})
    with pytest.raises(
        ValueError, match=r"\['caption'\] not found; available columns: \['image', 'text'\]"
    ):
        from_dataset(ds)


def test_from_dataset_empty_caption_names_the_row():
    ds = datasets.Dataset.from_dict({"image": image_rows(2), "caption": ["fine", " "]})
    with pytest.raises(ValueError, match="row 1, column 'caption'"):
        from_dataset(ds)


def test_relative_folder_still_loads_after_changing_directory(tmp_path, monkeypatch):
    write_images(tmp_path / "rel", ["a.png"])
    write_jsonl(tmp_path / "rel", [{"file_name": "a.png", "caption": "x"}])
    monkeypatch.chdir(tmp_path)
    ds = load_image_folder("rel")
    monkeypatch.chdir(tmp_path.parent)
    assert ds[0]["image"].size == (6, 6)


SMALL_BUILTIN = dict(n_train_triplets=2, n_train_single=1, n_val_triplets=1, n_test_triplets=2)


def test_names_joined_by_plus_give_each_split_of_all_of_them(tmp_path):
    for split in ("train", "test"):
        write_images(tmp_path / "mine" / split, ["a.png", "b.png"])
        rows = [{"file_name": name, "caption": f"{name} {split}"} for name in ("a.png", "b.png")]
        write_jsonl(tmp_path / "mine" / split, rows)
    builtin = load_data("builtin", builtin=SMALL_BUILTIN)
    mine = load_data(str(tmp_path / "mine"))
    both = load_data(f"builtin+{tmp_path / 'mine'}", builtin=SMALL_BUILTIN)
    assert sorted(both) == sorted(builtin)
    for split in both:
        expected = list(builtin[split]["image_id"]) + list(
            mine[split]["image_id"] if split in mine else []
        )
        assert list(both[split]["image_id"]) == expected, split


def test_names_joined_by_plus_refuse_colliding_image_ids():
    with pytest.raises(ValueError, match="image ids of builtin\\+builtin collide"):
        load_data("builtin+builtin", builtin=SMALL_BUILTIN)


@pytest.mark.parametrize("image_id", [17, "  ", ["a"]])
def test_an_image_id_that_is_not_a_non_empty_string_names_the_row(tmp_path, image_id):
    write_images(tmp_path, ["a.png"])
    write_jsonl(tmp_path, [{"file_name": "a.png", "caption": "a cat", "image_id": image_id}])
    with pytest.raises(ValueError, match=r"row 1 \(a.png\): expected image_id to be a non-empty"):
        load_image_folder(tmp_path)


def test_a_folder_whose_path_holds_a_plus_is_one_folder(tmp_path):
    folder = write_images(tmp_path / "c++" / "photos", ["a.png"])
    write_jsonl(folder, [{"file_name": "a.png", "caption": "a red square"}])
    assert load_data(str(folder))["train"]["image_id"] == ["a"]


def test_read_captions_takes_lines_or_jsonl_and_names_the_bad_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('a cat\n\n{"caption": "a dog"}\n{"text": "a bird"}\n')
    assert read_captions(path) == ["a cat", "a dog", "a bird"]
    path.write_text('a cat\n{"caption": "a dog",\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: not valid JSON"):
        read_captions(path)
    path.write_text('{"label": "a dog"}\n')
    with pytest.raises(ValueError, match=r'captions.jsonl:1: expected a "caption" or "text"'):
        read_captions(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="expected captions"):
        read_captions(path)


def test_hub_datasets_names_only_hub_sources_for_a_card(tmp_path):
    from edje.data.load import hub_datasets

    assert hub_datasets("builtin+flickr30k+coco") == [
        "umaru97/flickr30k_train_val_test",
        "yerevann/coco-karpathy",
    ]
    assert hub_datasets(str(tmp_path)) == [] and hub_datasets("emoji") == []
