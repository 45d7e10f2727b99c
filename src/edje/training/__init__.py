"""Training: the LightningModule, the DataModule, the objectives and the distillation teachers.

The network, the teacher, the first stage and the optimizer come in from a recipe
(`recipes/*.yaml`, run with `edje fit --config ...`); the LightningModule defines no layers.
"""

from edje.training.datamodule import EDJEDataModule, stable_key
from edje.training.export import ExportEDJE
from edje.training.module import EDJETrainingModule
from edje.training.network import EDJEForPreTraining
from edje.training.streaming import ShardDataModule
from edje.training.teachers import (
    BlipITMTeacher,
    EDJETeacher,
    FirstStageTeacher,
    Teacher,
    TeacherPairs,
)
from edje.training.validation_recall import ValidationRecall

__all__ = [
    "BlipITMTeacher",
    "EDJEDataModule",
    "EDJEForPreTraining",
    "EDJETeacher",
    "EDJETrainingModule",
    "ExportEDJE",
    "FirstStageTeacher",
    "ShardDataModule",
    "Teacher",
    "TeacherPairs",
    "ValidationRecall",
    "stable_key",
]
