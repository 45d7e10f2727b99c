"""The built-in offline set: generated scenes of coloured shapes whose captions bind attributes.

Each two-object scene comes as a triplet of near-identical images: the scene, the same scene
with the two colours swapped, and the same mirrored so the relation flips. A dual encoder
confuses "a small red circle left of a large blue square" with its swapped and mirrored
twins; a joint encoder should not. Train also holds one-object scenes.

Compositional hold-out: a "family" is two object types (size + shape), a pair of colours and
an axis (horizontal or vertical). Every caption names exactly one family, and validation and
test draw their triplets from families that train never uses, so no test caption occurs in
train, though every word and attribute does. Everything (families, jitter, images) follows
from `seed`: the same seed gives byte-identical images.

Example:
    >>> from edje.data.builtin import make_builtin_dataset
    >>> ds = make_builtin_dataset(seed=0, n_train_triplets=4, n_train_single=2,
    ...                           n_val_triplets=1, n_test_triplets=2)
    >>> {split: len(ds[split]) for split in ds}
    {'train': 14, 'validation': 3, 'test': 6}
    >>> ds["test"][0]["captions"][0]  # doctest: +SKIP
    'a large green triangle above a small orange square'
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image, ImageDraw

from edje.data.schema import make_dataset

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneObject",
    "make_builtin_dataset",
    "make_builtin_scenes",
    "render_scene",
    "save_builtin_dataset",
]

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.10, "large": 0.18}  # radius as a fraction of the image side
# Two phrasings per relation; the mirror of each and its inverse ("A left of B" = "B right of A").
RELATIONS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
INVERSE = MIRROR  # for these four relations, swapping the objects flips them the same way
AXES = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class SceneObject:
    """One shape; `x`, `y` (centre) and `radius` are fractions of the image side."""

    size: str
    colour: str
    shape: str
    x: float
    y: float
    radius: float

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One image: one object, or two where `objects[0]` is `relation` of `objects[1]`."""

    image_id: str
    objects: tuple[SceneObject, ...]
    relation: str | None = None

    @property
    def captions(self) -> list[str]:
        if self.relation is None:
            return [f"a {self.objects[0].phrase}"]
        a, b = self.objects
        first = RELATIONS[self.relation][0]
        second = RELATIONS[INVERSE[self.relation]][1]
        return [f"a {a.phrase} {first} a {b.phrase}", f"a {b.phrase} {second} a {a.phrase}"]


# ---- families and triplets ----

ObjectType = tuple[str, str]  # (size, shape)


def _families() -> list[tuple[ObjectType, ObjectType, tuple[str, str], str]]:
    """Every (type pair, colour pair, axis), in a fixed order: 28 x 15 x 2 = 840."""
    types = list(itertools.product(SIZES, SHAPES))
    # Two objects of the same type would make the colour swap identical to the mirror.
    return list(
        itertools.product(
            itertools.combinations(types, 2), itertools.combinations(COLOURS, 2), AXES
        )
    )


def _triplet(family, rng: random.Random, prefix: str) -> list[Scene]:
    """The scene, its colour swap and its mirror image, sharing one draw of the jitter."""
    (type_a, type_b), (colour_a, colour_b), axis = family
    if rng.random() < 0.5:
        type_a, type_b = type_b, type_a
    if rng.random() < 0.5:
        colour_a, colour_b = colour_b, colour_a
    relation = rng.choice(AXES[axis])
    # Position along the relation's axis (A in the first slot for "left of" / "above"; image
    # y grows downwards) and across it, jittered; radii jittered around the size.
    along = [0.25 + rng.uniform(-0.03, 0.03), 0.75 + rng.uniform(-0.03, 0.03)]
    if relation in ("right of", "below"):
        along = [1.0 - along[0], 1.0 - along[1]]
    across = [0.5 + rng.uniform(-0.08, 0.08) for _ in range(2)]
    radii = [SIZES[t[0]] * rng.uniform(0.92, 1.08) for t in (type_a, type_b)]

    def scene(suffix: str, colours: tuple[str, str], mirrored: bool) -> Scene:
        objects = []
        for i, ((size, shape), colour) in enumerate(zip((type_a, type_b), colours, strict=True)):
            a = 1.0 - along[i] if mirrored else along[i]
            x, y = (a, across[i]) if axis == "horizontal" else (across[i], a)
            objects.append(SceneObject(size, colour, shape, x, y, radii[i]))
        rel = MIRROR[relation] if mirrored else relation
        return Scene(f"{prefix}-{suffix}", tuple(objects), rel)

    return [
        scene("scene", (colour_a, colour_b), mirrored=False),
        scene("swap", (colour_b, colour_a), mirrored=False),
        scene("mirror", (colour_a, colour_b), mirrored=True),
    ]


def _single(rng: random.Random, image_id: str) -> Scene:
    size, colour, shape = rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES)
    radius = SIZES[size] * rng.uniform(0.92, 1.08)
    x, y = (0.5 + rng.uniform(-0.15, 0.15) for _ in range(2))
    return Scene(image_id, (SceneObject(size, colour, shape, x, y, radius),))


def make_builtin_scenes(
    seed: int = 0,
    n_train_triplets: int = 640,
    n_train_single: int = 120,
    n_val_triplets: int = 50,
    n_test_triplets: int = 100,
) -> dict[str, list[Scene]]:
    """Scene descriptions per split (no pixels): see the module docstring for the hold-out.

    Defaults give 2,040 train images (640 triplets + 120 one-object scenes), 150 validation
    and 300 test images. Train cycles through its families if asked for more triplets than
    there are families (each time with a fresh orientation and jitter).
    """
    families = _families()
    held_out = n_val_triplets + n_test_triplets
    if min(n_train_triplets, n_train_single, n_val_triplets, n_test_triplets) < 0:
        raise ValueError("make_builtin_scenes: split sizes must be >= 0")
    if held_out >= len(families):
        raise ValueError(
            f"make_builtin_scenes: n_val_triplets + n_test_triplets must be below "
            f"{len(families)} (the number of families), got {held_out}"
        )
    rng = random.Random(seed)
    rng.shuffle(families)
    test, val, train_pool = (
        families[:n_test_triplets],
        families[n_test_triplets:held_out],
        families[held_out:],
    )
    train = [train_pool[i % len(train_pool)] for i in range(n_train_triplets)]
    scenes = {
        "train": [s for i, f in enumerate(train) for s in _triplet(f, rng, f"train-{i:04d}")],
        "validation": [s for i, f in enumerate(val) for s in _triplet(f, rng, f"val-{i:04d}")],
        "test": [s for i, f in enumerate(test) for s in _triplet(f, rng, f"test-{i:04d}")],
    }
    scenes["train"] += [_single(rng, f"train-single-{i:04d}") for i in range(n_train_single)]
    return scenes


# ---- pixels ----


def render_scene(scene: Scene, image_size: int = 112) -> Image.Image:
    """Draw a scene as an RGB image (no anti-aliasing: the shapes are flat colours)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x, y, r = obj.x * image_size, obj.y * image_size, obj.radius * image_size
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj.shape == "square":
            h = 0.85 * r  # about the circle's area
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif obj.shape == "triangle":  # pointing up, centroid at (x, y)
            draw.polygon(
                [(x, y - r), (x + 0.866 * r, y + 0.5 * r), (x - 0.866 * r, y + 0.5 * r)], fill=fill
            )
        elif obj.shape == "diamond":
            draw.polygon([(x, y - r), (x + 0.8 * r, y), (x, y + r), (x - 0.8 * r, y)], fill=fill)
        else:
            raise ValueError(f"render_scene: unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return image


def make_builtin_dataset(
    seed: int = 0,
    image_size: int = 112,
    n_train_triplets: int = 640,
    n_train_single: int = 120,
    n_val_triplets: int = 50,
    n_test_triplets: int = 100,
) -> datasets.DatasetDict:
    """The built-in set as a DatasetDict (train / validation / test) in the common schema."""
    scenes = make_builtin_scenes(
        seed, n_train_triplets, n_train_single, n_val_triplets, n_test_triplets
    )
    return datasets.DatasetDict(
        {
            split: make_dataset(
                [render_scene(s, image_size) for s in split_scenes],
                [s.image_id for s in split_scenes],
                [s.captions for s in split_scenes],
                split,
            )
            for split, split_scenes in scenes.items()
        }
    )


def save_builtin_dataset(
    out_dir: str | Path, seed: int = 0, image_size: int = 112, **sizes
) -> Path:
    """Write the set as image folders, one per split, each with a `metadata.jsonl`.

    The result looks like a user's own data: `load_image_folder(out_dir / "test")` reads a
    split back, and `datasets.load_dataset("imagefolder", data_dir=out_dir)` reads them all.
    `sizes` are the `n_*` arguments of `make_builtin_scenes`.
    """
    out_dir = Path(out_dir)
    for split, split_scenes in make_builtin_scenes(seed, **sizes).items():
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for scene in split_scenes:
                file_name = f"{scene.image_id}.png"
                render_scene(scene, image_size).save(folder / file_name)
                metadata.write(json.dumps({"file_name": file_name, "captions": scene.captions}))
                metadata.write("\n")
    return out_dir
