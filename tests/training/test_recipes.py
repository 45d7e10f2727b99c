"""Every shipped recipe parses against the classes it names (nothing is downloaded)."""

from __future__ import annotations

import argparse
import os

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from edje.training import EDJEDataModule, EDJETrainingModule
from tests.helpers.paths import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
REQUIRED = {
    "pretrain",
    "distill_blip",
    "finetune_coco",
    "finetune_flickr30k",
    "finetune_custom",
    "quickstart",
    "pretrain_webdataset",
}


class ParseOnlyCLI(LightningCLI):
    """Parses and type-checks a recipe, instantiating nothing (no weights are loaded)."""

    def instantiate_classes(self) -> None:
        pass


def test_the_required_recipes_are_shipped():
    assert {p.stem for p in RECIPES} >= REQUIRED


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(recipe):
    from edje.commands.fit import datamodule_class

    args = ["--config", str(recipe)]
    datamodule, by_class_path = datamodule_class(args)
    cli = ParseOnlyCLI(
        EDJETrainingModule,
        datamodule,
        subclass_mode_data=by_class_path,
        args=args,
        run=False,
        auto_configure_optimizers=False,
    )
    config = cli.config
    assert config.model.network.class_path == "edje.training.EDJEForPreTraining"
    assert config.model.optimizer.class_path == "torch.optim.AdamW"
    if by_class_path:  # streamed shards (recipes/pretrain_webdataset.yaml)
        assert config.data.class_path == "edje.training.ShardDataModule"
        assert config.data.init_args.shards and config.data.init_args.samples_per_epoch
    else:
        assert config.data.store and config.data.data
    callbacks = [c.class_path for c in config.trainer.callbacks or []]
    assert "edje.training.ExportEDJE" in callbacks, f"{recipe.name} does not export its model"


def test_a_misspelled_key_is_refused(tmp_path):
    """The parse test would catch a typo: jsonargparse checks keys against the signatures."""
    quickstart = next(p for p in RECIPES if p.stem == "quickstart")
    broken = tmp_path / "broken.yaml"
    broken.write_text(quickstart.read_text().replace("negative_topk:", "negative_top_k:"))
    with pytest.raises(SystemExit):
        ParseOnlyCLI(
            EDJETrainingModule,
            EDJEDataModule,
            args=["--config", str(broken)],
            run=False,
            auto_configure_optimizers=False,
        )


def test_packaged_recipes_run_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from edje.cli import main
    from edje.commands.fit import packaged_recipes, with_packaged_recipes

    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    assert set(packaged_recipes()) == {p.stem for p in RECIPES}
    quickstart = str(packaged_recipes()["quickstart"])
    assert with_packaged_recipes(["--config", "quickstart", "--trainer.max_steps", "3"]) == [
        "--config", quickstart, "--trainer.max_steps", "3",
    ]  # fmt: skip
    assert with_packaged_recipes(["--config=recipes/quickstart.yaml"]) == [f"--config={quickstart}"]
    (tmp_path / "quickstart.yaml").write_text("seed_everything: 1\n")  # a file of the user's wins
    assert with_packaged_recipes(["--config", "quickstart.yaml"]) == ["--config", "quickstart.yaml"]
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == sorted(p.stem for p in RECIPES)
    assert any(line.startswith("finetune_custom") and "your own images" in line for line in listed)


def test_edje_fit_passes_its_command_line_without_lightnings_args_warning(monkeypatch):
    import warnings

    from edje.commands.fit import make_cli, packaged_recipes

    monkeypatch.setattr("sys.argv", ["edje", "fit", "--config", "quickstart"])  # as run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = make_cli(["--config", str(packaged_recipes()["quickstart"])], run=False)
    assert cli.model.network.edje.config.num_image_tokens == 16
    assert not [w for w in caught if "args parameter" in str(w.message)]


def fit_command(tmp_path, *args: str):
    import subprocess
    import sys

    # The installed edje (its recipes are package data); the repository for the tests' callbacks.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-c", "import edje_cli; edje_cli.run()", "fit", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_recipe_naming_a_shell_command_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "evil.yaml").write_text(
        "model:\n  optimizer:\n    class_path: os.system\n    init_args: {command: 'touch pwned'}\n"
    )
    done = fit_command(tmp_path, "--config", "quickstart", "--config", "evil.yaml")
    assert done.returncode == 2, done.stderr[-2000:]
    assert not (tmp_path / "pwned").exists()
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and "os.system" in error[0] and "--trust-code-from" in error[0]


def test_a_recipe_names_other_modules_only_when_the_user_trusts_their_code(tmp_path):
    from edje.commands.fit import make_cli, packaged_recipes
    from edje.training.recipe_trust import recipe_imports

    callback = {
        "class_path": "tests.helpers.training_callbacks.RecordSteps",
        "init_args": {"path": "x"},
    }
    recipe = tmp_path / "callback.yaml"
    recipe.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    args = ["--config", str(packaged_recipes()["quickstart"]), "--config", str(recipe)]
    with pytest.raises(
        argparse.ArgumentError, match=r"tests\.helpers\.training_callbacks\.RecordSteps"
    ):
        make_cli(args, run=False)
    cli = make_cli(args, run=False, trusted_code=["tests.helpers.training_callbacks"])
    assert any(type(c).__name__ == "RecordSteps" for c in cli.trainer.callbacks)
    # The trust lasts one run: the next recipe is refused again, and torch's loaders always.
    with pytest.raises(argparse.ArgumentError):
        make_cli(args, run=False)
    from jsonargparse._util import import_object

    with recipe_imports(), pytest.raises(ImportError, match=r"torch\.serialization"):
        import_object("torch.load")
