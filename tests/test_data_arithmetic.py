"""The built-in arithmetic generator: answers match the words, difficulty levels, disjoint seeded splits."""

import os
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from nested_reft.data import (
    arithmetic_problems,
    generate_arithmetic,
    load_source,
)
from nested_reft.errors import UserError


# --- The arithmetic generator ------------------------------------------------------------------------------


def _answer_from_text(question: str) -> int:
    """Solve a generated problem from its words alone, without the generator's trace: the first sentence gives
    the starting count, each middle sentence one operation (recognised by its wording) on the number it names."""
    sentences = re.split(r"(?<=[.?]) ", question)
    value = Fraction(*map(int, re.findall(r"\d+", sentences[0])))
    for sentence in sentences[1:-1]:
        (operand,) = map(int, re.findall(r"\d+", sentence))
        if "times" in sentence:
            value *= operand
        elif "equal" in sentence or "one out of every" in sentence:
            value /= operand
        elif re.search(r"\bmore\b|gives (her|him)\b|\bwins\b", sentence):
            value += operand
        elif re.search(r"\b(loses|sells|uses)\b|\bto [A-Z]", sentence):
            value -= operand
        else:
            raise AssertionError(f"no operation recognised in {sentence!r}")
        assert value.denominator == 1 and value >= 2, f"{question!r}: a count becomes {value}"
    assert sentences[-1].startswith("How many") and sentences[-1].endswith("?")
    return int(value)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_arithmetic_answers_are_what_the_words_say(difficulty):
    problems = arithmetic_problems("train", 300, seed=difficulty, difficulty=difficulty)
    examples = generate_arithmetic("train", 300, seed=difficulty, difficulty=difficulty)
    for problem, example in zip(problems, examples, strict=True):
        assert example.question == problem.question
        assert example.answer == str(_answer_from_text(problem.question)) == str(problem.answer)
        # The trace and the text agree: the numbers appear in the order of the steps.
        numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
        assert numbers == [problem.start, *(operand for _, operand in problem.steps)]


def test_arithmetic_difficulty_sets_steps_and_numbers():
    mean_steps = {}
    for difficulty in (1, 2, 3, 4):
        problems = arithmetic_problems("train", 400, seed=0, difficulty=difficulty)
        mean_steps[difficulty] = sum(len(p.steps) for p in problems) / len(problems)
        if difficulty == 1:
            assert {len(p.steps) for p in problems} == {1, 2}
            assert {op for p in problems for op, _ in p.steps} == {"+", "-"}
            assert max(max(p.start, *(k for _, k in p.steps)) for p in problems) <= 10
        else:
            assert {op for p in problems for op, _ in p.steps} == {"+", "-", "*", "/"}
    assert mean_steps[1] < mean_steps[2] < mean_steps[3] < mean_steps[4]


def test_arithmetic_variety():
    questions = [e.question for e in generate_arithmetic("train", 500, seed=0)]
    openings = {q.split(" ")[0] for q in questions}  # the names
    objects = {re.search(r"How many (.+?) does", q).group(1) for q in questions}
    assert len(openings) >= 20 and len(objects) >= 15
    assert len(set(questions)) == len(questions)


def test_arithmetic_splits_are_disjoint_whatever_the_seed():
    train = {e.question for e in generate_arithmetic("train", 2000, seed=0)}
    test = {e.question for e in generate_arithmetic("test", 500, seed=0)}
    test_other_seed = {e.question for e in generate_arithmetic("test", 500, seed=7)}
    assert len(train) == 2000 and len(test) == 500
    assert not train & test and not train & test_other_seed


def test_arithmetic_seeds():
    first = generate_arithmetic("test", 50, seed=3)
    assert generate_arithmetic("test", 50, seed=3) == first
    assert [e.question for e in generate_arithmetic("test", 50, seed=4)] != [e.question for e in first]
    assert [e.id for e in first] == [f"arithmetic-test-{i:06d}" for i in range(50)]


def test_arithmetic_does_not_depend_on_python_hash_seed():
    code = "from nested_reft.data import generate_arithmetic; print(generate_arithmetic('test', 20, seed=1)[-1])"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": salt}, capture_output=True, text=True
        ).stdout
        for salt in ("1", "2")
    }
    assert len(outputs) == 1 and "arithmetic-test-000019" in outputs.pop()


def test_arithmetic_bad_arguments():
    with pytest.raises(UserError, match="no split 'validation'; expected one of train, test"):
        load_source("arithmetic", split="validation")
    with pytest.raises(UserError, match="--difficulty must be 1 to 4, got 5"):
        load_source("arithmetic", difficulty=5)
    with pytest.raises(UserError, match="do not apply to arithmetic"):
        load_source("arithmetic", question_field="q")
    with pytest.raises(UserError, match="--limit must be at least 1"):
        load_source("arithmetic", limit=0)
