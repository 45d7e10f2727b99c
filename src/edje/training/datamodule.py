"""`EDJEDataModule`: (caption, raw image tokens) pairs from a `datasets` data set and a raw token
store, with the first stage's embeddings that mining and text recovery need."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION, load_vision_encoder, resolve_backbone
from edje.configuration_edje import clean_caption
from edje.data import flatten_captions, load_data
from edje.training.sampling import NeighbourhoodSampler

logger = logging.getLogger(__name__)


def stable_key(text: str) -> int:
    """A 63-bit integer for a string, equal across processes and runs (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


class EDJEDataModule(LightningDataModule):
    """Pairs for `EDJETrainingModule`, one per caption.

    The raw token store (the vision encoder's tokens of every image of every split) is built on
    first use at `store` and reused after. Images the store could not encode are reported, and
    their captions left out, with a warning naming them.

    Args:
        data: a data set name or folder, or a `DatasetDict`: what `edje.data.load_data` takes.
        store: folder of the raw token store.
        first_stage: an `EmbeddingModel` or the folder/Hub id of one (a saved linear probe, a
            CLIP or SigLIP model of the network's vision encoder); it must embed raw vision
            tokens (`embed_vision_tokens`). `None`: no mining signal (random negatives only)
            and no text-embedding targets.
        fit_first_stage: fit a `LinearProbeEmbedding` on the train split (seconds, on cached
            features) into the folder `first_stage` names, when it does not exist yet. Only
            for vision encoders with a [CLS] token (DINOv2, CLIP); a folder name that is a
            model on the Hub (or in its cache) is refused, so a probe never shadows it.
        vision, vision_image_size: the vision encoder the store is built with (the network's).
        text: the tokenizer's backbone (the network's text encoder).
        backbones: the network's `vision`, `vision_image_size`, `text`, `max_caption_length`
            and `normalize_captions` (`EDJETrainingModule.backbones`; `edje fit` links it), so
            a recipe names them once and training reads captions as the saved model will. A
            value given here as well must agree with it.
        builtin: sizes of the built-in set when `data` is "builtin" (e.g. a reduced one for
            tests: `{"n_train_triplets": 20, "n_test_triplets": 4}`).
        caption_column, image_column, id_column: which columns of a folder's metadata
            (caption only) or of a Hub data set (`data: owner/name`) hold what; default: found
            by their usual names (`edje.data.load_data`).
        max_caption_length: caption tokens kept, `[CLS]` and `[SEP]` included (default: the
            network's, else 64).
        normalize_captions: clean captions with the authors' rule before the first stage and
            the tokenizer read them (`edje.clean_caption`; default: the network's, else off).
        neighbourhood_size: train batches are built of groups of this many captions, a random
            one and captions of the images the first stage ranks closest to it
            (`NeighbourhoodSampler`), so mined negatives include the first stage's confusions;
            1 shuffles plainly.
        neighbourhood_pool: a group's images come from its caption's this many closest images.
    """

    def __init__(
        self,
        data: str | DatasetDict = "builtin",
        store: str = "outputs/raw.store",
        first_stage=None,
        fit_first_stage: bool = False,
        vision: str | None = None,
        vision_image_size: int | None = None,
        text: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        max_caption_length: int | None = None,
        normalize_captions: bool | None = None,
        num_workers: int = 0,
        encode_batch_size: int = 64,
        seed: int = 0,
        builtin: dict[str, int] | None = None,
        caption_column: str | None = None,
        image_column: str | None = None,
        id_column: str | None = None,
        neighbourhood_size: int = 1,
        neighbourhood_pool: int = 8,
        backbones: dict[str, Any] | None = None,
    ):
        super().__init__()
        _check_first_stage_settings(first_stage, fit_first_stage, neighbourhood_size)
        self.data, self.store_path = data, Path(store)
        self.first_stage, self.fit_first_stage = first_stage, fit_first_stage
        self._link_backbones(
            backbones, vision, vision_image_size, text, max_caption_length, normalize_captions
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.encode_batch_size = encode_batch_size
        self.seed = seed
        self.builtin = builtin
        self.columns = dict(
            caption_column=caption_column, image_column=image_column, id_column=id_column
        )
        self.neighbourhood_size, self.neighbourhood_pool = neighbourhood_size, neighbourhood_pool
        self.splits: DatasetDict | None = None
        self.pairs: dict[str, PairTable] = {}

    def _link_backbones(
        self, backbones, vision, vision_image_size, text, max_caption_length, normalize_captions
    ) -> None:
        """The backbone settings: the network's (`backbones`) or those given here (the two must
        agree), else the offline backbones, 64 caption tokens and captions as they are."""
        linked = agreeing(
            backbones or {},
            vision=vision,
            vision_image_size=vision_image_size,
            text=text,
            max_caption_length=max_caption_length,
            normalize_captions=normalize_captions,
        )
        self.vision = linked.get("vision") or OFFLINE_VISION
        self.vision_image_size = linked.get("vision_image_size")
        self.text = linked.get("text") or OFFLINE_TEXT
        self.max_caption_length = linked.get("max_caption_length") or 64
        self.normalize_captions = bool(linked.get("normalize_captions"))

    # -- Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build (or finish) the raw token store; runs on one process per machine."""
        from edje.store.encode import encode_store

        splits = self._load()
        vision_model, image_processor = load_vision_encoder(
            self.vision, image_size=self.vision_image_size
        )
        everything = concatenate_datasets(list(splits.values()))
        result = encode_store(
            everything,
            self.store_path,
            vision_encoder=vision_model,
            image_processor=image_processor,
            id_column="image_id",
            image_column="image",
            batch_size=self.encode_batch_size,
            devices=1,
        )
        logger.info(result.summary())
        loaded = not isinstance(self.first_stage, str | Path)  # setup() ran before: it exists
        if self.fit_first_stage and not loaded and not Path(self.first_stage).exists():
            self._fit_first_stage(splits["train"])

    def _load(self) -> DatasetDict:
        return load_data(self.data, seed=self.seed, builtin=self.builtin, **self.columns)

    def _fit_first_stage(self, train: Dataset) -> None:
        """Fit the offline linear probe on the train split's cached raw tokens and captions."""
        from edje.first_stage import LinearProbeEmbedding
        from edje.store import TokenStore

        refuse_probe_folder(str(self.first_stage), self.vision)
        store = TokenStore.open(self.store_path)
        texts, text_to_image = self.captions_of(train)
        ids = list(train["image_id"])
        keep = torch.tensor([ids[i] not in store.failures for i in text_to_image.tolist()])
        usable = [i for i in ids if i not in store.failures]
        row = {image_id: n for n, image_id in enumerate(usable)}
        probe = LinearProbeEmbedding(self.vision, self.text, image_size=self.vision_image_size)
        image_features = torch.cat(
            [
                store.gather(usable[s : s + 256], torch.float32)[:, 0]
                for s in range(0, len(usable), 256)
            ]
        )
        kept_texts = [t for t, k in zip(texts, keep.tolist(), strict=True) if k]
        targets = torch.tensor([row[ids[i]] for i in text_to_image[keep].tolist()])
        text_features = probe.backbones.text_features(kept_texts, 256, None)
        probe.fit(image_features, text_features, targets, seed=self.seed)
        probe.save_pretrained(self.first_stage)
        logger.info("first stage fitted on %d captions: %s", len(kept_texts), self.first_stage)

    def setup(self, stage: str | None = None) -> None:
        if self.pairs:
            return
        from transformers import AutoTokenizer

        from edje.first_stage import load_embedding_model
        from edje.store import TokenStore

        self.splits = self._load()
        self.store = TokenStore.open(self.store_path)
        if isinstance(self.first_stage, str | Path):
            self.first_stage = load_embedding_model(self.first_stage)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(self.text))
        for name, split in self.splits.items():
            texts, text_to_image = self.captions_of(split)
            self.pairs[name] = PairTable.build(
                split, texts, text_to_image, self.store, self.first_stage, name
            )

    def captions_of(self, split: Dataset) -> tuple[list[str], torch.Tensor]:
        """A split's captions as the network reads them (cleaned when `normalize_captions`),
        with the image row of each."""
        texts, text_to_image = flatten_captions(split)
        if self.normalize_captions:
            texts = [clean_caption(t) for t in texts]
        return texts, text_to_image

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if "validation" not in self.pairs:
            return []  # no validation split: Lightning skips validation
        return self._loader("validation", shuffle=False, batch_size=self.eval_batch_size)

    # -- lookups for teachers that need the data itself ----------------------------------------

    def images_by_key(self, keys) -> list:
        """PIL images of image keys (from any split)."""
        return [self._table_with(key, "image_rows").image(key) for key in keys]

    def captions_by_key(self, keys) -> list[str]:
        """Caption texts of caption keys (from any split)."""
        return [self._table_with(key, "caption_texts").caption_texts[key] for key in keys]

    def _table_with(self, key: int, lookup: str) -> PairTable:
        for table in self.pairs.values():
            if key in getattr(table, lookup):
                return table
        raise KeyError(f"EDJEDataModule: no image or caption has key {key}.")

    # -- batches -------------------------------------------------------------------------------

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.pairs:
            raise ValueError(
                f"EDJEDataModule: the data has no {split!r} split (it has {sorted(self.pairs)})."
            )
        pairs = self.pairs[split]
        generator = torch.Generator().manual_seed(self.seed)
        sampler = None
        if shuffle and self.neighbourhood_size > 1:
            sampler = NeighbourhoodSampler(
                pairs.text_embeddings,
                pairs.image_embeddings,
                pairs.image_keys,
                group=self.neighbourhood_size,
                pool=self.neighbourhood_pool,
                seed=self.seed,
                num_replicas=self.trainer.world_size if self.trainer else 1,
                rank=self.trainer.global_rank if self.trainer else 0,
            )
        return DataLoader(
            range(len(pairs)),
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=shuffle,  # equal batch shapes on every process for gathering negatives
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=lambda rows: self.collate(pairs, rows),
        )

    def collate(self, pairs: PairTable, rows: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(rows)
        encoded = self.tokenizer(
            [pairs.captions[i] for i in rows],
            truncation=True,
            max_length=self.max_caption_length,
            padding="max_length",
            return_tensors="pt",
        )
        image_ids = [pairs.image_ids[i] for i in rows]
        return {
            "caption_ids": encoded["input_ids"],
            "caption_mask": encoded["attention_mask"],
            "vision_tokens": self.store.gather(image_ids, dtype=torch.float32),
            "image_key": pairs.image_keys[index],
            "caption_key": pairs.caption_keys[index],
            "text_embedding": pairs.text_embeddings[index],
            "image_embedding": pairs.image_embeddings[index],
        }


def refuse_probe_folder(folder: str, vision: str) -> None:
    """A probe reads the vision encoder's [CLS] token and must not shadow a Hub model."""
    from transformers import AutoConfig

    if re.fullmatch(r"[\w.-]+/[\w.-]+", folder) and _names_a_hub_model(folder):
        raise ValueError(
            f"EDJEDataModule: first_stage {folder!r} is a model on the Hub; set fit_first_stage "
            "to false to use it as the first stage, or name another folder for the probe."
        )
    model_type = AutoConfig.from_pretrained(resolve_backbone(vision)).model_type
    if model_type.startswith("siglip"):
        raise ValueError(
            f"EDJEDataModule: the linear probe reads the vision encoder's [CLS] token, and "
            f"{vision} ({model_type}) has none; give a CLIP / SigLIP id or folder as "
            "first_stage (e.g. the vision encoder's own model) with fit_first_stage false."
        )


def _names_a_hub_model(repo_id: str) -> bool:
    """Whether `repo_id` is a model in the Hub cache, or (online) on the Hub."""
    from huggingface_hub import constants, repo_exists, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return repo_exists(repo_id)
    except Exception:  # the Hub unreachable (its HTTP client's own error type, not OSError
        return False  # with httpx): nothing there that this run could load either


def agreeing(linked: dict[str, Any], **given: Any) -> dict[str, Any]:
    """The given values over the network's, refusing a given value that contradicts it."""
    out = {}
    for name, value in given.items():
        theirs = linked.get(name)
        if value is not None and theirs is not None and value != theirs:
            raise ValueError(
                f"the data section has {name}={value!r} but the network {name}={theirs!r}; "
                "leave it out of the data section (edje fit links it from the model)."
            )
        out[name] = value if value is not None else theirs
    return out


class PairTable:
    """One split's captions with their image ids, keys and first-stage embeddings."""

    def __init__(self, split: Dataset, captions, image_ids, text_embeddings, image_embeddings):
        self.split, self.captions, self.image_ids = split, captions, image_ids
        self.caption_keys = torch.tensor([stable_key(c) for c in captions])
        self.image_keys = torch.tensor([stable_key(i) for i in image_ids])
        self.text_embeddings, self.image_embeddings = text_embeddings, image_embeddings
        self.caption_texts = dict(zip(self.caption_keys.tolist(), captions, strict=True))
        self.image_rows = {stable_key(i): row for row, i in enumerate(split["image_id"])}

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, key: int):
        return self.split[self.image_rows[key]]["image"]

    @classmethod
    def build(
        cls, split: Dataset, texts: list[str], text_to_image, store, first_stage, name: str
    ) -> PairTable:
        ids = split["image_id"]
        failed = [i for i in ids if i in store.failures]
        if failed:
            logger.warning(
                "%s split: %d images could not be encoded and their captions are left out: %s",
                name,
                len(failed),
                ", ".join(f"{i} ({store.failures[i]})" for i in failed[:5]),
            )
        missing = [i for i in ids if i not in store and i not in store.failures]
        if missing:
            raise ValueError(
                f"EDJEDataModule: {len(missing)} images of the {name} split are not in the token "
                f"store {store.path} (e.g. {missing[:3]}); delete it to rebuild, or point "
                "`store` elsewhere."
            )
        keep = [
            k for k, image in enumerate(text_to_image.tolist()) if ids[image] not in store.failures
        ]
        captions = [texts[k] for k in keep]
        image_ids = [ids[int(text_to_image[k])] for k in keep]
        text_embeddings = image_embeddings = torch.zeros(len(keep), 1)
        if first_stage is not None and keep:
            text_embeddings = first_stage.encode_texts(captions)
            distinct = sorted(set(image_ids))
            per_image = torch.cat(
                [
                    first_stage.encode_vision_tokens(
                        store.gather(distinct[s : s + 256], torch.float32)
                    )
                    for s in range(0, len(distinct), 256)
                ]
            )
            position = {image_id: n for n, image_id in enumerate(distinct)}
            image_embeddings = per_image[[position[i] for i in image_ids]]
        return cls(split, captions, image_ids, text_embeddings, image_embeddings)


def _check_first_stage_settings(
    first_stage, fit_first_stage: bool, neighbourhood_size: int
) -> None:
    """Refuse what needs a first stage without one: neighbourhoods, and fitting a probe (into
    the folder `first_stage` names)."""
    if neighbourhood_size > 1 and first_stage is None:
        raise ValueError(
            "EDJEDataModule: neighbourhood_size > 1 groups captions by the first stage's "
            "similarities; give a first_stage."
        )
    if fit_first_stage and not isinstance(first_stage, str | Path):
        raise ValueError(
            "EDJEDataModule: fit_first_stage=True fits a probe into the folder first_stage "
            f"names; got first_stage={first_stage!r}."
        )
