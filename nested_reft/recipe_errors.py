"""One line for a recipe's validation error: the file, the dotted field, what was expected and what was found.

pydantic reports every error with its internal location (union branches, discriminator tags); a user needs the
first one, in the terms of the YAML they wrote, with a "did you mean" for a misspelt key.
"""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ValidationError


def describe_validation_error(where: str, error: ValidationError, overrides: list[str], root: type[BaseModel]) -> str:
    """One line for the first validation error of a `root` document read from `where`: file, dotted field, what
    was expected, what was found, and for a misspelt key the closest valid one."""
    errors = error.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a misspelt key explains the rest
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union")) and p not in _TAGS]
    field = ".".join(loc) or "<top level>"
    origin = " (from --set)" if any(o.split("=")[0].strip() == field for o in overrides) else ""
    if err["type"] == "extra_forbidden":
        return f"{where}: {field}{origin}: unknown key{_suggest(loc, root)}"
    found = err.get("input")
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    if err["type"] == "value_error":
        return f"{where}: {message}" if not loc else f"{where}: {field}{origin}: {message}"
    why = f" ({_WHY[field]})" if field in _WHY else ""
    return f"{where}: {field}{origin}: {message}, found {found!r}{why}"


_TAGS = ("path", "fields")  # DataSpec's branches, which are no part of a field's name

# Why a bound exists, for the bounds a user may not expect.
_WHY = {
    "rollout.num_generations": "group advantages compare the G completions of a prompt, so G >= 2",
    "rollout.temperature": "greedy sampling would make the G completions of a prompt identical",
    "objective.epsilon": "the clip range [1 - epsilon, 1 + epsilon_high] needs 1 - epsilon > 0",
}


def _suggest(loc: list[str], root: type[BaseModel]) -> str:
    """' (did you mean 'x'?)' using the valid keys at the misspelt key's level."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if part.isdigit():  # an item of a list of sections
            continue
        field = model.model_fields.get(part)
        model = _section_in(field.annotation) if field is not None else None
        if model is None:
            return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(model.model_fields)})"


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds, through optionals, unions, lists and `Annotated` (`lora: LoraSettings | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section_in, get_args(annotation))), None)
