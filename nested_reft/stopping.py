"""Stopping a run on request: SIGTERM (a scheduler, a preempted machine), SIGUSR1 (SLURM's early warning,
`--signal=USR1@SECONDS`) or Ctrl-C, on one process or every rank of a torchrun job.

The first signal only raises a flag. The training loop polls it at safe points inside the step (the decode loop,
between micro-batches) and, at points where every rank calls in (`StopCheck.check`), the ranks agree:

- a request that arrives before the step's update is complete abandons the step (no weight has changed yet;
  `StepAbandoned`): the loop puts back what the step had drawn (prompts, skip set, RNG) and checkpoints the last
  finished step. So a stop costs the time to reach the next safe point plus one checkpoint, not a whole step;
- a request that arrives later lets the step finish, and checkpoints it.

Then every rank waits until rank 0 has written, and they all raise `TrainingStopped`, which the CLI turns into a
line saying how to resume and the exit code of the signal. Launchers deliver signals more than once: torchrun
forwards the signal it received to every worker, a terminal's Ctrl-C reaches torchrun and its workers alike, and
SLURM signals every task of a step. So repeats do not escalate: a second SIGTERM or SIGUSR1 is ignored (the stop
is already under way, and a scheduler's next word is SIGKILL anyway), and only a Ctrl-C pressed again after
`REPEAT_WINDOW_S` (a person insisting, not a launcher echoing) raises KeyboardInterrupt at once. Checkpoints are
written atomically, so even that leaves only complete checkpoints behind.

Exit codes follow the shell convention 128 + signal number, so a wrapper script or scheduler can tell a
requested stop, which is resumable, from a crash (1) or bad input (2):
    EXIT_SIGINT  = 130   Ctrl-C
    EXIT_SIGUSR1 = 138   SIGUSR1
    EXIT_SIGTERM = 143   SIGTERM
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGUSR1 = 128 + signal.SIGUSR1
EXIT_SIGTERM = 128 + signal.SIGTERM
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# A Ctrl-C within this many seconds of the first signal is the same request delivered twice (a terminal signals
# torchrun and its workers, and torchrun forwards it again); later, it is someone asking to stop at once.
REPEAT_WINDOW_S = 1.0


def exit_code(signum: int) -> int:
    """The exit code of a run stopped by signal `signum`: 128 + signum (130 Ctrl-C, 138 SIGUSR1, 143 SIGTERM)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    """'SIGTERM', 'SIGINT (Ctrl-C)', ..."""
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


class GracefulStop:
    """A context manager that turns the first stop signal into a request to stop at the next safe point.

    - `requested` is False until a signal arrives; `signum` is the first signal received (None before).
    - Repeats: SIGTERM and SIGUSR1 are ignored once a stop is requested; SIGINT raises KeyboardInterrupt in the
      main thread, at once, when it comes more than `repeat_window_s` after the first signal (see the module
      docstring).
    - `on_request(signum)` (optional) is called on the first signal, e.g. to tell the user what happens next.
      It runs inside the signal handler, in the main thread, so it must be short.
    - Handlers are installed only in the main thread (Python only lets that thread set them; elsewhere the
      context manager does nothing and `installed` is False) and the previous ones are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, on_request: Callable[[int], None] | None = None,
                 repeat_window_s: float = REPEAT_WINDOW_S):
        self.signals = signals
        self.on_request = on_request
        self.repeat_window_s = repeat_window_s
        self.signum: int | None = None
        self.installed = False
        self._first_at = 0.0
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
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if self.on_request is not None:
                self.on_request(signum)
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > self.repeat_window_s:
            raise KeyboardInterrupt(f"{signal_name(signum)} received twice: stopping at once")


class StepAbandoned(Exception):
    """Every rank agreed to stop before the step's update was complete: no weight has changed, and the step is
    to be rerun after a resume. `signum` is the agreed signal."""

    def __init__(self, signum: int):
        super().__init__(f"step abandoned on {signal_name(signum)}")
        self.signum = signum


class StopCheck:
    """Where the training loop asks whether to stop: `local()` is this rank's flag (free: no device sync, no
    collective), for loops that may cut their work short; `agreed()` and `check()` are collectives that every
    rank calls at the same point, so that all of them stop, or none."""

    def __init__(self, stop: GracefulStop | None, world: Any):
        self.stop, self.world = stop, world

    def local(self) -> bool:
        return self.stop is not None and self.stop.requested

    def agreed(self) -> int:
        """The signal that stops every rank (the largest number any rank received), or 0 to go on."""
        mine = self.stop.signum if self.local() else 0
        return int(self.world.max(mine)[0])

    def check(self) -> None:
        """Raise `StepAbandoned` on every rank when any rank was asked to stop."""
        if signum := self.agreed():
            raise StepAbandoned(signum)


class TrainingStopped(Exception):
    """The training loop stopped on request with `step` as its last finished step, checkpointed at `checkpoint`
    (`abandoned`: the step that was cut short, to be rerun on resume); or, with `step` None, it was interrupted
    at once (a second Ctrl-C) and `checkpoint` is the latest complete one.

    `exit_code` is 128 + the signal number; the CLI prints the message with how to resume and exits with it.
    """

    def __init__(self, step: int | None, checkpoint: Path | None, signum: int = signal.SIGTERM,
                 abandoned: int | None = None):
        self.step, self.checkpoint, self.signum, self.abandoned = step, checkpoint, signum, abandoned
        self.exit_code = exit_code(signum)
        if step is None:
            where = f"the latest complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint yet"
            message = f"interrupted by {signal_name(signum)}; {where}"
        else:
            where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint"
            when = f"after step {step}"
            if abandoned is not None:
                when = f"during step {abandoned} (abandoned: it is rerun on resume), after step {step}"
            message = f"stopped by {signal_name(signum)} {when}; {where}"
        super().__init__(message)
