"""The built-in offline set: determinism, schema, the compositional hold-out, and pixels."""

from __future__ import annotations

import json

import datasets
import pytest

from edje.data.builtin import (
    BACKGROUND,
    COLOURS,
    INVERSE,
    Scene,
    make_builtin_dataset,
    make_builtin_scenes,
    render_scene,
    save_builtin_dataset,
)
from edje.data.schema import SCHEMA

SMALL = dict(n_train_triplets=5, n_train_single=3, n_val_triplets=2, n_test_triplets=4)


@pytest.fixture(scope="module")
def scenes():
    return make_builtin_scenes(seed=0)  # default sizes; descriptions only, fast


def png_bytes(ds: datasets.Dataset) -> list[bytes]:
    return [row["bytes"] for row in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def meaning(scene: Scene) -> frozenset:
    """A scene's content regardless of wording: "A left of B" is "B right of A"."""
    if scene.relation is None:
        return frozenset({scene.objects[0].phrase})
    a, b = (o.phrase for o in scene.objects)
    return frozenset({(a, scene.relation, b), (b, INVERSE[scene.relation], a)})


def test_default_sizes(scenes):
    assert {split: len(s) for split, s in scenes.items()} == {
        "train": 2040,
        "validation": 150,
        "test": 300,
    }


def test_same_seed_gives_byte_identical_images_and_other_seed_differs():
    first, again = make_builtin_dataset(seed=3, **SMALL), make_builtin_dataset(seed=3, **SMALL)
    other = make_builtin_dataset(seed=4, **SMALL)
    for split in ("train", "validation", "test"):
        assert png_bytes(first[split]) == png_bytes(again[split])
        assert list(first[split]["captions"]) == list(again[split]["captions"])
    assert png_bytes(first["test"]) != png_bytes(other["test"])


def test_schema_and_split_column():
    ds = make_builtin_dataset(seed=0, image_size=64, **SMALL)
    assert list(ds) == ["train", "validation", "test"]
    for split, part in ds.items():
        assert part.features == SCHEMA
        assert set(part["split"]) == {split}
        assert len(set(part["image_id"])) == len(part)
        assert all(len(c) >= 1 for c in part["captions"])
    assert ds["test"][0]["image"].size == (64, 64)
    assert len(ds["train"]) == 3 * SMALL["n_train_triplets"] + SMALL["n_train_single"]


def test_test_and_validation_captions_never_occur_in_train(scenes):
    train = {c for s in scenes["train"] for c in s.captions}
    train_meanings = {meaning(s) for s in scenes["train"]}
    for split in ("validation", "test"):
        held_out = {c for s in scenes[split] for c in s.captions}
        assert not held_out & train
        assert not {meaning(s) for s in scenes[split]} & train_meanings  # not even reworded


def test_each_test_caption_matches_exactly_one_test_image(scenes):
    for split in ("validation", "test"):
        captions = [c for s in scenes[split] for c in s.captions]
        assert len(captions) == len(set(captions))
        assert len({meaning(s) for s in scenes[split]}) == len(scenes[split])


def test_triplets_are_scene_colour_swap_and_mirror_with_distinct_captions(scenes):
    test = scenes["test"]
    for start in range(0, len(test), 3):
        scene, swap, mirror = test[start : start + 3]
        captions = scene.captions + swap.captions + mirror.captions
        assert len(set(captions)) == 6
        a, b = scene.objects
        assert a.colour != b.colour
        assert (swap.objects[0].colour, swap.objects[1].colour) == (b.colour, a.colour)
        assert [(o.x, o.y) for o in swap.objects] == [(o.x, o.y) for o in scene.objects]
        assert mirror.relation == INVERSE[scene.relation]
        assert mirror.objects[0].phrase == a.phrase


def test_positions_agree_with_the_stated_relation(scenes):
    for scene in scenes["train"] + scenes["test"]:
        if scene.relation is None:
            continue
        a, b = scene.objects
        gap = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}
        assert gap[scene.relation] > a.radius + b.radius  # apart along the axis, no overlap


def test_pixels_at_shape_centres_are_the_named_colours():
    size, sizes = 112, {**SMALL, "n_test_triplets": 6}
    ds = make_builtin_dataset(seed=0, image_size=size, **sizes)
    shapes_seen = set()
    for row, scene in zip(ds["test"], make_builtin_scenes(seed=0, **sizes)["test"], strict=True):
        assert row["image_id"] == scene.image_id
        for image in (row["image"].convert("RGB"), render_scene(scene, size)):
            for obj in scene.objects:
                centre = (int(obj.x * size), int(obj.y * size))
                assert image.getpixel(centre) == COLOURS[obj.colour], (scene.image_id, obj)
                shapes_seen.add(obj.shape)
            assert image.getpixel((0, 0)) == BACKGROUND
    assert len(shapes_seen) >= 3


def test_save_writes_an_image_folder_per_split(tmp_path):
    out = save_builtin_dataset(tmp_path / "shapes", seed=0, image_size=32, **SMALL)
    lines = (out / "test" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 * SMALL["n_test_triplets"]
    first = json.loads(lines[0])
    assert (out / "test" / first["file_name"]).is_file()
    assert first["captions"] == make_builtin_scenes(seed=0, **SMALL)["test"][0].captions


def test_too_many_held_out_triplets_raise():
    with pytest.raises(ValueError, match="number of families"):
        make_builtin_scenes(n_val_triplets=500, n_test_triplets=500)
