"""The built-in reward functions, each named in `reward.functions` with its parameters.

| name | reward of one completion | parameters |
| --- | --- | --- |
| `math` | 1 when its final answer equals the gold `answer` (`rewards.answers`), else 0 | (`reward.last_number_fallback`, `reward.timeout_s`) |
| `format` | 1 when it has a well-formed final-answer marker (a `####` line, a closed `\\boxed{}`), else 0 | |
| `soft_overlong` | DAPO's soft overlong punishment: 0 up to `max_length - cache` tokens, then linearly down to -1 at `max_length`, -1 past it | `cache`, `max_length` |
| `length` | 0 up to `free` tokens, then linearly down to -1 at `max_length`: `-(n - free) / (max_length - free)`; -1 past it | `free`, `max_length` |
| `repetition` | `-(1 - distinct / total)` over the completion's token n-grams: 0 when no n-gram repeats | `ngram_size` |

Lengths count completion tokens (through EOS). `max_length` defaults to the completion limit in force:
`rollout.max_completion_length` in training, `--max-new-tokens` in `evaluate`. Each function is in TRL's form
(`f(prompts, completions, completion_ids, **columns) -> list`), like users' functions, and runs in the trainer's
process: it is ours, cannot hang, and costs microseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from nested_reft.errors import UserError
from nested_reft.rewards.answers import has_marked_answer, math_reward

RewardCallable = Callable[..., list[float | None]]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoParams(_Params):
    pass


class SoftOverlongParams(_Params):
    cache: int = Field(ge=1, description="Tokens before max_length over which the penalty falls from 0 to -1 "
                       "(DAPO's L_cache).")
    max_length: int | None = Field(None, ge=1, description="DAPO's L_max. Default: the completion limit.")


class LengthParams(_Params):
    free: int = Field(0, ge=0, description="Tokens that cost nothing.")
    max_length: int | None = Field(None, ge=1, description="Where the penalty reaches -1. Default: the completion limit.")


class RepetitionParams(_Params):
    ngram_size: int = Field(3, ge=1, description="Tokens per n-gram.")


@dataclass(frozen=True)
class Context:
    """What built-ins take from the rest of the recipe."""

    max_completion_length: int
    last_number_fallback: bool = False
    timeout_s: float = 2.0


# -- the rewards of one completion ---------------------------------------------------------------------------------


def soft_overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO's soft overlong punishment (Yu et al., 2025, eq. 13) of a completion of `length` tokens."""
    start = max_length - cache
    if length <= start:
        return 0.0
    return (start - length) / cache if length <= max_length else -1.0


def length_penalty(length: int, max_length: int, free: int) -> float:
    """0 for up to `free` tokens, then linearly down to -1 at `max_length`, -1 past it."""
    return -min(1.0, max(0, length - free) / (max_length - free))


def repetition_penalty(ids: list[int], ngram_size: int) -> float:
    """-(1 - distinct n-grams / n-grams): 0 without a repeated n-gram, towards -1 for a loop (0 below n tokens)."""
    ngrams = [tuple(ids[i : i + ngram_size]) for i in range(len(ids) - ngram_size + 1)]
    return -(1.0 - len(set(ngrams)) / len(ngrams)) if ngrams else 0.0


# -- the built-ins, in TRL's form ----------------------------------------------------------------------------------


def _math(_params: NoParams, context: Context) -> RewardCallable:
    def math(completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
        return [math_reward(text, gold, last_number_fallback=context.last_number_fallback,
                            timeout_s=context.timeout_s).reward for text, gold in zip(completions, answer)]

    return math


def _format(_params: NoParams, _context: Context) -> RewardCallable:
    def format(completions: list[str], **_: Any) -> list[float | None]:  # noqa: A001 (TRL's name for it)
        return [float(has_marked_answer(text)) for text in completions]

    return format


def _soft_overlong(params: SoftOverlongParams, context: Context) -> RewardCallable:
    max_length = params.max_length or context.max_completion_length
    _check_fits("soft_overlong", "cache", params.cache, max_length, params.max_length is not None, below=False)
    return _of_length(lambda n: soft_overlong_penalty(n, max_length, params.cache))


def _length(params: LengthParams, context: Context) -> RewardCallable:
    max_length = params.max_length or context.max_completion_length
    _check_fits("length", "free", params.free, max_length, params.max_length is not None, below=True)
    return _of_length(lambda n: length_penalty(n, max_length, params.free))


def _of_length(penalty: Callable[[int], float]) -> RewardCallable:
    """A reward function of each completion's length in tokens."""

    def of_length(completion_ids: list[list[int]], **_: Any) -> list[float | None]:
        return [penalty(len(ids)) for ids in completion_ids]

    return of_length


def _check_fits(function: str, key: str, value: int, max_length: int, explicit: bool, *, below: bool) -> None:
    """UserError unless `value` is at most (`below`: under) `max_length`, which the recipe set or defaulted."""
    if value > max_length or (below and value == max_length):
        raise UserError(f"reward.functions: {function}: {key} ({value}) must be {'below' if below else 'at most'} "
                        f"max_length ({max_length}, {'set' if explicit else 'the completion limit'})")


def _repetition(params: RepetitionParams, _context: Context) -> RewardCallable:
    def repetition(completion_ids: list[list[int]], **_: Any) -> list[float | None]:
        return [repetition_penalty(ids, params.ngram_size) for ids in completion_ids]

    return repetition


@dataclass(frozen=True)
class Builtin:
    params: type[_Params]
    make: Callable[[Any, Context], RewardCallable]

    def build(self, params: dict[str, Any], context: Context) -> RewardCallable:
        """The function with `params` (validated when the recipe loaded) and the recipe's `context`."""
        return self.make(self.params.model_validate(params), context)


BUILTINS: dict[str, Builtin] = {
    "math": Builtin(NoParams, _math),
    "format": Builtin(NoParams, _format),
    "soft_overlong": Builtin(SoftOverlongParams, _soft_overlong),
    "length": Builtin(LengthParams, _length),
    "repetition": Builtin(RepetitionParams, _repetition),
}
