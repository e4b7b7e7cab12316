"""The reward worker processes: symbolic checks and users' functions, bounded in time, replaced when they fail."""

from __future__ import annotations

import sys
import textwrap
import threading
import time

import pytest

from nested_reft.rewards import workers
from nested_reft.rewards.workers import WorkerDied, WorkerPool

# Needs seconds of sympy work (expanding two degree-2000 polynomials), far past the timeouts used here.
SLOW_ANSWER, SLOW_GOLD = "(x+2)^{2000}", "(x+1)^{2000}"


@pytest.fixture
def pool():
    pool = WorkerPool(size=1)
    yield pool
    pool.close_idle()


@pytest.fixture
def user_file(tmp_path):
    """A file of users' reward functions that misbehave on purpose."""
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        import os, sys, time

        def half(completions, **kwargs):
            return [0.5 for _ in completions]

        def echo_kwargs(completions, **kwargs):
            return [float(len(kwargs))] * len(completions)

        def sleepy(completions, **kwargs):
            time.sleep(30)

        def dies(completions, **kwargs):
            os._exit(7)

        def reads_stdin(completions, **kwargs):
            print("stray output")
            return [float(len(sys.stdin.read()))] * len(completions)

        def big(completions, **kwargs):
            block = bytearray(3 * 1024**3)  # more than a symbolic check may take
            return [float(len(block) > 0)] * len(completions)
    """))
    return path


def test_busy_pool_reports_busy(pool):
    occupied = threading.Thread(target=pool.check, args=(SLOW_ANSWER, SLOW_GOLD, 1.5))
    occupied.start()
    time.sleep(0.2)  # let it take the only slot
    assert pool.check("x + 1", "1 + x", timeout_s=0.3) == "verifier_busy"
    occupied.join()
    assert pool.check("x + 1", "1 + x", timeout_s=5.0) == "correct"


@pytest.mark.parametrize(
    "worker_code",
    ["raise SystemExit(3)", "print('\"ready\"')"],  # dies at start-up; dies before answering
    ids=["dead-at-start", "dead-mid-request"],
)
def test_a_failing_worker_is_reported(monkeypatch, caplog, pool, worker_code):
    monkeypatch.setattr(workers, "WORKER_COMMAND", [sys.executable, "-c", worker_code])
    assert pool.check("x + 1", "1 + x", timeout_s=5.0) == "verify_error"
    assert "worker process failed" in caplog.text
    monkeypatch.undo()
    assert pool.check("x + 1", "1 + x", timeout_s=5.0) == "correct"  # the dead worker was replaced


def test_worker_start_up_does_not_count_against_the_timeout(monkeypatch, pool):
    """On a loaded machine a worker's start-up (importing sympy) can take longer than `timeout_s`; only the
    comparison itself is timed, so the check still gets its verdict. Start-up has its own bound."""
    startup_s, timeout_s = 2.0, 1.0
    slow_start = f"import time; time.sleep({startup_s}); from nested_reft.rewards.workers import _serve; _serve()"
    monkeypatch.setattr(workers, "WORKER_COMMAND", [sys.executable, "-c", slow_start])
    started = time.monotonic()
    assert pool.check("x + 1", "1 + x", timeout_s=timeout_s) == "correct"
    assert time.monotonic() - started >= startup_s
    assert pool.check(SLOW_ANSWER, SLOW_GOLD, timeout_s=0.3) == "timeout"  # the check itself is still bounded


def test_worker_start_up_has_its_own_bound(monkeypatch, caplog, pool):
    monkeypatch.setattr(workers, "WORKER_COMMAND", [sys.executable, "-c", "import time; time.sleep(30)"])
    monkeypatch.setattr(workers, "STARTUP_TIMEOUT_S", 0.5)
    started = time.monotonic()
    assert pool.check("x + 1", "1 + x", timeout_s=5.0) == "verify_error"
    assert time.monotonic() - started < 5.0 and "did not start within" in caplog.text


def test_a_users_function_is_loaded_once_and_called_with_keywords(pool, user_file):
    assert pool.load(f"{user_file}:half") == ["ok", "half"]
    assert pool.call(f"{user_file}:half", {"completions": ["a", "b"]}, 5.0) == ["ok", [0.5, 0.5]]
    reply = pool.call(f"{user_file}:echo_kwargs", {"completions": ["a"], "prompts": ["q"], "step": 3}, 5.0)
    assert reply == ["ok", [2.0]]  # prompts and step arrived as keywords


def test_an_unknown_function_is_a_load_error(pool, user_file):
    status, reason = pool.load(f"{user_file}:halve")
    assert status == "load_error" and "has no 'halve'" in reason and "half" in reason  # names what there is


def test_a_hanging_function_times_out_and_its_worker_is_replaced(pool, user_file):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        pool.call(f"{user_file}:sleepy", {"completions": ["a"]}, 1.0)
    assert time.monotonic() - started < 10.0
    assert pool.call(f"{user_file}:half", {"completions": ["a"]}, 5.0) == ["ok", [0.5]]


def test_a_function_that_ends_its_process_is_reported_with_the_exit_code(pool, user_file):
    with pytest.raises(WorkerDied, match="exit code 7"):
        pool.call(f"{user_file}:dies", {"completions": ["a"]}, 5.0)
    assert pool.call(f"{user_file}:half", {"completions": ["a"]}, 5.0) == ["ok", [0.5]]


def test_a_function_reading_stdin_or_printing_leaves_the_protocol_intact(pool, user_file):
    assert pool.call(f"{user_file}:reads_stdin", {"completions": ["a", "b"]}, 5.0) == ["ok", [0.0, 0.0]]
    assert pool.call(f"{user_file}:half", {"completions": ["a"]}, 5.0) == ["ok", [0.5]]


def test_the_symbolic_checks_memory_cap_does_not_bind_users_functions(pool, user_file):
    assert pool.check("x + 1", "1 + x", timeout_s=10.0) == "correct"  # the cap was set and lifted in this worker
    assert pool.call(f"{user_file}:big", {"completions": ["a"]}, 20.0) == ["ok", [1.0]]
