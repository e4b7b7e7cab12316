"""The built-in data set: grade-school arithmetic word problems, generated (no download).

A problem is a starting quantity followed by 1 to 4 steps (+, -, x, /), each told by a sentence drawn from
templates for its operation, and a closing question. Whether a problem belongs to train or test is decided by
a SHA-256 bucket of its question text alone, so the two splits can never share a question, whatever the seed,
difficulty or size; the generator draws problems until it has `n` distinct ones of the requested split.
"""

from __future__ import annotations

import hashlib
import operator
import random
from dataclasses import dataclass

from nested_reft.data.rows import Example, PrepareSummary
from nested_reft.errors import UserError

ARITHMETIC = "arithmetic"
ARITHMETIC_DEFAULT_SIZE = {"train": 5000, "test": 500}  # rows generated when no --limit is given
DEFAULT_DIFFICULTY = 2

_NAMES = (
    ("Ava", "she"), ("Liam", "he"), ("Mia", "she"), ("Noah", "he"), ("Zoe", "she"), ("Omar", "he"),
    ("Lena", "she"), ("Ravi", "he"), ("Sofia", "she"), ("Ben", "he"), ("Priya", "she"), ("Diego", "he"),
    ("Hana", "she"), ("Kwame", "he"), ("Elena", "she"), ("Tom", "he"), ("Aisha", "she"), ("Lucas", "he"),
    ("Maya", "she"), ("Felix", "he"), ("Nora", "she"), ("Jamal", "he"), ("Ingrid", "she"), ("Kenji", "he"),
)  # fmt: skip
_PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}  # subject, object, possessive
_OBJECTS = (
    "marbles", "stickers", "apples", "cookies", "pencils", "books", "coins", "trading cards", "seashells",
    "balloons", "crayons", "stamps", "beads", "oranges", "toy cars", "flowers", "eggs", "buttons",
)  # fmt: skip
_OPENINGS = (
    "{name} has {n} {obj}.",
    "{name} collected {n} {obj} last week.",
    "{name} starts the day with {n} {obj}.",
    "{name} keeps {n} {obj} in a shoebox.",
)
_STEPS = {
    "+": (
        "{Sub} buys {k} more {obj}.",
        "{friend} gives {obj_pron} {k} {obj}.",
        "{Sub} finds {k} more {obj} at the park.",
        "Later, {sub} wins {k} {obj} at a fair.",
    ),
    "-": (
        "{Sub} gives {k} {obj} to {friend}.",
        "{Sub} loses {k} {obj} on the way home.",
        "{Sub} sells {k} {obj} at the market.",
        "{Sub} uses {k} {obj} for a school project.",
    ),
    "*": (
        "After a good week, {sub} has {k} times as many {obj} as before.",
        "{Sub} trades with {friend} and ends up with {k} times as many {obj} as {sub} had.",
        "{Poss} collection of {obj} grows to {k} times its size.",
    ),
    "/": (
        "{Sub} splits {poss} {obj} into {k} equal groups and keeps only one group.",
        "{Sub} packs the {obj} equally into {k} bags and gives away all the bags but one.",
        "{Sub} keeps one out of every {k} {obj} and donates the rest.",
    ),
}
_QUESTIONS = (
    "How many {obj} does {name} have now?",
    "How many {obj} does {name} have in the end?",
    "How many {obj} does {name} end up with?",
)
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
_MAX_DRAWS_PER_PROBLEM = 100  # a test-split problem takes about 10 draws; running out means the space is exhausted


@dataclass(frozen=True)
class _Level:
    steps: tuple[int, int]  # inclusive range of the number of steps
    start: tuple[int, int]  # inclusive range of the starting quantity
    addend: int  # the largest number added or taken away
    factor: int  # the largest multiplier or divisor; below 2, no multiplication or division
    ceiling: int  # a multiplication never takes the quantity above this


_LEVELS = {
    1: _Level(steps=(1, 2), start=(2, 10), addend=9, factor=0, ceiling=0),
    2: _Level(steps=(1, 3), start=(4, 30), addend=20, factor=5, ceiling=200),
    3: _Level(steps=(2, 4), start=(10, 60), addend=50, factor=9, ceiling=1000),
    4: _Level(steps=(3, 4), start=(20, 150), addend=150, factor=12, ceiling=5000),
}


@dataclass(frozen=True)
class ArithmeticProblem:
    """A generated problem with its trace: the quantity starts at `start`, then each (operation, operand) step
    of `steps` applies in order. Every quantity along the way is a whole number of at least 2."""

    question: str
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def answer(self) -> int:
        value = self.start
        for op, operand in self.steps:
            value = _APPLY[op](value, operand)
        return value


def generate_arithmetic(split: str, n: int, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> list[Example]:
    """`n` distinct word problems of `split` ("train" or "test"), the same for the same arguments."""
    problems = arithmetic_problems(split, n, seed, difficulty)
    return [
        Example(f"{ARITHMETIC}-{split}-{i:06d}", p.question, str(p.answer), ARITHMETIC) for i, p in enumerate(problems)
    ]


def arithmetic_problems(
    split: str, n: int, seed: int, difficulty: int = DEFAULT_DIFFICULTY
) -> list[ArithmeticProblem]:
    """The problems behind `generate_arithmetic`, with their traces. Difficulty 1 to 4 widens the number ranges
    and raises the step count (1: one or two additions or subtractions of numbers up to 10)."""
    _check_arithmetic_split(split)
    if difficulty not in _LEVELS:
        raise UserError(f"--difficulty must be 1 to {len(_LEVELS)}, got {difficulty}")
    rng = random.Random(seed)
    problems: list[ArithmeticProblem] = []
    seen: set[str] = set()
    for _ in range(_MAX_DRAWS_PER_PROBLEM * n):
        if len(problems) == n:
            break
        problem = _draw_problem(rng, _LEVELS[difficulty])
        if _split_of(problem.question) == split and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < n:
        raise UserError(
            f"{ARITHMETIC}: only {len(problems)} distinct {split} problems at difficulty {difficulty}; lower --limit"
        )
    return problems


def _check_arithmetic_split(split: str) -> None:
    if split not in ARITHMETIC_DEFAULT_SIZE:
        raise UserError(f"{ARITHMETIC}: no split {split!r}; expected one of {', '.join(ARITHMETIC_DEFAULT_SIZE)}")




def arithmetic_source(
    split: str, limit: int | None, seed: int, difficulty: int
) -> tuple[list[Example], PrepareSummary]:
    _check_arithmetic_split(split)
    examples = generate_arithmetic(split, limit or ARITHMETIC_DEFAULT_SIZE[split], seed, difficulty)
    n = len(examples)
    summary = PrepareSummary(ARITHMETIC, split, n, n, rejected={}, answer_format=None, limit=limit, seed=seed)
    return examples, summary


def _split_of(question: str) -> str:
    """The split a question belongs to: test for one in ten, train for the others. A stable function of the
    text (SHA-256, not `hash()`, which Python salts per process)."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "train"


def _draw_problem(rng: random.Random, level: _Level) -> ArithmeticProblem:
    name, pronoun = rng.choice(_NAMES)
    sub, obj_pron, poss = _PRONOUNS[pronoun]
    obj = rng.choice(_OBJECTS)
    start = value = rng.randint(*level.start)
    sentences = [rng.choice(_OPENINGS).format(name=name, n=start, obj=obj)]
    words = dict(Sub=sub.capitalize(), sub=sub, obj_pron=obj_pron, Poss=poss.capitalize(), poss=poss, obj=obj)
    steps: list[tuple[str, int]] = []
    template = ""
    for _ in range(rng.randint(*level.steps)):
        op, operand = _draw_step(rng, level, value)
        friend = rng.choice([other for other, _ in _NAMES if other != name])
        template = rng.choice([t for t in _STEPS[op] if t != template])  # never the same sentence twice in a row
        sentences.append(template.format(k=operand, friend=friend, **words))
        steps.append((op, operand))
        value = _APPLY[op](value, operand)
    sentences.append(rng.choice(_QUESTIONS).format(obj=obj, name=name))
    return ArithmeticProblem(" ".join(sentences), start, tuple(steps))


def _draw_step(rng: random.Random, level: _Level, value: int) -> tuple[str, int]:
    """A step that keeps the quantity a whole number of at least 2 (so every count in the text is plural):
    subtraction leaves 2 or more, division is exact and leaves 2 or more, multiplication stays under the ceiling."""
    divisors = [d for d in range(2, min(level.factor, value // 2) + 1) if value % d == 0]
    options = ["+"]
    if value >= 4:
        options.append("-")
    if level.factor >= 2 and 2 * value <= level.ceiling:
        options.append("*")
    if divisors:
        options.append("/")
    op = rng.choice(options)
    if op == "+":
        return op, rng.randint(2, level.addend)
    if op == "-":
        return op, rng.randint(2, min(level.addend, value - 2))
    if op == "*":
        return op, rng.randint(2, min(level.factor, level.ceiling // value))
    return op, rng.choice(divisors)
