"""`EDJETrainingModule`: the paper's objectives around a network, a teacher and an optimizer
that all come in from the recipe; the module itself defines no layers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule

from edje.processing_edje import append_image_slots
from edje.training import losses
from edje.training.network import EDJEForPreTraining
from edje.training.teachers import Teacher, TeacherPairs

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The paper's pretraining optimizer: AdamW, lr 3e-4, weight decay 0.05."""
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)


class EDJETrainingModule(LightningModule):
    """Trains EDJE with ITM on mined hard negatives, MLM, text-embedding recovery and
    distillation, each weighted by the recipe (a weight of 0 turns a term off).

    Batches (from `EDJEDataModule`) hold, per caption: `caption_ids`/`caption_mask` (padded to
    the processor's `max_caption_length`), the raw `vision_tokens` of its image, integer
    `image_key`/`caption_key` (equal keys mean the same image / the same caption text), and the
    first stage's `text_embedding`/`image_embedding`. Negatives are mined over the batch gathered
    from every process, excluding candidates with the same image or the same caption.

    Args:
        network: the EDJE and its training heads.
        optimizer: builds the optimizer from parameters (LightningCLI fills it from the recipe).
        teacher: optional `Teacher` for distillation.
        negatives: how negatives are drawn: weights over "hardest", "topk" (uniform among the
            `negative_topk` most similar) and "random".
        mlm_start_step: MLM joins the loss from this step on (0: from the start). On a small set
            MLM from the start holds ITM at chance; joining once ITM has learned, it sharpens
            attribute binding (measured on the built-in set).
        itm_first_stage_weight: ITM on the fused score, EDJE's logit plus this times the first
            stage's cosine similarity of the pair (as `edje eval`'s fusion scores): the EDJE
            learns what the first stage misses. 0 (the paper's): EDJE's logit alone.
        warmup_steps, lr_decay_per_epoch: the paper's schedule: linear warm-up, then the
            learning rate times `lr_decay_per_epoch` after each epoch.
    """

    def __init__(
        self,
        network: EDJEForPreTraining,
        optimizer: OptimizerFactory = default_optimizer,
        teacher: Teacher | None = None,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        text_recovery_weight: float = 1.0,
        distillation_weight: float = 1.0,
        negatives: dict[str, float] | None = None,
        negative_topk: int = 16,
        mlm_probability: float = 0.5,
        mlm_start_step: int = 0,
        itm_first_stage_weight: float = 0.0,
        warmup_steps: int = 100,
        lr_decay_per_epoch: float = 0.9,
        seed: int = 0,
    ):
        super().__init__()
        self.network = network
        self.teacher = teacher
        self.optimizer_factory = optimizer
        self.weights = {
            "itm": itm_weight,
            "mlm": mlm_weight,
            "text_recovery": text_recovery_weight,
            "distillation": distillation_weight if teacher is not None else 0.0,
        }
        self.negatives = negatives or {"hardest": 1.0}
        losses.negative_strategies(1, self.negatives)  # validate now, not at step 1
        self.negative_topk = negative_topk
        self.mlm_probability = mlm_probability
        if mlm_start_step < 0:
            raise ValueError(
                f"EDJETrainingModule: mlm_start_step must be >= 0, got {mlm_start_step}"
            )
        self.mlm_start_step = mlm_start_step
        self.itm_first_stage_weight = itm_first_stage_weight
        self.warmup_steps = warmup_steps
        self.lr_decay_per_epoch = lr_decay_per_epoch
        self.seed = seed
        self.save_hyperparameters(ignore=["network", "teacher", "optimizer"])

    @property
    def backbones(self) -> dict[str, Any]:
        """What the data must match: the network's vision encoder (name, image size), text
        encoder (the tokenizer), caption length and caption cleaning; `edje fit` links it to
        the data module."""
        config = self.network.edje.config
        return {
            "vision": config.vision_encoder_name,
            "vision_image_size": config.vision_image_size,
            "text": config.base_text_encoder,
            "max_caption_length": config.max_caption_length,
            "normalize_captions": config.normalize_captions,
        }

    def on_fit_start(self) -> None:
        # Lightning keeps each module's mode: a network put in eval mode after it was built (an
        # evaluation before fit) would otherwise train with dropout off. Teachers stay frozen in
        # eval mode.
        self.network.train()
        if self.teacher is not None:
            self.teacher.eval()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.teacher is not None and datamodule is not None:
            # Streamed shards cannot look an image up by key: teachers that read the batch
            # (EDJETeacher's raw tokens, FirstStageTeacher's embeddings) work the same; BLIP's,
            # which needs the pictures, says so when it asks.
            self.teacher.bind_data(
                getattr(datamodule, "images_by_key", _no_lookup("images")),
                getattr(datamodule, "captions_by_key", _no_lookup("captions")),
                first_stage=getattr(datamodule, "first_stage", None),
            )

    # -- steps ---------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms, accuracy = self._losses(batch, train=True)
        loss = self._total(terms)
        size = len(batch["caption_ids"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/pair_accuracy", accuracy, prog_bar=True, batch_size=size)
        self.log("train/negatives_from_other_processes", self._remote_share, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        result = self._losses(batch, train=False)
        if result is None:
            return
        terms, accuracy = result
        size = len(batch["caption_ids"])
        self.log("val/loss", self._total(terms), prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/pair_accuracy", accuracy, prog_bar=True, sync_dist=True, batch_size=size)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(p for p in self.network.parameters() if p.requires_grad)
        steps_per_epoch = max(1, self._trainer.num_training_batches) if self._trainer else 1
        if not math.isfinite(steps_per_epoch):  # an iterable data set of unknown length
            steps_per_epoch = 1
        warmup, decay = max(1, self.warmup_steps), self.lr_decay_per_epoch

        def schedule(step: int) -> float:
            return min(1.0, (step + 1) / warmup) * decay ** (step // steps_per_epoch)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- objectives ----------------------------------------------------------------------------

    def _total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"EDJETrainingModule: the {name} loss is {value.item()} at step "
                    f"{self.global_step}; lower the learning rate or check the data."
                )
        return sum(self.weights[name] * value for name, value in terms.items())

    def _losses(self, batch: dict[str, torch.Tensor], train: bool):
        edje = self.network.edje
        if "pixel_values" in batch:  # the online-vision mode (edje.training.streaming)
            batch = self._with_vision_tokens(batch)
        generator = torch.Generator().manual_seed(
            self.seed + 1_000_003 * self.global_step + self.global_rank if train else self.seed
        )
        everyone = self._gather(batch)
        local = len(batch["caption_ids"])  # this process's rows come first in `everyone`
        same = (batch["image_key"][:, None] == everyone["image_key"][None, :]) | (
            batch["caption_key"][:, None] == everyone["caption_key"][None, :]
        )  # (B, W*B): candidates that would be positives, never negatives
        usable = ~same.all(dim=1)
        if not bool(usable.any()):
            if not train:  # a validation remainder of one image: nothing to compare
                return None
            raise ValueError(
                "EDJETrainingModule: every caption of this batch belongs to one image, so there "
                "is no negative to mine; batches need at least two distinct images."
            )
        if not bool(usable.all()):  # a small last batch: score the rows that have negatives
            batch, same = {k: v[usable] for k, v in batch.items()}, same[usable]
        # Every gathered image once through the adapter: positives and negatives reuse it.
        everyone_tokens = edje.compress(everyone["vision_tokens"])  # (W*B, m, d)
        tokens = everyone_tokens[:local][usable]  # (B, m, d): this process's positives
        neg_image, neg_caption = self._mine(batch, everyone, same, generator)
        self._remote_share = torch.cat([neg_image, neg_caption]).ge(local).float().mean()
        captions = torch.cat(
            [batch["caption_ids"], batch["caption_ids"], everyone["caption_ids"][neg_caption]]
        )
        masks = torch.cat(
            [batch["caption_mask"], batch["caption_mask"], everyone["caption_mask"][neg_caption]]
        )
        images = torch.cat([tokens, everyone_tokens[neg_image], tokens])
        logits = self.network.itm_logits(self._pairs(captions, masks), images)  # (3B,)
        scores = logits  # what ITM ranks; distillation reads EDJE's own logits
        if self.itm_first_stage_weight:
            scores = logits + self.itm_first_stage_weight * self._first_stage_similarities(
                batch, everyone, neg_image, neg_caption
            ).to(logits)
        positive, negative_image, negative_caption = scores.chunk(3)
        terms = {}
        if self.weights["itm"]:
            terms["itm"] = (
                losses.itm_loss(positive, negative_image)
                + losses.itm_loss(positive, negative_caption)
            ) / 2
        if self.weights["mlm"] and self.global_step >= self.mlm_start_step:
            terms["mlm"] = self._mlm(batch, tokens, generator)
        if self.weights["text_recovery"]:
            predicted = self.network.text_embedding(batch["caption_ids"], batch["caption_mask"])
            terms["text_recovery"] = losses.text_recovery_loss(predicted, batch["text_embedding"])
        if self.weights["distillation"]:
            terms["distillation"] = self._distillation(
                batch, everyone, neg_image, neg_caption, captions, masks, logits
            )
        accuracy = (
            torch.cat([positive > negative_image, positive > negative_caption]).float().mean()
        )
        return terms, accuracy

    @staticmethod
    def _first_stage_similarities(batch, everyone, neg_image, neg_caption) -> torch.Tensor:
        """The first stage's similarity of the 3B scored pairs, in `logits`' order."""
        texts = torch.cat([batch["text_embedding"], batch["text_embedding"],
                           everyone["text_embedding"][neg_caption]])  # fmt: skip
        images = torch.cat([batch["image_embedding"], everyone["image_embedding"][neg_image],
                            batch["image_embedding"]])  # fmt: skip
        return (texts * images).sum(-1)

    def _distillation(self, batch, everyone, neg_image, neg_caption, captions, masks, logits):
        # The 3B scored pairs: positives, negative images, negative captions.
        image_rows = {
            key: torch.cat([batch[key], everyone[key][neg_image], batch[key]])
            for key in ("vision_tokens", "image_key", "image_embedding")
        }
        caption_rows = {
            key: torch.cat([batch[key], batch[key], everyone[key][neg_caption]])
            for key in ("caption_key", "text_embedding")
        }
        pairs = TeacherPairs(
            captions,
            masks,
            image_rows["vision_tokens"],
            image_rows["image_key"],
            caption_rows["caption_key"],
            text_embeddings=caption_rows["text_embedding"],
            image_embeddings=image_rows["image_embedding"],
        )
        with torch.no_grad():
            teacher_logits = self.teacher.score(pairs)
        if not self.teacher.ranks_only:
            return losses.distillation_loss(logits, teacher_logits)
        positive, negative_image, negative_caption = logits.chunk(3)
        t_positive, t_negative_image, t_negative_caption = teacher_logits.chunk(3)
        return (
            losses.ranking_distillation_loss(positive, negative_image, t_positive, t_negative_image)
            + losses.ranking_distillation_loss(
                positive, negative_caption, t_positive, t_negative_caption
            )
        ) / 2

    @torch.no_grad()
    def _with_vision_tokens(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pixels -> the raw vision tokens a raw store would hold, by the frozen vision encoder
        (eval mode, its own dtype), and the first stage's image embeddings of them for
        mining, as `EDJEDataModule` precomputes them."""
        # The encoder is held outside the module tree: frozen, in eval mode, never in the
        # optimizer or the checkpoint; encode_images moves it to the batch's device.
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        out["vision_tokens"] = self.network.edje.encode_images(batch["pixel_values"]).float()
        if "image_embedding" not in batch:
            first_stage = getattr(self._datamodule(), "first_stage", None)
            out["image_embedding"] = (
                first_stage.encode_vision_tokens(out["vision_tokens"]).to(out["vision_tokens"])
                if first_stage is not None
                else torch.zeros(len(out["vision_tokens"]), 1, device=out["vision_tokens"].device)
            )
        return out

    def _datamodule(self):
        return getattr(self._trainer, "datamodule", None) if self._trainer else None

    def _gather(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch from every process (this one's rows first), for mining negatives."""
        keys = ("caption_ids", "caption_mask", "vision_tokens", "image_key", "caption_key")
        keys += ("text_embedding", "image_embedding")
        local = {k: batch[k] for k in keys}
        if self._trainer is None or self._trainer.world_size == 1:
            return local
        gathered = self.all_gather(local)  # each (world, B, ...)
        rank = self.global_rank
        order = [rank] + [r for r in range(self.trainer.world_size) if r != rank]
        return {k: v[order].flatten(0, 1) for k, v in gathered.items()}

    def _mine(self, batch, everyone, same, generator) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(batch["image_key"])
        options = dict(topk=self.negative_topk, generator=generator)
        text_to_image = batch["text_embedding"] @ everyone["image_embedding"].T
        neg_image = losses.mine_negatives(
            text_to_image,
            same,
            losses.negative_strategies(count, self.negatives, generator),
            **options,
        )
        image_to_text = batch["image_embedding"] @ everyone["text_embedding"].T
        neg_caption = losses.mine_negatives(
            image_to_text,
            same,
            losses.negative_strategies(count, self.negatives, generator),
            **options,
        )
        return neg_image, neg_caption

    def _mlm(self, batch, tokens, generator) -> torch.Tensor:
        ids, mask = batch["caption_ids"], batch["caption_mask"]
        config = self.network.edje.config
        first = torch.arange(ids.shape[1], device=ids.device) == 0
        special = (ids == config.sep_token_id) | first  # [CLS] and [SEP] are never masked
        masked_ids, labels = losses.mask_caption_tokens(
            ids,
            (mask == 1) & ~special,
            config.mask_token_id,
            config.text_config.vocab_size - 1,  # random swaps never draw <image>, the last id
            self.mlm_probability,
            generator,
        )
        pairs = self._pairs(masked_ids, mask)
        # Pair inputs keep each caption where it was; fit the labels to their width (a negative
        # pad crops columns past the longest caption, which hold no labels).
        width = pairs["input_ids"].shape[1]
        labels = torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=-100)
        positions = labels != -100
        logits = self.network.mlm_logits(pairs, tokens, positions)
        return losses.mlm_loss(logits[None], labels[positions][None])

    def _pairs(
        self, caption_ids: torch.Tensor, caption_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        config = self.network.edje.config
        return append_image_slots(
            caption_ids,
            caption_mask,
            image_token_id=config.image_token_id,
            sep_token_id=config.sep_token_id,
            pad_token_id=config.text_config.pad_token_id,
            num_image_tokens=config.tokens_per_image,
        )


def _no_lookup(what: str):
    def lookup(keys):
        raise ValueError(
            f"EDJETrainingModule: this teacher looks {what} up by key, which streamed shards "
            "(ShardDataModule) cannot do; distil from EDJETeacher or FirstStageTeacher, or "
            "train from a raw token store (EDJEDataModule)."
        )

    return lookup
