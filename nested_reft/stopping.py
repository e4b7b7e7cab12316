"""Stopping a run on request: SIGTERM (a scheduler, a preempted machine) or Ctrl-C.

The first signal only raises a flag: the training loop finishes the step it is on, writes a checkpoint, and
ends with `TrainingStopped`, which the CLI turns into a line saying how to resume and the exit code of the
signal. A second signal raises KeyboardInterrupt at once (checkpoints are written atomically, so stopping
even in the middle of one leaves only complete checkpoints behind).

Exit codes follow the shell convention 128 + signal number, so a wrapper script or scheduler can tell a
requested stop, which is resumable, from a crash (1) or bad input (2):
    EXIT_SIGINT  = 130   Ctrl-C
    EXIT_SIGTERM = 143   SIGTERM

Wiring, in the loop: `with GracefulStop() as stop:` around it, and after each step
`if stop.requested: <checkpoint>; raise TrainingStopped(step, checkpoint, stop.signum)`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


def exit_code(signum: int) -> int:
    """The exit code of a run stopped by signal `signum`: 128 + signum (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    """'SIGTERM', 'SIGINT (Ctrl-C)', ..."""
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


class GracefulStop:
    """A context manager that turns the first SIGINT/SIGTERM into a request to stop at the next safe point.

    - `requested` is False until a signal arrives; `signum` is the first signal received (None before).
    - A second signal (either kind) raises KeyboardInterrupt in the main thread, at once.
    - `on_request(signum)` (optional) is called on the first signal, e.g. to tell the user what happens next.
      It runs inside the signal handler, in the main thread, so it must be short.
    - Handlers are installed only in the main thread (Python only lets that thread set them; elsewhere the
      context manager does nothing and `installed` is False) and the previous ones are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                 on_request: Callable[[int], None] | None = None):
        self.signals = signals
        self.on_request = on_request
        self.signum: int | None = None
        self.installed = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int | None:
        """128 + the first signal's number, or None when none arrived."""
        return None if self.signum is None else exit_code(self.signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if `signum` had arrived (for callers that learn of a stop some other way)."""
        self._handle(signum, None)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default action is the safe restore.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"{signal_name(signum)} received twice: stopping at once")
        self.signum = signum
        if self.on_request is not None:
            self.on_request(signum)


class TrainingStopped(Exception):
    """The training loop stopped on request after checkpointing `step` (at `checkpoint`); or, with `step`
    None, it was interrupted at once (a second signal) and `checkpoint` is the latest complete one.

    `exit_code` is 128 + the signal number; the CLI prints the message with how to resume and exits with it.
    """

    def __init__(self, step: int | None, checkpoint: Path | None, signum: int = signal.SIGTERM):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        self.exit_code = exit_code(signum)
        if step is None:
            where = f"the latest complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint yet"
            message = f"interrupted by {signal_name(signum)}; {where}"
        else:
            where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint"
            message = f"stopped by {signal_name(signum)} after step {step}; {where}"
        super().__init__(message)
