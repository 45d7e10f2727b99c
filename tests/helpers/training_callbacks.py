"""Callbacks the resume test adds to a recipe (imported by the training subprocess)."""

from __future__ import annotations

import json
import os
import signal

from lightning.pytorch import Callback


class KillAfterStep(Callback):
    """SIGKILLs the process once `step` optimizer steps are done: a crash nothing can catch."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordSteps(Callback):
    """Writes the global step at the start and the end of fit to `path` (JSON)."""

    def __init__(self, path: str):
        self.path, self.record = path, {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["start"] = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["end"] = trainer.global_step
        with open(self.path, "w") as f:
            json.dump(self.record, f)
