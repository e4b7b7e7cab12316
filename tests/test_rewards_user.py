"""Users' reward functions: refs, importing, calling, and what a reply says about a result."""

import math

import numpy as np
import pytest
import torch

from nested_reft.rewards import user


@pytest.mark.parametrize(
    ("ref", "parts"),
    [
        ("examples/rewards.py:short", ("examples/rewards.py", "short")),
        ("my_pkg.rewards:judge", ("my_pkg.rewards", "judge")),
        ("my_pkg.rewards:Judge.score", ("my_pkg.rewards", "Judge.score")),
        ("C:/x/rewards.py:short", ("C:/x/rewards.py", "short")),  # the last colon separates the function
        ("math", None),
        ("rewards.py:", None),
        (":short", None),
        ("rewards.py:a..b", None),
    ],
)
def test_split_ref(ref, parts):
    assert user.split_ref(ref) == parts


def test_a_file_function_is_imported_and_named(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text("def short(completions, **kwargs):\n    return [1.0] * len(completions)\n\nalias = short\n")
    functions = {}
    assert user.load(f"{path}:short", functions) == ["ok", "short"]
    assert user.load(f"{path}:alias", functions) == ["ok", "short"]  # the metrics name is __name__, as in TRL
    assert user.call(functions[f"{path}:short"], {"completions": ["a", "b"]}) == ["ok", [1.0, 1.0]]


def test_a_module_function_is_imported():
    functions = {}
    assert user.load("tests.fixtures.trl_rewards:reward_len", functions) == ["ok", "reward_len"]


@pytest.mark.parametrize(
    ("source", "ref_tail", "reason"),
    [
        (None, "short", "no such file"),
        ("def long(**kw):\n    return []\n", "short", "has no 'short' (it defines: long)"),
        ("short = 3\n", "short", "is a int, not a function"),
        ("def short(:\n", "short", "SyntaxError"),
        ("import not_a_module_anywhere\n", "short", "ModuleNotFoundError: No module named 'not_a_module_anywhere' "
                                                    "(rewards.py line 1)"),
    ],
)
def test_what_cannot_be_imported_is_one_line(tmp_path, source, ref_tail, reason):
    path = tmp_path / "rewards.py"
    if source is not None:
        path.write_text(source)
    status, message = user.load(f"{path}:{ref_tail}", {})
    assert status == "load_error" and reason in message and "\n" not in message


def test_a_raise_is_described_with_the_line_of_the_users_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text("def helper(x):\n    return int(x)\n\ndef bad(completions, **kw):\n    return [helper(c) for c in completions]\n")
    functions = {}
    user.load(f"{path}:bad", functions)
    status, error, where = user.call(functions[f"{path}:bad"], {"completions": ["7", "seven"]})
    assert (status, where) == ("raised", "rewards.py line 2")
    assert error == "ValueError: invalid literal for int() with base 10: 'seven'"


@pytest.mark.parametrize(
    ("result", "reply"),
    [
        ([1, 0.5, None, True], ["ok", [1.0, 0.5, None, 1.0]]),
        ((np.float32(0.25), np.int64(2)), ["ok", [0.25, 2.0]]),
        (torch.tensor([0.5, 1.5]), ["ok", [0.5, 1.5]]),
        (["0.5", [1]], ["ok", [{"bad": "'0.5'", "type": "str"}, {"bad": "[1]", "type": "list"}]]),
        (0.5, ["not_a_list", "float"]),
        ("1.0", ["not_a_list", "str"]),
        ({"a": 1}, ["not_a_list", "dict"]),
        (None, ["not_a_list", "NoneType"]),
    ],
)
def test_coerce(result, reply):
    assert user.coerce(result) == reply


def test_coerce_leaves_judging_non_finite_values_to_the_caller():
    status, (value,) = user.coerce([float("nan")])
    assert status == "ok" and math.isnan(value)
