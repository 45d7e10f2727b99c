"""Two real DDP processes (gloo on CPU): hard negatives are mined over the gathered batch, and
neighbourhood batches stay whole across the processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.helpers.paths import ROOT

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import LightningDataModule, Trainer
    sys.path.insert(0, {root!r})
    from tests.helpers.tiny import make_tiny_config
    from edje import EDJEModel
    from edje.training import EDJEForPreTraining, EDJETrainingModule

    B = 4

    class Batches(LightningDataModule):
        # Rank 0's captions are most like rank 1's images and the reverse, so every hardest
        # negative rank 0 mines lives on rank 1.
        def train_dataloader(self):
            rank = self.trainer.global_rank
            eye = torch.eye(2 * B)
            generator = torch.Generator().manual_seed(rank)
            batch = {{
                "caption_ids": torch.tensor([[101, 2000 + i, 102] + [0] * 5 for i in range(B)]),
                "caption_mask": torch.tensor([[1, 1, 1] + [0] * 5] * B),
                "vision_tokens": torch.randn(B, 5, 32, generator=generator),
                "image_key": torch.arange(B) + 100 * rank,
                "caption_key": torch.arange(B) + 1000 * rank,
                "text_embedding": eye[:B] if rank == 0 else eye[B:],
                "image_embedding": eye[B:] if rank == 0 else eye[:B],
            }}
            return torch.utils.data.DataLoader([batch], batch_size=None)

    class Record(EDJETrainingModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            out = {{"rank": self.global_rank, "remote_share": float(self._remote_share)}}
            with open({out!r} + f"/rank{{self.global_rank}}.json", "w") as f:
                json.dump(out, f)
            return loss

    torch.manual_seed(0)
    config = make_tiny_config(30523, 30522)
    module = Record(EDJEForPreTraining(EDJEModel(config), mlm=False), mlm_weight=0,
                    text_recovery_weight=0, negatives={{"hardest": 1.0}})
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=Batches())
    """
)


def test_hard_negatives_come_from_the_batch_gathered_across_processes(tmp_path):
    script = tmp_path / "ddp_mining.py"
    script.write_text(SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    # Every negative of both ranks was mined from the other process's half of the batch.
    assert ranks[0]["remote_share"] == 1.0
    assert ranks[1]["remote_share"] == 1.0


NEIGHBOURHOODS = textwrap.dedent(
    """
    import json
    import torch
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer
    from edje.training.sampling import NeighbourhoodSampler

    # 16 images in 4 clusters, one caption each: a caption's neighbours share its cluster.
    centres = torch.eye(4)
    embeddings = centres[torch.arange(16) % 4] + 0.01 * torch.arange(16)[:, None]

    class Captions(LightningDataModule):
        def train_dataloader(self):
            sampler = NeighbourhoodSampler(
                embeddings, embeddings, torch.arange(16), group=4, pool=3,
                num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
            )
            return torch.utils.data.DataLoader(range(16), batch_size=2, sampler=sampler)

    class Record(LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch.tolist())
            return (self.weight * batch.float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def on_train_end(self):
            with open({out!r} + f"/rank{{self.global_rank}}.json", "w") as f:
                json.dump(self.seen, f)

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)  # Lightning's default distributed sampling
    trainer.fit(Record(), datamodule=Captions())
    """
)


def test_neighbourhood_batches_stay_whole_across_ddp_processes(tmp_path):
    script = tmp_path / "ddp_neighbourhoods.py"
    script.write_text(NEIGHBOURHOODS.format(out=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4  # 16 captions, 2 processes, batches of 2
    for step in range(4):  # the batch gathered at each step: one neighbourhood of 4 captions
        gathered = seen[0][step] + seen[1][step]
        assert len({caption % 4 for caption in gathered}) == 1, gathered
