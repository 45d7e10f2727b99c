"""Distillation teachers behind one interface: a logit per (caption, image) pair.

- `EDJETeacher`: any saved EDJE, typically the uncompressed "local" variant, reading the same
  raw vision tokens and caption ids as the student.
- `BlipITMTeacher`: BLIP's ITM head (`BlipForImageTextRetrieval`, `use_itm_head=True`); it needs
  pixels and caption text, so its scores are cached on disk and each pair is scored once.
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


class Teacher(nn.Module, ABC):
    """Scores pairs for distillation; frozen. `score` returns one logit per row, `[N]`."""

    @abstractmethod
    def score(self, pairs: TeacherPairs) -> torch.Tensor: ...

    def bind_data(
        self,
        images: Callable[[Sequence[int]], list],
        captions: Callable[[Sequence[int]], list[str]],
    ) -> None:
        """Give the teacher the data behind image and caption keys (pixel teachers need it)."""


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

    def bind_data(self, images, captions) -> None:
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
