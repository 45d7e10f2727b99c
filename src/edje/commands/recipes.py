"""`edje recipes`: the training recipes installed with edje, by name, for `edje fit --config`."""

from __future__ import annotations

import argparse

EXAMPLE = """example:
  edje recipes
  edje fit --config finetune_custom --print_config > my_recipe.yaml   # a copy to edit
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes",
        help="list the packaged training recipes (edje fit --config NAME)",
        description="The recipes installed with edje; `edje fit --config NAME` runs one, "
        "`edje fit --config NAME --print_config` prints it whole.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edje.commands.fit import packaged_recipes

    recipes = packaged_recipes()
    width = max(len(name) for name in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {summary(path)}")
    return 0


def summary(path) -> str:
    """A recipe's first comment sentence (its header comment, joined)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    sentence = " ".join(lines).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 90 else sentence[:87].rsplit(" ", 1)[0] + " ..."
