"""`edje fit`: train EDJE from a YAML recipe through LightningCLI."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXAMPLE = """example:
  edje fit --config quickstart                      # a packaged recipe by name (edje recipes)
  edje fit --config recipes/quickstart.yaml
  edje fit --config recipes/quickstart.yaml --trainer.max_steps 200 --data.batch_size 32
  edje fit --config recipes/finetune_custom.yaml --print_config   # the full resolved recipe
  edje fit --config my.yaml --trust-code-from my_callbacks   # my.yaml names my_callbacks.X

A recipe is data: the classes it names come from edje, torch, lightning and transformers
only (not their pickle or code loaders). Naming another module's classes runs its code, so
it takes --trust-code-from MODULE (repeatable), like transformers' trust_remote_code.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="train EDJE from a recipe (recipes/*.yaml) with Lightning",
        description=(
            "Train EDJE with LightningCLI: the recipe names the network, first stage, teacher, "
            "optimizer, data and trainer; any value can be overridden as --section.key value. "
            "All arguments after `fit` go to LightningCLI: `edje fit --config RECIPE --help` "
            "lists every option of a recipe (it imports Lightning: seconds)."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # --help goes to LightningCLI, which knows every option
    )
    # Everything after `fit` is LightningCLI's: the `edje` parser passes it through unparsed.
    # `edje fit --help` alone is answered at once, without importing Lightning or torch.
    parser.set_defaults(func=run, pass_through=True, quick_help=parser.format_help())


def run(args: argparse.Namespace) -> int:
    from edje._utils import require

    require("lightning.pytorch", "training", "edje fit")
    from edje.training.recipe_trust import explained, trusted_modules

    try:
        cli_args, trusted = trusted_modules(args.pass_through_args)
        cli = make_cli(with_packaged_recipes(cli_args), trusted_code=trusted)
    except argparse.ArgumentError as error:  # a missing recipe, an unknown key: one line
        message = explained(" ".join(str(error).split()))
        print(f"edje fit: error: {message} (see edje fit --help)", file=sys.stderr)
        return 2
    return 0 if cli.trainer.state.status.value == "finished" else 1


def datamodule_class(cli_args: list[str]):
    """(class, by class_path): `EDJEDataModule` with its arguments under `data:`, as most
    recipes write it; any LightningDataModule when a recipe names one (`data: class_path:
    edje.training.ShardDataModule`), so streamed shards and local data share `edje fit`."""
    import yaml
    from lightning.pytorch import LightningDataModule

    from edje.training import EDJEDataModule

    named = any(arg.startswith("--data.class_path") for arg in cli_args)
    for index, arg in enumerate(cli_args):
        flag, _, value = arg.partition("=")
        path = value if flag == "--config" and value else None
        if index > 0 and cli_args[index - 1] == "--config":
            path = arg
        if path and Path(path).is_file():
            recipe = yaml.safe_load(Path(path).read_text()) or {}
            named = named or "class_path" in (recipe.get("data") or {})
    return (LightningDataModule, True) if named else (EDJEDataModule, False)


def packaged_recipes() -> dict[str, Path]:
    """The recipes installed with edje (`edje.recipes`), by name."""
    from importlib import resources

    folder = Path(str(resources.files("edje.recipes")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def with_packaged_recipes(cli_args: list[str]) -> list[str]:
    """`--config NAME` names a packaged recipe when no file NAME exists (`quickstart`,
    `quickstart.yaml`): the recipes work from any folder, not only a clone of the repository."""
    recipes, out = packaged_recipes(), []
    for index, arg in enumerate(cli_args):
        flag, _, value = arg.partition("=")
        after_flag = index > 0 and cli_args[index - 1] == "--config"
        if after_flag or (flag == "--config" and value):
            given = arg if after_flag else value
            name = Path(given).name.removesuffix(".yaml")
            if not Path(given).exists() and name in recipes:
                resolved = str(recipes[name])
                arg = resolved if after_flag else f"--config={resolved}"
        out.append(arg)
    return out


BF16_SPEEDUP_ENV = "EDJE_CPU_BF16_SPEEDUP"  # cpu_precision's measurement, for the run's other ranks


def cpu_precision(trainer) -> None:
    """Recipes ask for bf16-mixed (GPUs, CPUs with fast bf16 units). On a CPU, train in float32
    where bf16 is slower: without native bf16 a matmul runs a reference kernel tens of times
    slower, and some CPUs with native bf16 (AVX-512 BF16 without AMX) still measure slower."""
    import logging

    import torch

    from edje.training import hardware

    precision = str(trainer.get("precision"))
    on_cpu = trainer.get("accelerator") == "cpu" or (
        trainer.get("accelerator") in (None, "auto") and not torch.cuda.is_available()
    )
    if "bf16" not in precision or not on_cpu:
        return
    if not hardware.cpu_has_native_bf16():
        reason = "this CPU has no native bfloat16, where a bf16 matmul runs tens of times slower"
    else:
        # Measured once per run: DDP's processes start from this one's environment, so every
        # rank trains in the precision the first one measured.
        speedup = float(os.environ.get(BF16_SPEEDUP_ENV) or hardware.cpu_bf16_speedup())
        os.environ[BF16_SPEEDUP_ENV] = repr(speedup)
        if speedup >= 1:
            return
        reason = f"bf16 matmuls measured {speedup:.2f}x float32's speed on this CPU"
    logging.getLogger(__name__).warning(
        "edje fit: %s: training in float32 (precision=32-true) instead of precision=%s.",
        reason,
        precision,
    )
    trainer["precision"] = "32-true"


def make_cli(cli_args: list[str], run: bool = True, trusted_code: Sequence[str] = ()):
    """The LightningCLI of `edje fit` (`run=False` parses and instantiates only); the recipe's
    import paths resolve only where `recipe_imports` allows, plus the `trusted_code` modules."""
    from lightning.pytorch.cli import LightningCLI

    from edje.training import EDJETrainingModule
    from edje.training.recipe_trust import recipe_imports

    datamodule, by_class_path = datamodule_class(cli_args)

    class EDJECLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The data is read as the network reads it: one vision encoder, tokenizer and
            # caption length, named once in the recipe's model section.
            target = "data.init_args.backbones" if by_class_path else "data.backbones"
            parser.link_arguments("model.backbones", target, apply_on="instantiate")

        def parse_arguments(self, parser, args) -> None:
            # `args` is the command line edje fit was given: Lightning's warning about passing
            # args while sys.argv is set does not apply.
            self.config = parser.parse_args(args)
            self.asked_model = _model_arguments(self.config)  # before a checkpoint's replace them

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            cpu_precision(config["trainer"])
            warn_replaced_on_resume(self.asked_model, _model_arguments(self.config))

    with recipe_imports(trusted_code):
        return EDJECLI(
            EDJETrainingModule,
            datamodule,
            subclass_mode_data=by_class_path,
            args=(["fit"] if run else []) + list(cli_args),
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": EXAMPLE, "exit_on_error": False},  # errors: `run` says them
            auto_configure_optimizers=False,  # the optimizer is the module's own argument
        )


def _model_arguments(config) -> dict:
    model = config.get("fit", config).get("model")
    return model.as_dict() if model is not None else {}


def warn_replaced_on_resume(asked: dict, used: dict) -> None:
    """On resume (`--ckpt_path`) LightningCLI takes the module's arguments from the checkpoint:
    say which of the recipe's or command line's it replaced, or a changed option would
    silently not apply."""
    import logging

    replaced = {key: (asked[key], used[key]) for key in asked if used.get(key) != asked[key]}
    for key, (given, kept) in sorted(replaced.items()):
        logging.getLogger(__name__).warning(
            "edje fit: resuming, model.%s is the checkpoint's %r, not the %r given (the module's "
            "arguments come from the checkpoint; to change one, start a run from the exported "
            "model with --model.network.init_args.pretrained)",
            key, kept, given,
        )  # fmt: skip
