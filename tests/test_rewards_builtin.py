"""The built-in reward functions, against hand-computed values."""

import pytest

from nested_reft.errors import UserError
from nested_reft.rewards.builtin import (
    BUILTINS,
    Context,
    length_penalty,
    repetition_penalty,
    soft_overlong_penalty,
)


@pytest.mark.parametrize(
    ("length", "expected"),
    # max_length 10, cache 4: free up to 10 - 4 = 6 tokens, then -1/4 per token down to -1 at 10, and -1 past it.
    [(0, 0.0), (5, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (9, -0.75), (10, -1.0), (11, -1.0), (40, -1.0)],
)
def test_soft_overlong_penalty_is_dapos(length, expected):
    assert soft_overlong_penalty(length, max_length=10, cache=4) == expected


@pytest.mark.parametrize(
    ("length", "expected"),
    # free 2, max_length 10: -(n - 2) / 8 between them, 0 below, -1 from 10 on.
    [(0, 0.0), (2, 0.0), (3, -0.125), (4, -0.25), (6, -0.5), (10, -1.0), (12, -1.0)],
)
def test_length_penalty(length, expected):
    assert length_penalty(length, max_length=10, free=2) == expected


@pytest.mark.parametrize(
    ("ids", "ngram_size", "expected"),
    [
        ([1, 2, 3, 4, 5], 3, 0.0),  # 3 trigrams, all distinct
        ([1, 2, 3, 1, 2, 3], 3, -0.25),  # (1,2,3) (2,3,1) (3,1,2) (1,2,3): 3 distinct of 4
        ([7, 7, 7, 7, 7], 2, -0.75),  # 4 bigrams, 1 distinct
        ([7, 7, 7, 7, 7], 1, -0.8),  # 5 unigrams, 1 distinct
        ([1, 2], 3, 0.0),  # shorter than an n-gram
        ([], 1, 0.0),
    ],
)
def test_repetition_penalty(ids, ngram_size, expected):
    assert repetition_penalty(ids, ngram_size) == pytest.approx(expected)


def build(name, **params):
    return BUILTINS[name].build(params, Context(max_completion_length=10))


def test_builtins_take_trls_arguments_and_return_one_value_per_completion():
    completions = ["#### 5", "so 5", r"\boxed{4}", "#### $"]
    ids = [[1] * 3, [1] * 7, [1, 2, 1, 2, 1, 2], [1] * 10]
    kwargs = {"prompts": ["q"] * 4, "completions": completions, "completion_ids": ids, "answer": ["5"] * 4,
              "step": 1, "id": ["a"] * 4, "source": ["s"] * 4}
    assert build("math")(**kwargs) == [1.0, 0.0, 0.0, 0.0]
    assert build("format")(**kwargs) == [1.0, 0.0, 1.0, 0.0]  # "#### $" marks nothing once normalised
    # max_length defaults to the completion limit (10): free up to 6 tokens.
    assert build("soft_overlong", cache=4)(**kwargs) == [0.0, -0.25, 0.0, -1.0]
    assert build("soft_overlong", cache=2, max_length=8)(**kwargs) == [0.0, -0.5, 0.0, -1.0]  # 7 tokens: (6 - 7) / 2
    assert build("length", free=2)(**kwargs) == [-0.125, -0.625, -0.5, -1.0]
    assert build("repetition", ngram_size=2)(**kwargs) == pytest.approx([-0.5, -5 / 6, -0.6, -8 / 9])


def test_settings_that_do_not_fit_the_completion_limit_are_user_errors():
    with pytest.raises(UserError, match=r"soft_overlong: cache \(12\) must be at most max_length \(10, the completion"):
        build("soft_overlong", cache=12)
    with pytest.raises(UserError, match=r"length: free \(10\) must be below max_length \(10"):
        build("length", free=10)
