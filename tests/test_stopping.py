"""Graceful stop: the first SIGTERM/SIGINT/SIGUSR1 raises a flag; repeats from launchers do not escalate, a Ctrl-C
pressed again later interrupts at once; handlers are restored; ranks agree on when and how to stop."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nested_reft.distributed import World
from nested_reft.stopping import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SIGUSR1,
    REPEAT_WINDOW_S,
    GracefulStop,
    StepAbandoned,
    StopCheck,
    TrainingStopped,
    exit_code,
)


def wait_for(condition, timeout_s=5.0):
    """Signal handlers run between bytecodes of the main thread: give them a moment."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)],
                         ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_first_signal_only_requests_a_stop(signum, code):
    seen = []
    with GracefulStop(on_request=seen.append) as stop:
        assert stop.installed and not stop.requested and stop.exit_code is None
        os.kill(os.getpid(), signum)
        assert wait_for(lambda: stop.requested)
        assert stop.signum == signum and stop.exit_code == code and seen == [signum]
        time.sleep(0.05)  # still running: nothing was raised


def test_a_later_ctrl_c_interrupts_at_once():
    with GracefulStop(repeat_window_s=0.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: stop.requested)
        with pytest.raises(KeyboardInterrupt, match="received twice"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted long before this ends
    assert stop.signum == signal.SIGTERM  # the first signal decides the exit code


@pytest.mark.parametrize("repeat", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=["SIGTERM", "SIGUSR1", "SIGINT"])
def test_repeats_from_launchers_do_not_escalate(repeat):
    """torchrun forwards the signal it got to workers that got it too; SLURM signals every task. A repeated SIGTERM
    or SIGUSR1 never interrupts; a Ctrl-C within the repeat window is the same request delivered twice."""
    seen = []
    with GracefulStop(on_request=seen.append, repeat_window_s=60.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: stop.requested)
        for _ in range(3):
            os.kill(os.getpid(), repeat)
        time.sleep(0.1)  # a KeyboardInterrupt would have been raised by now
    assert seen == [signal.SIGTERM] and stop.exit_code == 143


def test_ranks_agree_on_the_signal_that_stops_them():
    """StopCheck in a world of one: the local flag, the agreed signal (0: go on), and the abandon."""
    stop = GracefulStop()
    check = StopCheck(stop, World())
    assert not check.local() and check.agreed() == 0
    check.check()  # nothing raised
    stop.request(signal.SIGUSR1)
    assert check.local() and check.agreed() == signal.SIGUSR1
    with pytest.raises(StepAbandoned) as abandoned:
        check.check()
    assert abandoned.value.signum == signal.SIGUSR1
    assert not StopCheck(None, World()).local() and StopCheck(None, World()).agreed() == 0


def test_previous_handlers_are_restored():
    calls = []

    def mine(signum, frame):
        calls.append(signum)

    original = signal.signal(signal.SIGTERM, mine)
    try:
        with GracefulStop():
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: calls == [signal.SIGTERM])
    finally:
        signal.signal(signal.SIGTERM, original)


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    states = []

    def body():
        with GracefulStop() as stop:
            states.append((stop.installed, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert states == [(False, before)]


def test_exit_codes_and_the_stopped_message(tmp_path):
    assert (EXIT_SIGINT, EXIT_SIGUSR1, EXIT_SIGTERM, exit_code(signal.SIGKILL)) == (130, 138, 143, 137)
    stopped = TrainingStopped(7, tmp_path / "checkpoints" / "step-7", signal.SIGTERM)
    assert stopped.exit_code == 143 and stopped.step == 7
    assert str(stopped) == f"stopped by SIGTERM after step 7; checkpoint {tmp_path / 'checkpoints' / 'step-7'}"
    assert "SIGINT (Ctrl-C)" in str(TrainingStopped(1, None, signal.SIGINT))
    abandoned = TrainingStopped(6, tmp_path / "step-6", signal.SIGUSR1, abandoned=7)
    assert abandoned.exit_code == 138 and str(abandoned) == (
        f"stopped by SIGUSR1 during step 7 (abandoned: it is rerun on resume), after step 6; checkpoint "
        f"{tmp_path / 'step-6'}")


LOOP = textwrap.dedent("""
    import sys, time
    from nested_reft.stopping import GracefulStop, TrainingStopped
    with GracefulStop() as stop:
        for step in range(1, 1000):
            print(f"start {step}", flush=True)
            time.sleep(float(sys.argv[1]))  # the step's work
            print(f"done {step}", flush=True)
            if stop.requested:
                print(f"checkpoint {step}", flush=True)
                error = TrainingStopped(step, None, stop.signum)
                print(error, flush=True)
                sys.exit(error.exit_code)
""")


def start_loop(step_s=0.3):
    child = subprocess.Popen([sys.executable, "-c", LOOP, str(step_s)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout.readline() == "start 1\n"
    return child


def test_sigterm_to_a_process_finishes_the_step_then_exits_143():
    child = start_loop()
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 143
    lines = out.splitlines()
    assert lines[0] == "done 1" and lines[1] == "checkpoint 1" and "stopped by SIGTERM after step 1" in lines[2]


def test_second_ctrl_c_to_a_process_stops_it_at_once():
    child = start_loop(step_s=REPEAT_WINDOW_S + 5)
    child.send_signal(signal.SIGINT)
    time.sleep(REPEAT_WINDOW_S + 0.3)
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=30)
    assert child.returncode != 0 and "checkpoint" not in out and "done 1" not in out
