"""The common schema: building, checking, and flattening captions for the metrics."""

from __future__ import annotations

import datasets
import pytest
from PIL import Image

from edje.data import SCHEMA, flatten_captions
from edje.data.schema import check_schema, make_dataset


def tiny(captions):
    images = [Image.new("RGB", (4, 4)) for _ in captions]
    return make_dataset(images, [f"i{n}" for n in range(len(captions))], captions, "test")


def test_make_dataset_has_exactly_the_schema():
    ds = tiny([["a"], ["b", "c"]])
    assert ds.features == SCHEMA
    assert list(ds["split"]) == ["test", "test"]


def test_flatten_captions_gives_texts_and_text_to_image():
    texts, text_to_image = flatten_captions(tiny([["a", "b"], ["c"], ["d", "e", "f"]]))
    assert texts == ["a", "b", "c", "d", "e", "f"]
    assert text_to_image.tolist() == [0, 0, 1, 2, 2, 2]


def test_check_schema_names_missing_columns_and_drops_extra_ones():
    ds = tiny([["a"]]).add_column("extra", [1])
    assert check_schema(ds).column_names == list(SCHEMA)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image_id'\]"):
        check_schema(
            datasets.Dataset.from_dict({"image": [None], "captions": [["a"]], "split": ["x"]})
        )
