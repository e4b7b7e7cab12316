"""A run's reward: the weighted sum of its reward functions, each called the way TRL calls reward functions.

`reward.functions` lists them, each `{name, weight, ...parameters}`; `name` is
- a built-in (`rewards.builtin`: `math`, `format`, `soft_overlong`, `length`, `repetition`), run in this process;
- `path/to/file.py:function` (relative to the recipe's folder) or `package.module:function`: a user's function,
  run in the reward worker processes (`rewards.workers`), so that a hang or a crash costs a line, not the run.
Without `functions`, a recipe's reward is `math` (weight 1) plus `format` (weight `reward.format_weight`).

A function is called once per batch (the rows this process scores: every completion of its prompts, TRL's
convention), with keyword arguments only: `prompts` (each row's question, before any chat template),
`completions` (the decoded texts), `completion_ids` (lists of token ids, through EOS), every column of the data
set but the question (`id`, `answer`, `source` and the rows' own fields; None where a row lacks one), each a list
with one value per completion, `step` (the training step; 0 in `evaluate`), and the function's own parameters from
the recipe. It returns one number per completion, or None where it does not apply: None counts as 0 in the total
and is left out of the function's mean. A completion is correct (accuracy, pass@k) by `math` when the run has it,
else when its total reaches `reward.correct_threshold`.

Whatever a function does wrong (raising, hanging past `reward.timeout_s`, returning the wrong number of values or
a value that is not a finite number) is a UserError of one line naming the function, the row and the fault.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nested_reft.errors import UserError
from nested_reft.rewards import user
from nested_reft.rewards.builtin import BUILTINS, Context
from nested_reft.rewards.workers import WorkerDied, pool

if TYPE_CHECKING:
    from nested_reft.data import Example
    from nested_reft.recipe import RewardConfig

# Keyword arguments every function receives besides the data set's columns (which therefore cannot be named so).
STANDARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "step")


@dataclass(frozen=True)
class Completions:
    """What the reward functions score: row i is a completion of the prompt of `examples[i]`."""

    texts: list[str]
    ids: list[list[int]]
    examples: list[Example]  # one per row: a prompt's example repeated for each of its completions
    step: int  # the training step (0 in `evaluate`), passed to every function
    stage: str  # where the batch comes from, for error messages: "step 3", "evaluation"

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of a call: the standard ones and every column, one value per row."""
        columns = dict.fromkeys(name for example in self.examples for name in example.columns)
        return {
            "prompts": [e.question for e in self.examples], "completions": self.texts, "completion_ids": self.ids,
            "id": [e.id for e in self.examples], "answer": [e.answer for e in self.examples],
            "source": [e.source for e in self.examples],
            **{name: [e.columns.get(name) for e in self.examples] for name in columns}, "step": self.step,
        }  # fmt: skip

    def row(self, i: int) -> Completions:
        """Row `i` alone, as a batch of one."""
        return Completions(self.texts[i : i + 1], self.ids[i : i + 1], self.examples[i : i + 1], self.step, self.stage)

    def describe_row(self, i: int) -> str:
        return f"row {i} (example {self.examples[i].id!r})"


@dataclass
class Scores:
    """The reward functions' verdict on a batch."""

    total: list[float]  # the weighted sum per row
    correct: list[bool]
    values: dict[str, list[float | None]] = field(default_factory=dict)  # each function's own rewards, by name


@dataclass(frozen=True)
class RewardFunction:
    """One entry of `reward.functions`, resolved."""

    name: str  # the function's `__name__` (the built-in's name): its metrics are `rewards/<name>/mean`, `/std`
    ref: str  # as the recipe names it
    weight: float
    params: dict[str, Any]  # a user's function receives them as keyword arguments on every call
    local: Callable[..., list[float | None]] | None = None  # a built-in, called here; None: called in a worker

    def describe(self) -> str:
        return f"reward function {self.name!r}" + (f" ({self.ref})" if self.ref != self.name else "")


class RewardFunctions:
    """The reward of a run: call it on a batch of completions to get their `Scores`."""

    def __init__(self, functions: list[RewardFunction], *, correct_threshold: float = 1.0, timeout_s: float = 2.0):
        names = [f.name for f in functions]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            refs = " and ".join(f.ref for f in functions if f.name == twice)
            raise UserError(f"reward.functions: {refs} are both named {twice!r}; their metrics "
                            f"(rewards/{twice}/mean) need distinct names")
        self.functions, self.correct_threshold, self.timeout_s = functions, correct_threshold, timeout_s

    @classmethod
    def from_config(cls, cfg: RewardConfig, max_completion_length: int) -> RewardFunctions:
        """The functions of a recipe's `reward` section. Users' functions are imported in a worker now, so that a
        wrong file, module or name is a UserError before any model loads. `max_completion_length` is the completion
        limit that length-based built-ins default to."""
        context = Context(max_completion_length, cfg.last_number_fallback, cfg.timeout_s)
        specs = cfg.functions if cfg.functions is not None else cfg.default_functions()
        functions = []
        for spec in specs:
            if spec.name in BUILTINS:
                local = BUILTINS[spec.name].build(spec.params, context)
                functions.append(RewardFunction(spec.name, spec.name, spec.weight, {}, local))
            else:
                functions.append(RewardFunction(_load(spec.name), spec.name, spec.weight, spec.params))
        return cls(functions, correct_threshold=cfg.correct_threshold, timeout_s=cfg.timeout_s)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    @property
    def has_math(self) -> bool:
        """Whether the built-in `math` judges which completions are correct (else `correct_threshold` does)."""
        return any(f.ref == "math" for f in self.functions)

    def __call__(self, batch: Completions) -> Scores:
        """Every function's rewards for `batch`, their weighted sum and the correct rows. UserError on any fault."""
        arguments = batch.arguments()
        values = {f.name: self._values(f, batch, arguments) for f in self.functions}
        total = [sum(f.weight * values[f.name][i] for f in self.functions if values[f.name][i] is not None)
                 for i in range(len(batch.texts))]
        correct = [v == 1.0 for v in values["math"]] if self.has_math else [t >= self.correct_threshold for t in total]
        return Scores([float(t) for t in total], correct, values)

    def _values(self, function: RewardFunction, batch: Completions, arguments: dict[str, Any]) -> list[float | None]:
        clash = sorted(arguments.keys() & function.params.keys())
        if clash:
            raise UserError(f"{function.describe()}: parameter {clash[0]!r} is also a data column or a standard "
                            f"argument ({', '.join(STANDARD_ARGUMENTS)}); rename it")
        reply = self._reply(function, {**arguments, **function.params}, batch)
        if reply[0] == "raised":
            raise UserError(f"{function.describe()} raised {reply[1]}{_at(reply[2])} on "
                            f"{self._failing_row(function, batch)} at {batch.stage}")
        return _checked(function, reply, batch)

    def _reply(self, function: RewardFunction, kwargs: dict[str, Any], batch: Completions) -> list:
        """The reply of one call (see `rewards.workers`); a call that hangs or kills its worker is a UserError."""
        if function.local is not None:
            return user.call(function.local, kwargs)
        try:
            reply = pool().call(function.ref, kwargs, self.timeout_s)
        except TimeoutError:
            raise UserError(f"{function.describe()} returned nothing within reward.timeout_s={self.timeout_s:g} s "
                            f"on the {len(batch.texts)} completions of {batch.stage}; its worker was stopped "
                            "(raise reward.timeout_s, or make it faster)") from None
        except WorkerDied as exc:
            raise UserError(f"{function.describe()} ended its worker process on the {len(batch.texts)} completions "
                            f"of {batch.stage}: {exc}") from None
        except RuntimeError as exc:  # no worker started
            raise UserError(f"{function.describe()}: {exc}") from None
        if reply[0] == "load_error":
            raise UserError(f"reward.functions: {reply[1]}")
        return reply

    def _failing_row(self, function: RewardFunction, batch: Completions) -> str:
        """The first row on which `function` raises when called on it alone (only ever asked once it has raised on
        the batch, to name the row in the error), or a phrase saying that none does within `timeout_s` of trying."""
        deadline = time.monotonic() + self.timeout_s
        for i in range(len(batch.texts)):
            if time.monotonic() > deadline:
                break
            row = batch.row(i)
            try:
                reply = self._reply(function, {**row.arguments(), **function.params}, row)
            except UserError:  # the row alone hangs or crashes: that row is as good a culprit as any
                return batch.describe_row(i)
            if reply[0] == "raised":
                return batch.describe_row(i)
        return f"the batch of {len(batch.texts)} completions (no row tried alone made it raise)"


def _load(ref: str) -> str:
    """Import the user's function `ref` in a worker; its `__name__`. UserError when it cannot be imported."""
    try:
        reply = pool().load(ref)
    except TimeoutError:
        raise UserError(f"reward.functions: importing {ref} took longer than the worker's start-up bound") from None
    except (WorkerDied, RuntimeError) as exc:
        raise UserError(f"reward.functions: importing {ref}: {exc}") from None
    if reply[0] != "ok":
        raise UserError(f"reward.functions: {reply[1]}")
    return reply[1]


def _checked(function: RewardFunction, reply: list, batch: Completions) -> list[float | None]:
    """The values of a reply, or a UserError saying what is wrong with them."""
    n = len(batch.texts)
    expected = f"expected a list of {n} numbers (one per completion; None where it does not apply)"
    if reply[0] == "not_a_list":
        raise UserError(f"{function.describe()} returned a {reply[1]} at {batch.stage}; {expected}")
    values = reply[1]
    if len(values) != n:
        raise UserError(f"{function.describe()} returned {len(values)} values for {n} completions at {batch.stage}; "
                        f"{expected}")
    for i, value in enumerate(values):
        if isinstance(value, dict):
            raise UserError(f"{function.describe()} returned {value['bad']} ({value['type']}) for "
                            f"{batch.describe_row(i)} at {batch.stage}; expected a number, or None where it does "
                            "not apply")
        if value is not None and not math.isfinite(value):
            raise UserError(f"{function.describe()} returned {value} for {batch.describe_row(i)} at {batch.stage}; "
                            "expected a finite number, or None where it does not apply")
    return values


def _at(where: str) -> str:
    return f" ({where})" if where else ""
