"""Graceful stop: the first SIGTERM/SIGINT raises a flag, a second one interrupts at once, handlers are restored."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nested_reft.stopping import EXIT_SIGINT, EXIT_SIGTERM, GracefulStop, TrainingStopped, exit_code


def wait_for(condition, timeout_s=5.0):
    """Signal handlers run between bytecodes of the main thread: give them a moment."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_first_signal_only_requests_a_stop(signum, code):
    seen = []
    with GracefulStop(on_request=seen.append) as stop:
        assert stop.installed and not stop.requested and stop.exit_code is None
        os.kill(os.getpid(), signum)
        assert wait_for(lambda: stop.requested)
        assert stop.signum == signum and stop.exit_code == code and seen == [signum]
        time.sleep(0.05)  # still running: nothing was raised


def test_second_signal_interrupts_at_once():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: stop.requested)
        with pytest.raises(KeyboardInterrupt, match="received twice"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted long before this ends
    assert stop.signum == signal.SIGTERM  # the first signal decides the exit code


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
    assert (EXIT_SIGINT, EXIT_SIGTERM, exit_code(signal.SIGKILL)) == (130, 143, 137)
    stopped = TrainingStopped(7, tmp_path / "checkpoints" / "step-7", signal.SIGTERM)
    assert stopped.exit_code == 143 and stopped.step == 7
    assert str(stopped) == f"stopped by SIGTERM after step 7; checkpoint {tmp_path / 'checkpoints' / 'step-7'}"
    assert "SIGINT (Ctrl-C)" in str(TrainingStopped(1, None, signal.SIGINT))


LOOP = textwrap.dedent("""
    import sys, time
    from nested_reft.stopping import GracefulStop, TrainingStopped
    with GracefulStop() as stop:
        for step in range(1, 1000):
            print(f"start {step}", flush=True)
            time.sleep(0.3)  # the step's work
            print(f"done {step}", flush=True)
            if stop.requested:
                print(f"checkpoint {step}", flush=True)
                error = TrainingStopped(step, None, stop.signum)
                print(error, flush=True)
                sys.exit(error.exit_code)
""")


def start_loop():
    child = subprocess.Popen([sys.executable, "-c", LOOP], stdout=subprocess.PIPE, text=True,
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
    child = start_loop()
    child.send_signal(signal.SIGINT)
    time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=30)
    assert child.returncode != 0 and "checkpoint" not in out and "done 1" not in out
