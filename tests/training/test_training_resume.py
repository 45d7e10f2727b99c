"""A training run killed with SIGKILL resumes from its last checkpoint (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers.paths import ROOT

SMALL = {"n_train_triplets": 8, "n_train_single": 4, "n_val_triplets": 2, "n_test_triplets": 2}


def recipe(tmp_path: Path, extra_callbacks: list[dict]) -> Path:
    config = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(precision="32", max_steps=6, val_check_interval=100, logger=False)
    trainer["enable_progress_bar"] = False
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2
        if callback["class_path"].endswith("ExportEDJE"):
            callback["init_args"]["evaluate_test"] = False
    trainer["callbacks"] += extra_callbacks
    config["data"].update(builtin=SMALL, batch_size=8)
    path = tmp_path / f"recipe-{len(extra_callbacks)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(tmp_path: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "edje.cli", "fit", "--config", str(config), *extra]
    command += ["--trust-code-from", "tests.helpers.training_callbacks"]  # the test callbacks
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    steps = tmp_path / "steps.json"
    crash = {
        "class_path": "tests.helpers.training_callbacks.KillAfterStep",
        "init_args": {"step": 5},
    }
    killed = fit(tmp_path, recipe(tmp_path, [crash]))
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoint = tmp_path / "outputs" / "quickstart" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    record = {
        "class_path": "tests.helpers.training_callbacks.RecordSteps",
        "init_args": {"path": str(steps)},
    }
    resumed = fit(tmp_path, recipe(tmp_path, [record]), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The last checkpoint before the kill was written after step 4: training went on from there.
    assert json.loads(steps.read_text()) == {"start": 4, "end": 6}


def test_a_resume_says_which_module_arguments_the_checkpoint_replaced(tmp_path):
    """LightningCLI takes the module's arguments from a checkpoint given by its path: one
    changed on the command line does not apply, and edje fit says so rather than let it pass
    silently. (The checkpoint is at max_steps already: the fit ends at once.)"""
    config = recipe(tmp_path, [])
    first = fit(tmp_path, config, "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "outputs" / "quickstart" / "checkpoints" / "last.ckpt"
    resumed = fit(tmp_path, config, "--trainer.max_steps", "2", "--ckpt_path", str(checkpoint),
                  "--model.negative_topk", "3")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "model.negative_topk is the checkpoint's 16, not the 3 given" in resumed.stderr
    assert resumed.stderr.count("edje fit: resuming, model.") == 1  # the others agree
