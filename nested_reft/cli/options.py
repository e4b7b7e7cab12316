"""Options shared by every command that takes a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

RecipeArgument = typer.Argument(None, help="Recipe YAML file (omitted: all defaults).", show_default=False)


def set_option(example: str):
    """The repeatable `--set section.field=value` option, its help showing `example`, a field the command reads."""
    return typer.Option(None, "--set", help=f"Override a recipe field, typed like the field: --set {example} "
                        "(repeatable; a path is relative to the current folder).")


def recipe_and_overrides(recipe: Optional[Path], overrides: Optional[list[str]]):
    """Load the recipe with its --set overrides (UserError on any problem)."""
    from nested_reft.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def parse_ratios(text: str, flag: str) -> list[float]:
    """'0.1,0.25,0.4' -> [0.1, 0.25, 0.4]; anything else is a one-line error naming the flag."""
    from nested_reft.errors import UserError

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers such as 0.1,0.25,0.4, found {text!r}") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise UserError(f"{flag}: expected ratios in (0, 1), found {text!r}")
    return values


def show_precision(console, cfg) -> None:
    """Print the resolved precision (and the notice when `auto` fell back); UserError for an impossible choice."""
    from nested_reft.precision import resolve_runtime

    for line in resolve_runtime(cfg)[1]:
        console.print(line, highlight=False, soft_wrap=True)
