"""The quickstart: the built-in offline set, encoded once, a first stage, EDJE reranking, recall.

Every step leaves its result in the output folder and is skipped when it is already there, so a
second run on the same folder reuses the store, the first stage and the model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from edje._utils import atomic_folder
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION

IMAGE_SIZE = 112  # 65 raw tokens per scene: CLS + 8 x 8 patches
SHIPPED_CHECKPOINT = "quickstart"  # edje/checkpoints/<name>, once a trained one is shipped
EXAMPLE_QUERY = "a small red circle left of a large blue square"


class Steps:
    """Numbered, timed progress lines."""

    def __init__(self) -> None:
        self.count, self.start = 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.count += 1
        print(f"[{self.count}] {message} ({time.perf_counter() - self.start:.1f}s)", flush=True)


def shipped_checkpoint() -> Path:
    """The trained quickstart EDJE shipped inside the package."""
    return Path(str(resources.files("edje").joinpath("checkpoints", SHIPPED_CHECKPOINT)))


def recipe_path() -> Path:
    """`recipes/quickstart.yaml`, installed with the package as `edje.recipes`."""
    return Path(str(resources.files("edje.recipes").joinpath("quickstart.yaml")))


def run_quickstart(
    out: str | Path,
    *,
    model: str | None = None,
    train: bool = False,
    builtin: dict[str, int] | None = None,
    k: int = 10,
) -> Path:
    """Run the quickstart into `out`; returns the report folder.

    `model` is an EDJE folder to rerank with; by default the shipped checkpoint, or with
    `train=True` one trained here from `recipes/quickstart.yaml`. `builtin` sizes a reduced
    built-in set (tests).
    """
    from edje import EDJEModel, EDJEProcessor
    from edje.evaluation import evaluate
    from edje.training import EDJEDataModule

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    step = Steps()
    data = EDJEDataModule(
        "builtin",
        store=str(out / "raw.store"),
        first_stage=str(out / "first_stage"),
        vision=OFFLINE_VISION,
        vision_image_size=IMAGE_SIZE,
        text=OFFLINE_TEXT,
        builtin=builtin,
    )
    step("generating the built-in scenes and encoding them once with DINOv2-S (112 px)")
    data.prepare_data()  # the raw token store, then the first stage fitted on the train split
    step(f"raw token store ready: {out / 'raw.store'}; first stage: {out / 'first_stage'}")
    model_dir = _model_folder(out, model, train, builtin, step)
    step(f"reranking the test split's first-stage top {k} with EDJE from {model_dir}")
    data.setup("test")
    edje = EDJEModel.from_pretrained(model_dir).eval()
    processor = EDJEProcessor.from_pretrained(model_dir)
    report = evaluate(
        data.splits["test"], data.first_stage, edje, processor, data.store, k=k,
        dataset_name="edje built-in scenes",
    )  # fmt: skip
    report_dir = out / "report"
    report.save(report_dir, dataset=data.splits["test"], contact_sheet=4)
    print(report.to_markdown())
    step(f"report, plot and contact sheet in {report_dir}")
    print(
        "\nTry next:\n"
        f"  edje search --model {model_dir} --store {out / 'raw.store'} "
        f'--first-stage {out / "first_stage"} "{EXAMPLE_QUERY}"'
    )
    return report_dir


def _model_folder(out: Path, model, train, builtin, step) -> Path:
    if model is not None:
        return Path(model)
    trained = out / "outputs" / "quickstart" / "model"
    if train:
        if not (trained / "config.json").is_file():
            step("training EDJE from recipes/quickstart.yaml (minutes on a GPU, hours on a CPU)")
            _train(out, builtin)
        return trained
    # A copy in `out`, so the folder holds everything the printed `edje search` command needs;
    # copied whole into a temporary folder first, so a crash mid-copy leaves no half a model.
    copied = out / "model"
    if not (copied / "config.json").is_file():
        with atomic_folder(copied) as partial:
            shutil.copytree(shipped_checkpoint(), partial, dirs_exist_ok=True)
    return copied


def _train(out: Path, builtin: dict[str, int] | None) -> None:
    command = [sys.executable, "-m", "edje.cli", "fit", "--config", str(recipe_path())]
    command += ["--data.store", str(out / "raw.store")]
    command += ["--data.first_stage", str(out / "first_stage")]
    if builtin:
        command += ["--data.builtin", str(builtin)]
    # The recipe's outputs (checkpoints, exported model) land under `out`.
    subprocess.run(command, cwd=out, check=True)
