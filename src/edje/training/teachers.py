"""Distillation teachers behind one interface: a logit per (caption, image) pair.

- `EDJETeacher`: any saved EDJE, typically the uncompressed "local" variant, reading the same
  raw vision tokens and caption ids as the student.
- `BlipITMTeacher`: BLIP's ITM head (`BlipForImageTextRetrieval`, `use_itm_head=True`); it needs
  pixels and caption text, so its scores are cached on disk and each pair is scored once.
- `FirstStageTeacher`: the first stage's own similarity, free (the data module has its
  embeddings): on a small data set it keeps the reranker agreeing with the first stage where
  ITM alone has too few examples to learn from.

A teacher's scores are match logits (`ranks_only = False`: distilled pair by pair) or scores
that only rank candidates for a query (`ranks_only = True`: distilled on each positive against
its negative, as ITM is trained).
"""

from __future__ import annotations

import math
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edje.modeling_edje import EDJEModel
from edje.processing_edje import append_image_slots


@dataclass
class TeacherPairs:
    """The pairs to score, row by row."""

    caption_ids: torch.Tensor  # (N, Lc) student tokenizer ids, [CLS] caption [SEP], padded
    caption_mask: torch.Tensor  # (N, Lc)
    vision_tokens: torch.Tensor  # (N, n, d_vis) raw tokens of each row's image
    image_keys: torch.Tensor  # (N,) int64 key of each row's image
    caption_keys: torch.Tensor  # (N,) int64 key of each row's caption
    text_embeddings: torch.Tensor | None = None  # (N, e) first stage, each row's caption
    image_embeddings: torch.Tensor | None = None  # (N, e) first stage, each row's image


class Teacher(nn.Module, ABC):
    """Scores pairs for distillation; frozen. `score` returns one logit per row, `[N]`."""

    ranks_only: bool = False

    @abstractmethod
    def score(self, pairs: TeacherPairs) -> torch.Tensor: ...

    def bind_data(
        self,
        images: Callable[[Sequence[int]], list],
        captions: Callable[[Sequence[int]], list[str]],
        first_stage=None,
    ) -> None:
        """Give the teacher the data behind image and caption keys (pixel teachers need it)
        and the first stage that embedded them."""


class FirstStageTeacher(Teacher):
    """The first stage as teacher: a pair's score is its first-stage cosine / `temperature`.

    Distilled as ITM is trained (each positive against its negative, 2-way softmax), this is
    the first stage's own preference between the two candidates under its contrastive
    training. The cosines come with the batch, so the teacher costs nothing.

    Args:
        temperature: the first stage's softmax temperature; None takes the first stage's own
            (`temperature` of the linear probe; `1 / logit_scale` of CLIP-style models), else
            0.05.
    """

    ranks_only = True

    def __init__(self, temperature: float | None = None):
        super().__init__()
        if temperature is not None and not temperature > 0:
            raise ValueError(f"FirstStageTeacher: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def bind_data(self, images, captions, first_stage=None) -> None:
        if self.temperature is None:
            self.temperature = first_stage_temperature(first_stage)

    @torch.no_grad()
    def score(self, pairs: TeacherPairs) -> torch.Tensor:
        if pairs.text_embeddings is None or pairs.image_embeddings is None:
            raise ValueError(
                "FirstStageTeacher needs the first stage's embeddings of every pair "
                "(TeacherPairs.text_embeddings / image_embeddings), got none."
            )
        cosine = torch.nn.functional.cosine_similarity(
            pairs.text_embeddings.float(), pairs.image_embeddings.float(), dim=-1
        )
        return cosine / (self.temperature or DEFAULT_TEMPERATURE)


DEFAULT_TEMPERATURE = 0.05


def first_stage_temperature(first_stage) -> float:
    """A first stage's softmax temperature, or `DEFAULT_TEMPERATURE` when it names none."""
    temperature = getattr(first_stage, "temperature", None)
    if temperature is None:
        scale = getattr(getattr(first_stage, "model", None), "logit_scale", None)
        temperature = float(1 / scale.detach().exp()) if scale is not None else None
    return float(temperature) if temperature else DEFAULT_TEMPERATURE


class EDJETeacher(Teacher):
    """A saved EDJE (folder or Hub id) as teacher, e.g. the local variant.

    It must share the student's tokenizer (same vocabulary and `<image>` id) and vision encoder.
    """

    def __init__(self, pretrained: str | EDJEModel):
        super().__init__()
        model = EDJEModel.from_pretrained(pretrained) if isinstance(pretrained, str) else pretrained
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, pairs: TeacherPairs) -> torch.Tensor:
        config = self.model.config
        inputs = append_image_slots(
            pairs.caption_ids,
            pairs.caption_mask,
            image_token_id=config.image_token_id,
            sep_token_id=config.sep_token_id,
            pad_token_id=config.text_config.pad_token_id,
            num_image_tokens=config.tokens_per_image,
        )
        return self.model(**inputs, vision_tokens=pairs.vision_tokens).logits.float()


class BlipITMTeacher(Teacher):
    """BLIP's image-text matching head as teacher, with an on-disk score cache.

    The match probability is the softmax of its two ITM logits (index 1); the teacher returns
    its logit, log(p / (1 - p)), so the student's target is sigmoid(logit) = p. Scores live in a
    SQLite file keyed by (image key, caption key): epochs after the first run BLIP only on pairs
    it has not seen.

    Args:
        name_or_path: a `BlipForImageTextRetrieval` checkpoint (Hub id or folder), e.g.
            "Salesforce/blip-itm-large-coco".
        cache_path: the score cache (created if missing); `None` keeps scores in memory only.
        batch_size: pairs per BLIP forward.
    """

    def __init__(self, name_or_path: str, cache_path: str | None = None, batch_size: int = 32):
        super().__init__()
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.model = BlipForImageTextRetrieval.from_pretrained(name_or_path).eval()
        self.model.requires_grad_(False)
        self.processor = BlipProcessor.from_pretrained(name_or_path)
        self.batch_size = batch_size
        self.cache = ScoreCache(cache_path)
        self._images: Callable[[Sequence[int]], list] | None = None
        self._captions: Callable[[Sequence[int]], list[str]] | None = None

    def bind_data(self, images, captions, first_stage=None) -> None:
        self._images, self._captions = images, captions

    @torch.no_grad()
    def score(self, pairs: TeacherPairs) -> torch.Tensor:
        keys = list(zip(pairs.image_keys.tolist(), pairs.caption_keys.tolist(), strict=True))
        missing = sorted(set(keys) - self.cache.known(keys))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            self.cache.put(chunk, self.blip_logits([k[0] for k in chunk], [k[1] for k in chunk]))
        scores = self.cache.get(keys)
        return torch.tensor(scores, dtype=torch.float32, device=pairs.caption_ids.device)

    def blip_logits(self, image_keys: Sequence[int], caption_keys: Sequence[int]) -> list[float]:
        """BLIP's match logit for each (image, caption) pair, from pixels and text."""
        if self._images is None or self._captions is None:
            raise RuntimeError(
                "BlipITMTeacher needs pixels and caption text: the data module binds them "
                "(bind_data) before training."
            )
        device = next(self.model.parameters()).device
        inputs = self.processor(
            images=self._images(image_keys),
            text=self._captions(caption_keys),
            return_tensors="pt",
            padding=True,
        ).to(device)
        itm = self.model(**inputs, use_itm_head=True).itm_score  # (N, 2)
        probability = itm.float().softmax(dim=-1)[:, 1].clamp(1e-6, 1 - 1e-6)
        return torch.logit(probability).tolist()


class ScoreCache:
    """Teacher logits by (image key, caption key), in SQLite (or memory when `path` is None)."""

    def __init__(self, path: str | Path | None):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(":memory:" if path is None else str(path))
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS scores (image INTEGER, caption INTEGER, logit REAL, "
            "PRIMARY KEY (image, caption))"
        )

    def known(self, keys: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        return {k for k in keys if k in self._lookup(keys)}

    def get(self, keys: Sequence[tuple[int, int]]) -> list[float]:
        found = self._lookup(keys)
        return [found[k] for k in keys]

    def put(self, keys: Sequence[tuple[int, int]], logits: Sequence[float]) -> None:
        if any(not math.isfinite(v) for v in logits):
            raise ValueError(f"ScoreCache: teacher logits must be finite, got {list(logits)}.")
        with self.db:  # one transaction: a crash leaves the cache as it was
            self.db.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?)",
                [(i, c, v) for (i, c), v in zip(keys, logits, strict=True)],
            )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def _lookup(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], float]:
        found: dict[tuple[int, int], float] = {}
        unique = list(set(keys))
        for start in range(0, len(unique), 400):  # SQLite's bound-parameter limit
            chunk = unique[start : start + 400]
            where = " OR ".join(["(image = ? AND caption = ?)"] * len(chunk))
            rows = self.db.execute(
                f"SELECT image, caption, logit FROM scores WHERE {where}",
                [v for key in chunk for v in key],
            )
            found.update({(i, c): v for i, c, v in rows})
        return found
