"""`nested-reft recipe RECIPE [--set k=v]`: the fully resolved recipe, printed without running anything."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nested_reft.cli.console import make_console
from nested_reft.cli.options import RecipeArgument, recipe_and_overrides, set_option


def recipe(
    recipe: Optional[Path] = RecipeArgument,
    overrides: Optional[list[str]] = set_option("reward.timeout_s=5"),
) -> None:
    """Print RECIPE as YAML with every default filled in, --set applied, paths made absolute and `auto` settings
    resolved for this machine: the recipe.yaml a run of it would record. Notices go to stderr, so the output is a
    recipe that `train` takes as it is.

    Example: nested-reft recipe recipes/quickstart.yaml --set train.steps=3 > my-recipe.yaml
    """
    from nested_reft.precision import resolve_runtime

    resolved, notices = resolve_runtime(recipe_and_overrides(recipe, overrides))
    stderr = make_console(stderr=True)
    for line in notices:
        stderr.print(line, highlight=False, soft_wrap=True)
    typer.echo(resolved.to_yaml(), nl=False)
