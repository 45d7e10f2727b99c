"""Two real DDP processes (gloo on CPU): hard negatives are mined over the gathered batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import LightningDataModule, Trainer
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_config
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
    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "ddp_mining.py"
    script.write_text(SCRIPT.format(tests=tests, out=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    # Every negative of both ranks was mined from the other process's half of the batch.
    assert ranks[0]["remote_share"] == 1.0
    assert ranks[1]["remote_share"] == 1.0
