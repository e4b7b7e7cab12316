"""A run's reward functions: the weighted sum, TRL's calling convention, columns, and every fault in one line."""

import textwrap
from pathlib import Path

import pytest

from nested_reft.data import Example
from nested_reft.errors import UserError
from nested_reft.recipe import load_recipe
from nested_reft.rewards import math_reward
from nested_reft.rewards.functions import Completions, RewardFunctions

FIXTURES = Path(__file__).parent / "fixtures" / "trl_rewards.py"


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    """Users' functions, well and badly behaved."""
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        import os, time

        def bonus(completions, **kwargs):
            return [None, 2.0, -1.0][: len(completions)]

        def uses_columns(prompts, completions, completion_ids, difficulty, step, id, answer, source, **kwargs):
            return [10.0 * d + step + len(p) + len(ids) for p, d, ids in zip(prompts, difficulty, completion_ids)]

        def scaled(completions, scale, **kwargs):
            return [scale * len(c) for c in completions]

        def fails_on_seven(completions, **kwargs):
            return [float(int(c)) for c in completions]

        def too_few(completions, **kwargs):
            return [1.0]

        def a_word(completions, **kwargs):
            return [1.0, "high", 0.0]

        def not_finite(completions, **kwargs):
            return [1.0, float("inf"), 0.0]

        def a_number(completions, **kwargs):
            return 1.0

        def hangs(completions, **kwargs):
            time.sleep(60)

        def exits(completions, **kwargs):
            os._exit(9)
    """))
    return path


def batch(texts, answers=("5", "5", "5"), columns=None, step=3):
    examples = [Example(f"ex-{i}", f"question {i}", a, "test", dict(columns[i]) if columns else {})
                for i, a in enumerate(answers)]
    return Completions(list(texts), [[1] * (i + 2) for i in range(len(texts))], examples, step, f"step {step}")


def functions(*specs, **reward):
    recipe = load_recipe(None, [f"reward.functions={list(specs)}", "rollout.max_completion_length=10",
                                *(f"reward.{k}={v}" for k, v in reward.items())])
    return RewardFunctions.from_config(recipe.reward, recipe.rollout.max_completion_length)


def test_the_reward_is_the_weighted_sum_and_none_counts_as_zero(user_file):
    rewards = functions({"name": "math"}, {"name": "format", "weight": 0.5}, {"name": f"{user_file}:bonus", "weight": 0.25})
    scores = rewards(batch(["#### 5", "so 5", "#### 4"]))
    assert scores.values == {"math": [1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0], "bonus": [None, 2.0, -1.0]}
    # 1 + 0.5 (+ nothing for None) | 0 + 0 + 0.25 * 2 | 0 + 0.5 + 0.25 * -1
    assert scores.total == [1.5, 0.5, 0.25]
    assert scores.correct == [True, False, False]  # by math, whatever the total


def test_without_math_a_completion_is_correct_when_its_total_reaches_the_threshold(user_file):
    scores = functions({"name": f"{user_file}:bonus"}, {"name": "format"}, correct_threshold=1.0)(batch(["a", "b", "c"]))
    assert scores.total == [0.0, 2.0, -1.0] and scores.correct == [False, True, False]


def test_a_recipe_without_functions_is_rewarded_as_before():
    """math weighted 1 plus format at format_weight: the same reward as the math reward with its format bonus."""
    texts = ["#### 5", "so 5", "#### 4", r"\boxed{5}", "The answer is 5.", "#### $"]
    recipe = load_recipe(None, ["reward.format_weight=0.1"])
    scores = RewardFunctions.from_config(recipe.reward, 128)(batch(texts, answers=["5"] * 6))
    assert scores.total == [math_reward(t, "5", format_weight=0.1).reward for t in texts]
    assert scores.correct == [math_reward(t, "5").reason == "correct" for t in texts]
    assert list(scores.values) == ["math", "format"]


def test_columns_prompts_ids_and_the_step_reach_the_function(user_file):
    rewards = functions({"name": f"{user_file}:uses_columns"})
    scores = rewards(batch(["a", "b", "c"], columns=[{"difficulty": 1}, {"difficulty": 2}, {"difficulty": 3}], step=4))
    # 10 * difficulty + step 4 + len("question i") 10 + completion length i + 2
    assert scores.values["uses_columns"] == [10 + 4 + 10 + 2, 20 + 4 + 10 + 3, 30 + 4 + 10 + 4]


def test_a_functions_own_parameters_are_passed_on_every_call(user_file):
    rewards = functions({"name": f"{user_file}:scaled", "scale": 0.5})
    assert rewards(batch(["ab", "abcd", ""])).values["scaled"] == [1.0, 2.0, 0.0]


def test_functions_from_trls_documentation_run_unchanged():
    rewards = functions({"name": f"{FIXTURES}:reward_len"}, {"name": f"{FIXTURES}:format_reward_func"},
                        {"name": f"{FIXTURES}:reward_func"})
    texts = ["x" * 20, "<think>hm</think><answer>4</answer>", r"so \boxed{5}"]
    scores = rewards(batch(texts, columns=[{"ground_truth": "1"}, {"ground_truth": "4"}, {"ground_truth": "5"}]))
    assert scores.values == {"reward_len": [0.0, -15.0, -8.0], "format_reward_func": [0.0, 1.0, 0.0],
                             "reward_func": [0.0, 0.0, 1.0]}


@pytest.mark.parametrize(
    ("name", "texts", "message"),
    [
        ("fails_on_seven", ["1", "seven", "3"], r"reward function 'fails_on_seven' \(.*my_rewards.py:fails_on_seven\) "
         r"raised ValueError: invalid literal for int\(\) with base 10: 'seven' \(my_rewards.py line 14\) on row 1 "
         r"\(example 'ex-1'\) at step 3$"),
        ("too_few", ["a", "b", "c"], r"'too_few' .* returned 1 values for 3 completions at step 3; expected a list of "
         r"3 numbers \(one per completion; None where it does not apply\)$"),
        ("a_word", ["a", "b", "c"], r"'a_word' .* returned 'high' \(str\) for row 1 \(example 'ex-1'\) at step 3; "
         r"expected a number, or None where it does not apply$"),
        ("not_finite", ["a", "b", "c"], r"'not_finite' .* returned inf for row 1 \(example 'ex-1'\) at step 3; "
         r"expected a finite number"),
        ("a_number", ["a", "b", "c"], r"'a_number' .* returned a float at step 3; expected a list of 3 numbers"),
        ("hangs", ["a", "b", "c"], r"'hangs' .* returned nothing within reward.timeout_s=1 s on the 3 completions of "
         r"step 3; its worker was stopped"),
        ("exits", ["a", "b", "c"], r"'exits' .* ended its worker process on the 3 completions of step 3: the reward "
         r"worker process exited \(exit code 9\)$"),
    ],
)
def test_every_fault_stops_with_one_line_naming_the_function_the_row_and_the_fault(user_file, name, texts, message):
    rewards = functions({"name": f"{user_file}:{name}"}, timeout_s=1.0)
    with pytest.raises(UserError, match=message) as error:
        rewards(batch(texts))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.py:f", r"reward.functions: cannot import .*missing.py:f: ImportError: .*missing.py: no such file$"),
        (f"{FIXTURES}:nope", r"cannot import .*: ImportError: .* has no 'nope' \(it defines: reward_len, "
                             r"format_reward_func, reward_func\)$"),
        ("not_a_package_anywhere.rewards:f", r"ModuleNotFoundError: No module named 'not_a_package_anywhere'$"),
    ],
)
def test_a_function_that_cannot_be_imported_fails_when_the_functions_are_built(name, message):
    with pytest.raises(UserError, match=message):
        functions({"name": name})


def test_two_functions_of_one_name_are_refused(user_file, tmp_path):
    other = tmp_path / "other.py"
    other.write_text("def bonus(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    with pytest.raises(UserError, match=r"are both named 'bonus'; their metrics \(rewards/bonus/mean\) need distinct"):
        functions({"name": f"{user_file}:bonus"}, {"name": f"{other}:bonus"})


def test_a_parameter_named_like_a_column_is_refused(user_file):
    rewards = functions({"name": f"{user_file}:scaled", "scale": 1.0, "difficulty": 2})
    with pytest.raises(UserError, match=r"'scaled' .*: parameter 'difficulty' is also a data column"):
        rewards(batch(["a", "b", "c"], columns=[{"difficulty": 1}] * 3))
