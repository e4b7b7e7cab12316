"""Math rewards: answer extraction, equivalence rules, gold parsing, and the never-raise/never-hang promise."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nested_reft.errors import UserError
from nested_reft.rewards import workers
from nested_reft.rewards.answers import (
    RewardResult,
    answers_match,
    extract_answer,
    math_reward,
    parse_gold_answer,
)

# Needs seconds of sympy work (expanding two degree-2000 polynomials), far past the timeouts used here.
SLOW_ANSWER, SLOW_GOLD = "(x+2)^{2000}", "(x+1)^{2000}"
SLACK_S = 10.0  # start-up of a replacement verifier process and a loaded CI machine

# (completion, gold, expected reward, expected reason), hand-checked. The fallback is off here.
CASES = [
    # GSM8K: the line after '####'
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18", 1.0, "correct"),
    ("#### 17", "18", 0.0, "wrong"),
    ("#### 1,000", "1000", 1.0, "correct"),
    ("#### 1000", "1,000", 1.0, "correct"),
    ("#### 1,000,000", "1000000", 1.0, "correct"),
    ("#### 1,001", "1000", 0.0, "wrong"),
    ("#### $18", "18", 1.0, "correct"),
    ("#### \\$18.00", "18", 1.0, "correct"),
    ("#### 18 dollars", "18", 1.0, "correct"),
    ("#### 5 apples.", "5", 1.0, "correct"),
    ("#### 12 cm", "12", 1.0, "correct"),
    ("#### 12 cm", "13", 0.0, "wrong"),
    ("#### 18%", "18", 1.0, "correct"),
    ("#### 0.5", "1/2", 1.0, "correct"),
    ("#### 0.1", "1/10", 1.0, "correct"),
    ("#### 0.333", "1/3", 0.0, "wrong"),  # exact comparison: a rounded decimal is not the fraction
    ("#### 2.50", "2.5", 1.0, "correct"),
    ("#### 2.51", "2.5", 0.0, "wrong"),
    ("#### 12", "12.0", 1.0, "correct"),
    ("#### 033", "33", 1.0, "correct"),
    ("#### -3", "-3", 1.0, "correct"),
    ("#### −3", "-3", 1.0, "correct"),  # unicode minus
    ("#### 3", "-3", 0.0, "wrong"),
    ("####\n 42", "42", 1.0, "correct"),
    ("#### 42\n\nQuestion: what is 6 + 1?\nAnswer: #### 7", "42", 1.0, "correct"),  # the first '####' counts
    ("#### 42 #### 7", "42", 1.0, "correct"),
    ("####", "5", 0.0, "no_answer"),
    ("#### $", "5", 0.0, "no_answer"),
    # MATH: the last closed \boxed{}
    (r"So $x = \boxed{\frac{1}{2}}$.", "0.5", 1.0, "correct"),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", 1.0, "correct"),
    (r"\boxed{\tfrac{1}{2}}", "0.5", 1.0, "correct"),
    (r"\boxed{\frac{1}{3}}", "0.33", 0.0, "wrong"),
    (r"$\boxed{-\frac{3}{4}}$", "-0.75", 1.0, "correct"),
    (r"\boxed{\frac{-3}{4}}", r"-\frac{3}{4}", 1.0, "correct"),
    (r"\boxed{−\frac{1}{2}}", "-0.5", 1.0, "correct"),
    (r"\boxed{\frac{7}{2}}", "3.5", 1.0, "correct"),
    (r"\boxed{ 7 }", "7", 1.0, "correct"),
    (r"\boxed{\frac{\sqrt{8}}{2}}", r"\sqrt{2}", 1.0, "correct"),  # nested braces, symbolic
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0, "wrong"),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}", 1.0, "correct"),
    (r"\boxed{\frac{\pi}{2}}", r"\dfrac{\pi}{2}", 1.0, "correct"),
    (r"First \boxed{3}, then finally \boxed{4}.", "4", 1.0, "correct"),  # the last \boxed wins
    (r"First \boxed{3}, then finally \boxed{4}.", "3", 0.0, "wrong"),
    (r"\fbox{7}", "7", 1.0, "correct"),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", 1.0, "correct"),
    (r"\boxed{\text{Evelyn}}", r"\text{Devon}", 0.0, "wrong"),
    (r"\boxed{\mathrm{12}}", "12", 1.0, "correct"),
    (r"\boxed{5\text{ apples}}", "5", 1.0, "correct"),
    (r"\boxed{\left(3, \frac{\pi}{2}\right)}", r"(3, \frac{\pi}{2})", 1.0, "correct"),
    (r"\boxed{(3, \frac{\pi}{3})}", r"(3, \frac{\pi}{2})", 0.0, "wrong"),
    (r"\boxed{90^\circ}", "90", 1.0, "correct"),
    (r"\boxed{90^{\circ}}", "45", 0.0, "wrong"),
    (r"\boxed{50\%}", "50", 1.0, "correct"),
    (r"\boxed{10{,}000}", "10000", 1.0, "correct"),
    (r"\boxed{x = 5}", "5", 1.0, "correct"),
    (r"\boxed{2x + 3}", "3 + 2x", 1.0, "correct"),
    (r"\boxed{2x + 3}", "2x - 3", 0.0, "wrong"),
    (r"\boxed{(-\infty, 3)}", r"(-\infty, 3]", 0.0, "wrong"),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}", 1.0, "correct"),
    (r"\boxed{\frac{1}{2}", "0.5", 0.0, "no_answer"),  # never closed: truncated output
    (r"\boxed{5} and then \boxed{6", "5", 0.0, "no_answer"),  # the last one is unclosed
    (r"\boxed{}", "7", 0.0, "no_answer"),
    # "The answer is ..."
    ("The answer is 42.", "42", 1.0, "correct"),
    ("So the final answer is: 3.5.", "3.5", 1.0, "correct"),
    ("the answer is 41", "42", 0.0, "wrong"),
    (r"The answer is $\frac{3}{4}$.", "0.75", 1.0, "correct"),
    ("I think the answer is 7.\nNo, the answer is 8.", "8", 1.0, "correct"),
    # markers take precedence: '####' over \boxed over "the answer is"
    ("#### 5\n" r"Earlier I wrote \boxed{6}.", "5", 1.0, "correct"),
    (r"\boxed{6}. The answer is 7.", "6", 1.0, "correct"),
    # no answer at all
    ("I don't know.", "42", 0.0, "no_answer"),
    ("", "42", 0.0, "no_answer"),
    ("She had 5 apples and then 7.", "7", 0.0, "no_answer"),  # numbers, but the fallback is off
]


@pytest.mark.parametrize(("completion", "gold", "reward", "reason"), CASES)
def test_math_reward_table(completion, gold, reward, reason):
    result = math_reward(completion, gold)
    assert (result.reward, result.reason) == (reward, reason)
    if reason != "no_answer":
        assert answers_match(result.predicted, gold) == (reason == "correct")


@pytest.mark.parametrize(
    ("completion", "gold", "reward_with_fallback"),
    [
        ("She had 5 apples and then 7.", "7", 1.0),
        ("She had 5 apples and then 7.", "5", 0.0),
        ("Total: 1,250 dollars", "1250", 1.0),
        ("It is -4 degrees outside", "-4", 1.0),
        ("no numbers here", "4", 0.0),
    ],
)
def test_last_number_fallback(completion, gold, reward_with_fallback):
    assert math_reward(completion, gold).reward == 0.0
    assert math_reward(completion, gold, last_number_fallback=True).reward == reward_with_fallback


def test_numbers_never_reach_the_symbolic_verifier(monkeypatch):
    def refuse(*args):
        raise AssertionError("the symbolic verifier was called")

    monkeypatch.setattr(workers.pool(), "check", refuse)
    for completion, gold, reason in [
        ("#### 1,000", "1000", "correct"),
        ("#### 7", "8", "wrong"),
        (r"\boxed{\dfrac12}", "0.5", "correct"),
        (r"\boxed{-\frac{3}{4}}", "0.75", "wrong"),
        ("#### $18.00", "18", "correct"),
    ]:
        assert math_reward(completion, gold).reason == reason


def test_markers_beat_the_last_number_fallback():
    assert extract_answer("#### 3\nand then 9", last_number_fallback=True) == "3"
    assert extract_answer(r"\boxed{3} and then 9", last_number_fallback=True) == "3"


def test_extract_answer_returns_the_raw_answer():
    assert extract_answer("so\n#### $1,000 dollars.\n") == "$1,000 dollars."
    assert extract_answer(r"\boxed{\frac{a}{\sqrt{b^{2}}}}") == r"\frac{a}{\sqrt{b^{2}}}"
    assert extract_answer("The answer is 3.5 dollars. Next") == "3.5 dollars"
    assert extract_answer("nothing") is None


@pytest.mark.parametrize(
    ("completion", "gold", "reward"),
    [
        ("#### 5", "5", 1.25),
        ("#### 4", "5", 0.25),
        (r"\boxed{5}", "5", 1.25),
        ("The answer is 5.", "5", 1.0),  # correct, but no final-answer marker
        (r"\boxed{5", "5", 0.0),  # an unclosed \boxed is not well formed
        ("#### $", "5", 0.0),
    ],
)
def test_format_bonus(completion, gold, reward):
    assert math_reward(completion, gold, format_weight=0.25).reward == reward


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="timeout_s"):
        math_reward("#### 1", "1", timeout_s=0)
    with pytest.raises(ValueError, match="format_weight"):
        math_reward("#### 1", "1", format_weight=-0.1)


def test_internal_errors_are_reported_not_raised(caplog):
    result = math_reward(None, "5")  # type: ignore[arg-type]
    assert result == RewardResult(reward=0.0, predicted=None, reason="reward_error")
    assert "math_reward failed" in caplog.text


def test_symbolic_check_times_out_in_a_thread():
    """math-verify's own timeout needs the main thread's signals; ours must bound worker threads too."""
    timeout_s = 0.5
    assert math_reward(r"\boxed{x + 1}", "1 + x").reason == "correct"  # a started worker: time the check alone
    results: list[tuple[RewardResult, float]] = []

    def score() -> None:
        started = time.monotonic()
        result = math_reward(f"\\boxed{{{SLOW_ANSWER}}}", SLOW_GOLD, timeout_s=timeout_s)
        results.append((result, time.monotonic() - started))

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=timeout_s + SLACK_S)
    assert not thread.is_alive()
    (result, elapsed), = results
    assert (result.reward, result.reason) == (0.0, "timeout")
    assert timeout_s <= elapsed < timeout_s + SLACK_S
    # The stuck worker was replaced: the next symbolic check still gets a verdict.
    assert math_reward(r"\boxed{\frac{\sqrt{8}}{2}}", r"\sqrt{2}").reason == "correct"


THREAD_CASES = [
    (r"\boxed{\frac{\sqrt{8}}{2}}", r"\sqrt{2}"),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}"),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}"),
    (r"\boxed{2x + 3}", "3 + 2x"),
    ("#### 1,000", "1000"),
    ("#### 7", "8"),
    ("nothing", "1"),
]


def test_threads_give_the_same_results_as_the_main_thread():
    expected = [math_reward(c, g) for c, g in THREAD_CASES]
    assert expected[0].reason == "correct"  # the symbolic case really is symbolic and really passes
    with ThreadPoolExecutor(max_workers=4) as executor:
        pooled = list(executor.map(lambda case: math_reward(*case), THREAD_CASES))
    assert pooled == expected
    in_thread: list[RewardResult] = []
    thread = threading.Thread(target=lambda: in_thread.extend(math_reward(c, g) for c, g in THREAD_CASES))
    thread.start()
    thread.join()
    assert in_thread == expected


@pytest.mark.parametrize(
    ("solution", "answer_format", "gold"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "gsm8k", "72"),
        ("So she has 1234 left.\n#### 1,234", "gsm8k", "1234"),
        ("#### $5", "gsm8k", "5"),
        ("#### -0.5", "gsm8k", "-0.5"),
        ("She has 72 clips.", "gsm8k", None),  # no '####'
        ("#### ", "gsm8k", None),
        ("#### five", "gsm8k", None),  # GSM8K answers are numbers
        ("", "gsm8k", None),
        (r"Hence the ratio is $\boxed{\dfrac{14}{3}}$.", "boxed", r"\frac{14}{3}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", "boxed", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{1} or rather \boxed{2}", "boxed", "2"),
        (r"\boxed{\text{Evelyn}}", "boxed", "Evelyn"),
        (r"\boxed{\left(3, \frac{\pi}{2}\right)}", "boxed", r"(3, \frac{\pi}{2})"),
        ("The ratio is 14/3.", "boxed", None),  # no \boxed
        (r"\boxed{\frac{14}{3}", "boxed", None),  # unbalanced braces
        (r"\boxed{}", "boxed", None),
        (" 42 ", "plain", "42"),
        ("42.0", "plain", "42.0"),
        (r"\frac{1}{2}", "plain", r"\frac{1}{2}"),
        ("1,000 dollars", "plain", "1000"),
        ("", "plain", None),
        ("   ", "plain", None),
        ("{1, 2", "plain", None),
        ("1, 2}", "plain", None),
        ("Natalia sold 48 clips in April and half as many clips in May.", "plain", None),  # a sentence
        ("1+" * 200 + "1", "plain", None),  # longer than any answer
    ],
)
def test_parse_gold_answer(solution, answer_format, gold):
    assert parse_gold_answer(solution, answer_format) == gold


def test_parse_gold_answer_rejects_unknown_formats():
    with pytest.raises(UserError, match="answer_format.*'latex'"):
        parse_gold_answer("42", "latex")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parsed_gold_answers_are_stable(text):
    """A prepared data set can be prepared again ("plain") without its answers changing."""
    gold = parse_gold_answer(text, "plain")
    if gold is not None:
        assert parse_gold_answer(gold, "plain") == gold


TIMEOUT_S = 1.0
_fragment = st.text(max_size=40)
_completions = st.one_of(
    st.text(),
    st.builds(lambda a, b: a + "####" + b, _fragment, _fragment),
    st.builds(lambda a, b: a + "\\boxed{" + b, _fragment, _fragment),
    st.builds(lambda n, a, b: a + "\\boxed" + "{" * n + b + "}" * (n // 2), st.integers(0, 50), _fragment, _fragment),
    st.builds(lambda n, a: "{" * n + a, st.integers(0, 200), _fragment),
    st.builds(lambda a: "The answer is " + a, _fragment),
)


@settings(max_examples=150, deadline=None)
@given(
    completion=_completions,
    gold=st.one_of(st.sampled_from(["42", "-3", r"\frac{1}{2}", r"\sqrt{2}", "(1, 2)", "x + 1"]), _fragment),
    last_number_fallback=st.booleans(),
    format_weight=st.sampled_from([0.0, 0.25]),
)
def test_math_reward_never_raises_or_hangs(completion, gold, last_number_fallback, format_weight):
    started = time.monotonic()
    result = math_reward(
        completion, gold, last_number_fallback=last_number_fallback, format_weight=format_weight, timeout_s=TIMEOUT_S
    )
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    assert isinstance(result, RewardResult)
    assert result.reward in {0.0, 1.0, format_weight, 1.0 + format_weight}
    # Every reason but "reward_error" (a bug in this module) and "verifier_busy" (no concurrency here).
    assert result.reason in {"correct", "wrong", "no_answer", "bad_gold", "timeout", "verify_error"}
    assert (result.reward >= 1.0) == (result.reason == "correct")
