"""Data sets: Flickr30k, COCO, your own images, any Hub data set of images and captions by its
id (`load_hub_dataset`), the built-in offline set and emoji.

`load_emoji()` gives real drawings with human-written names offline: Noto Color Emoji
(`apt-get install fonts-noto-color-emoji`) captioned from their CLDR names, split so that test
holds concepts and concept x gender x skin-tone combinations train never shows;
`emoji_slices` cuts it into small sets with disjoint concepts.

Every loader returns a `datasets.Dataset` (a `DatasetDict` of them for the built-in and
emoji sets) with one schema, `edje.data.SCHEMA`:

| column     | feature                      | meaning                                        |
| ---------- | ---------------------------- | ---------------------------------------------- |
| `image`    | `datasets.Image()`           | the picture (decoded to PIL when read)         |
| `image_id` | `Value("string")`            | unique within a data set                       |
| `captions` | `Sequence(Value("string"))`  | one or more non-empty captions of this image   |
| `split`    | `Value("string")`            | `"train"`, `"validation"`, `"test"`, ...       |

`load_data(name_or_folder)` gives the splits of any of them by one name, the same for
`edje fit`, `edje eval`, `edje encode` and `edje index`.

For retrieval, `flatten_captions(ds)` gives every caption in row order and, for each, the
row index of its image: the `text_to_image` that `edje.evaluation.metrics.recall_at_k` takes.

Example:
    >>> from edje.data import make_builtin_dataset
    >>> ds = make_builtin_dataset(seed=0, n_train_triplets=2, n_train_single=1,
    ...                           n_val_triplets=1, n_test_triplets=1)
    >>> row = ds["test"][0]
    >>> sorted(row), row["split"]
    (['captions', 'image', 'image_id', 'split'], 'test')
"""

from edje.data.builtin import make_builtin_dataset, make_builtin_scenes, save_builtin_dataset
from edje.data.columns import from_dataset
from edje.data.emoji import emoji_slices, load_emoji
from edje.data.folder import load_image_folder, read_captions
from edje.data.hub import load_hub_dataset
from edje.data.karpathy import HubSource, load_coco_karpathy, load_flickr30k
from edje.data.load import DATA_NAMES, load_data
from edje.data.schema import SCHEMA, flatten_captions

__all__ = [
    "DATA_NAMES",
    "SCHEMA",
    "HubSource",
    "emoji_slices",
    "flatten_captions",
    "from_dataset",
    "load_coco_karpathy",
    "load_data",
    "load_emoji",
    "load_flickr30k",
    "load_hub_dataset",
    "load_image_folder",
    "make_builtin_dataset",
    "make_builtin_scenes",
    "read_captions",
    "save_builtin_dataset",
]
