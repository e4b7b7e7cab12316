"""The reward worker processes: where symbolic math checks and users' reward functions run.

A small pool of plain Python processes, each answering one JSON-line request at a time on its stdin. Work runs
there rather than in the trainer for two reasons. math-verify's own timeout relies on `signal.alarm`, which fails
outside the main thread, and a runaway sympy call inside a thread could never be stopped. A user's reward function
may raise, hang or crash its interpreter: in a worker a hang costs a kill and a crash an exit code, and the trainer
lives on to say so in one line. A worker that overruns its time budget is killed and replaced, so a call never
hangs and a stuck computation never outlives its call.

Requests and their replies, one JSON line each:

    ["verify", predicted, gold] -> ["ok", equal] | ["error", exception name]
    ["load", ref]               -> ["ok", function name] | ["load_error", reason]       (see `rewards.user`)
    ["call", ref, kwargs]       -> ["ok", values] | ["not_a_list", type] | ["raised", error, where]

A worker loads a user's function once, on its first call there; loading has the start-up's bound, not the
call's, so a module that takes seconds to import does not count against `reward.timeout_s`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0  # importing sympy and math-verify takes about a second; this allows a loaded machine
_POOL_SIZE = min(4, os.cpu_count() or 1)  # most answers are numbers and never reach the pool
# sympy can build numbers of any size ("2^{2^{40}}" grows by ~100 MB/s); past this much more address space than
# the worker held before the check, a check gets MemoryError. Users' functions run without this cap.
_CHECK_MEMORY_BYTES = 2 * 1024**3
# A plain interpreter running `_serve`, rather than multiprocessing: it does not re-run the caller's
# __main__ (which breaks scripts without a main guard), and it works inside daemonic processes too.
WORKER_COMMAND = [sys.executable, "-c", "from nested_reft.rewards.workers import _serve; _serve()"]


class WorkerDied(RuntimeError):
    """The worker process exited (or closed its output) before it replied."""


class _Worker:
    """One worker process (see `_serve`), talking JSON lines over its stdin and stdout; one user at a time."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        self.loaded: dict[str, str] = {}  # ref -> name of each user's function this process has imported
        self._process = subprocess.Popen(
            WORKER_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": pythonpath}
        )
        try:
            ready = self._read_reply(STARTUP_TIMEOUT_S) == "ready"
        except (TimeoutError, WorkerDied, ValueError):
            ready = False
        if not ready:
            self.close()
            raise RuntimeError(f"the reward worker process did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def ask(self, request: list, timeout_s: float) -> Any:
        """Send one request; return its reply. Raises TimeoutError when no reply arrives within `timeout_s` and
        WorkerDied when the process is gone; either way the caller must then close it."""
        try:
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            raise WorkerDied(f"the reward worker process exited (exit code {self._process.wait()})") from None
        return self._read_reply(timeout_s)

    def _read_reply(self, timeout_s: float) -> Any:
        if not wait([self._process.stdout], max(timeout_s, 0.0)):
            raise TimeoutError
        line = self._process.stdout.readline()  # a reply is one line, written at once
        if not line:
            raise WorkerDied(f"the reward worker process exited (exit code {self._process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        try:
            self._process.stdin.close()
        except BrokenPipeError:  # bytes left unsent to a process that is gone; the pipe is closed anyway
            pass


class WorkerPool:
    """At most `size` worker processes, shared by every thread of this process.

    A queue of `size` slots, each holding an idle worker or None (start one when needed): taking a slot
    is how a thread waits its turn, and putting back None is how a killed worker is replaced.
    """

    def __init__(self, size: int) -> None:
        self._slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(size):
            self._slots.put(None)

    def check(self, predicted: str, gold: str, timeout_s: float) -> str:
        """"correct" or "wrong" from math-verify, or why there is no verdict. Waiting for a free worker
        and the comparison itself share `timeout_s`; starting a new worker does not count against it (it has
        its own bound, `STARTUP_TIMEOUT_S`): on a loaded machine start-up alone can exceed `timeout_s`, and
        counting it would turn every symbolic check into a "timeout"."""
        try:
            with self._borrow(timeout_s) as (worker, waited_s):
                status, value = worker.ask(["verify", predicted, gold], timeout_s - waited_s)
        except queue.Empty:
            return "verifier_busy"
        except TimeoutError:
            return "timeout"
        except Exception:  # the worker died or could not start: log it, report it (it has been replaced)
            logger.exception("math-verify worker process failed")
            return "verify_error"
        if status != "ok":
            logger.warning("math-verify raised %s comparing an answer with its gold answer", value)
            return "verify_error"
        return "correct" if value else "wrong"

    def load(self, ref: str) -> list:
        """Import the user's function `ref` in a worker: ["ok", its name] or ["load_error", why]. Raises
        RuntimeError when no worker starts, TimeoutError when importing takes longer than `STARTUP_TIMEOUT_S`,
        WorkerDied when importing ends the process."""
        with self._borrow(STARTUP_TIMEOUT_S) as (worker, _):
            return _load(worker, ref)

    def call(self, ref: str, kwargs: dict[str, Any], timeout_s: float) -> list:
        """Call the user's function `ref` with `kwargs` in a worker: its reply (see the module's docstring), or
        ["load_error", why] when the worker could not import it. Importing it there (once per worker) and
        starting the worker have their own bound, not `timeout_s`.

        Raises TimeoutError when the call (waiting for a free worker included) takes longer than `timeout_s`,
        WorkerDied when the process exits instead of replying; either way that worker is replaced.
        """
        try:
            with self._borrow(timeout_s) as (worker, waited_s):
                reply = _load(worker, ref)
                return reply if reply[0] != "ok" else worker.ask(["call", ref, kwargs], timeout_s - waited_s)
        except queue.Empty:
            raise TimeoutError from None

    @contextlib.contextmanager
    def _borrow(self, wait_s: float) -> Iterator[tuple[_Worker, float]]:
        """A worker (started if its slot was empty) and the seconds spent waiting for its slot, start-up excluded.
        Raises queue.Empty when no slot frees up within `wait_s`. A worker whose use raised is stopped, and its
        slot left empty for a fresh one."""
        started = time.monotonic()
        worker = self._slots.get(timeout=wait_s)
        waited_s = time.monotonic() - started
        try:
            worker = worker or _Worker()
            yield worker, waited_s
        except BaseException:
            if worker is not None:
                worker.close()
            self._slots.put(None)
            raise
        self._slots.put(worker)

    def close_idle(self) -> None:
        """Stop the idle workers; the pool stays usable and starts new ones when needed."""
        idle = []
        while True:
            try:
                idle.append(self._slots.get_nowait())
            except queue.Empty:
                break
        for worker in idle:
            if worker is not None:
                worker.close()
            self._slots.put(None)


_pool = WorkerPool(_POOL_SIZE)  # no process starts until the first request
atexit.register(lambda: _pool.close_idle())  # whichever pool is current at exit, also in a forked child


def _load(worker: _Worker, ref: str) -> list:
    """Have `worker` import the user's function `ref` unless it has: ["ok", its name] or ["load_error", why]."""
    if ref not in worker.loaded:
        reply = worker.ask(["load", ref], STARTUP_TIMEOUT_S)
        if reply[0] != "ok":
            return reply
        worker.loaded[ref] = reply[1]
    return ["ok", worker.loaded[ref]]


def pool() -> WorkerPool:
    """This process's pool of reward workers."""
    return _pool


def _new_pool_after_fork() -> None:
    """A forked child must not share its parent's worker pipes."""
    global _pool
    _pool = WorkerPool(_POOL_SIZE)


os.register_at_fork(after_in_child=_new_pool_after_fork)


# --- Inside a worker ---------------------------------------------------------------------------------------


def _serve() -> None:
    """Worker process main loop: answer request lines on stdin until stdin closes."""
    from math_verify import parse, verify  # only worker processes import sympy

    from nested_reft.rewards import user

    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    # Stray prints (libraries', users' functions') go to stderr instead of corrupting the replies, and a function
    # that reads stdin reads nothing rather than the requests.
    os.dup2(2, 1)
    with open(os.devnull, "rb") as null:
        os.dup2(null.fileno(), 0)
    # math-verify warns that its signal-based timeout is off; the parent process enforces the bound.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # The first comparison builds math-verify's parsers (about half a second): done now, it is part of the
    # start-up, which has its own bound, and the first real check is timed like every other one.
    try:
        verify(parse("$\\frac{1}{2} + x$", parsing_timeout=None), parse("$x + 0.5$", parsing_timeout=None),
               timeout_seconds=None)
    except Exception:  # a warm-up that fails only leaves the cost to the first check
        pass
    replies.write('"ready"\n')
    replies.flush()
    functions: dict[str, Any] = {}
    for line in requests:
        kind, *args = json.loads(line)
        if kind == "verify":
            reply = _verify(parse, verify, *args)
        elif kind == "load":
            reply = user.load(args[0], functions)
        else:
            reply = user.call(functions[args[0]], args[1])
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _verify(parse, verify, predicted: str, gold: str) -> list:
    try:
        with _memory_cap(_CHECK_MEMORY_BYTES):
            gold_parsed = parse(f"${gold}$", parsing_timeout=None, raise_on_error=True)
            pred_parsed = parse(f"${predicted}$", parsing_timeout=None, raise_on_error=True)
            return ["ok", verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)]
    except Exception as exc:  # only the name: str() of some sympy objects can itself run for ages
        return ["error", type(exc).__name__]


@contextlib.contextmanager
def _memory_cap(extra_bytes: int) -> Iterator[None]:
    """Let the block grow this process's address space by at most `extra_bytes` (MemoryError past it). Only the
    symbolic check is capped: a user's function may legitimately load a large model."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm") as statm:
            size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no cap
        yield
        return
    cap = size + extra_bytes if hard == resource.RLIM_INFINITY else min(size + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
