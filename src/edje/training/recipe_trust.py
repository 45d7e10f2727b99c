"""What a recipe may name: a recipe is data, shared and downloaded like a model, and the
classes it names are built (their code runs) when `edje fit` reads it. So `class_path` and
every other import path in a recipe resolves only inside the packages edje trains with, minus
their loaders of pickles and code; anything else needs `edje fit --trust-code-from MODULE`,
the user's explicit word that MODULE's code may run (like transformers' `trust_remote_code`)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence

TRUST_FLAG = "--trust-code-from"

TRUSTED_PACKAGES = ("edje", "torch", "lightning", "transformers")

# Inside those packages: what unpickles a file, loads native or remote code, or runs a string.
# jsonargparse also checks where a named object is defined, so a re-export (torch.load is
# torch.serialization.load, torch.os.system is posix.system) is judged by its home.
CODE_LOADERS = (
    "torch.serialization",
    "torch.hub",
    "torch.package",
    "torch.jit",
    "torch.ops",
    "torch.classes",
    "torch.utils.cpp_extension",
    "torch.utils.benchmark",
    "torch.utils.model_zoo",
    "torch.distributed.checkpoint",
    "torch._dynamo",
    "torch._inductor",
    "lightning.fabric.utilities.cloud_io",
    "lightning.pytorch.core.saving",
    "transformers.pipeline",
    "transformers.pipelines",
    "transformers.dynamic_module_utils",
)


@contextlib.contextmanager
def recipe_imports(trusted_code: Sequence[str] = ()) -> Iterator[None]:
    """Within: a recipe's import paths resolve only in `TRUSTED_PACKAGES` (without
    `CODE_LOADERS`) and in the modules the user trusts; jsonargparse refuses the rest while
    parsing, before anything is built. The previous policy is restored after."""
    from jsonargparse import _common, set_parsing_settings

    saved = {key: _common.parsing_settings[key] for key in _IMPORT_SETTINGS}
    try:
        set_parsing_settings(
            import_path_denylist=["*", *CODE_LOADERS],
            import_path_allowlist=[*TRUSTED_PACKAGES, *trusted_code],
        )
        yield
    finally:
        _common.parsing_settings.update(saved)


_IMPORT_SETTINGS = ("import_path_verdicts", "import_paths_enforced")
_JSONARGPARSE_HINT = (
    "Add the import path to import_path_allowlist in set_parsing_settings to allow it."
)


def explained(message: str) -> str:
    """jsonargparse's refusal, with the hint an edje user can act on instead of its API's."""
    hint = (
        f"A recipe names classes from {', '.join(TRUSTED_PACKAGES)} only; to run another "
        f"module's code pass {TRUST_FLAG} MODULE."
    )
    return message.replace(_JSONARGPARSE_HINT, hint)


def trusted_modules(cli_args: list[str]) -> tuple[list[str], list[str]]:
    """(`cli_args` without the trust flags, the modules they name): `--trust-code-from M`
    and `--trust-code-from=M`, repeatable."""
    rest, trusted = [], []
    args = iter(cli_args)
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag != TRUST_FLAG:
            rest.append(arg)
            continue
        module = value if equals else next(args, "")
        if not module or not all(part.isidentifier() for part in module.split(".")):
            message = f"{TRUST_FLAG} expects a dotted module name, got {module!r}"
            raise argparse.ArgumentError(None, message)
        trusted.append(module)
    return rest, trusted
