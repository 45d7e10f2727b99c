"""`ExportEDJE`: the best model survives a resume; without a monitor the final weights are
exported; the card names the hardware; a score error bound of the weights training started
from is not exported with the trained ones."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from edje.training import ExportEDJE
from edje.training.hardware import describe_hardware


def validated(callback: ExportEDJE, value: float, exported: list[float]) -> None:
    trainer = SimpleNamespace(
        sanity_checking=False, callback_metrics={"val/pair_accuracy": torch.tensor(value)}
    )
    callback.export = lambda trainer, module: exported.append(value)
    callback.on_validation_end(trainer, None)


def fit_ended(callback: ExportEDJE, exported: list[float]) -> None:
    callback.export = lambda trainer, module: exported.append("final")
    callback.on_fit_end(SimpleNamespace(datamodule=None), None)


def test_a_resumed_run_exports_only_what_beats_the_best_before_it(tmp_path):
    first, exported = ExportEDJE(str(tmp_path)), []
    validated(first, 0.8, exported)
    validated(first, 0.7, exported)
    resumed = ExportEDJE(str(tmp_path))  # a new process, restored from the Lightning checkpoint
    resumed.load_state_dict(first.state_dict())
    validated(resumed, 0.75, exported)  # worse than the export already on disk: kept
    validated(resumed, 0.85, exported)
    assert exported == [0.8, 0.85]


def test_hardware_line_names_the_cpu_and_the_cores_this_process_may_use():
    line = describe_hardware("cpu")
    assert line.startswith(f"{len(os.sched_getaffinity(0))} cores of ")


def test_without_a_monitor_only_the_final_weights_are_exported(tmp_path):
    callback, exported = ExportEDJE(str(tmp_path), monitor=None, evaluate_test=False), []
    validated(callback, 0.9, exported)
    validated(callback, 0.95, exported)
    fit_ended(callback, exported)
    assert exported == ["final"]


def test_with_a_monitor_the_fit_end_keeps_the_best_export(tmp_path):
    callback, exported = ExportEDJE(str(tmp_path), evaluate_test=False), []
    validated(callback, 0.9, exported)
    fit_ended(callback, exported)
    assert exported == [0.9]


def test_the_exported_model_drops_the_error_bound_of_the_weights_it_started_from(
    tiny_model, tmp_path
):
    tiny_model.config.score_error_bounds = {"bfloat16": {"bound": 0.2}}  # from `pretrained`
    callback = ExportEDJE(str(tmp_path / "model"), monitor=None, evaluate_test=False)
    module = SimpleNamespace(network=SimpleNamespace(edje=tiny_model))
    callback.export(SimpleNamespace(is_global_zero=True, datamodule=None), module)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved.get("score_error_bounds") is None
