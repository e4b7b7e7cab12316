"""Verifiable math rewards: extract a model's final answer and decide whether it equals the gold answer.

Answers are compared in three steps, cheapest first: the normalised strings are equal; both parse as
plain numbers and are exactly equal (`fractions.Fraction`, so GSM8K's common case costs microseconds);
math-verify finds them symbolically equal. The symbolic step runs in a small pool of worker processes:
math-verify's own timeout relies on `signal.alarm`, which fails outside the main thread, and a
runaway sympy call inside a thread could never be stopped. A worker that overruns its time budget is
killed and replaced, so a call never hangs and a stuck computation never outlives its call.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from nested_reft.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardResult:
    reward: float  # 1.0 correct, 0.0 wrong, plus the format bonus when one is configured
    predicted: str | None  # the extracted answer, or None when the completion has none
    reason: str  # "correct", "wrong", "no_answer", "bad_gold", "timeout", "verifier_busy", "verify_error", "reward_error"


def math_reward(completion: str, gold: str, *, last_number_fallback: bool = False, format_weight: float = 0.0,
                timeout_s: float = 2.0) -> RewardResult:
    """Score one completion against its gold answer; never raises on any text and never hangs.

    The reward is 1.0 for a correct answer, else 0.0, plus `format_weight` when the completion has a
    well-formed final-answer marker: a non-empty `####` line or a closed `\\boxed{}`. The symbolic check
    is bounded by `timeout_s` (plus, when a verifier process has to be started, its start-up: about a
    second). Only invalid arguments raise (ValueError).
    """
    if timeout_s <= 0 or format_weight < 0:
        raise ValueError(f"math_reward needs timeout_s > 0 and format_weight >= 0, got {timeout_s}, {format_weight}")
    try:
        predicted = extract_answer(completion, last_number_fallback=last_number_fallback)
        reason = "no_answer" if predicted is None else _match(predicted, gold, timeout_s)
        marked = _marked_answer(completion)
        bonus = format_weight if marked is not None and _normalise(marked) else 0.0
        return RewardResult(reward=(1.0 if reason == "correct" else 0.0) + bonus, predicted=predicted, reason=reason)
    except Exception:  # a reward bug must not kill a training run, but it is logged with its traceback
        logger.exception("math_reward failed; scoring the completion 0")
        return RewardResult(reward=0.0, predicted=None, reason="reward_error")


# --- Extracting answers --------------------------------------------------------------------------

_BOX_OPENER = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\b\s*:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"[-−]?[0-9][0-9,]*(?:\.[0-9]+)?")
_BRACE_STEP = {"{": 1, "}": -1}


def extract_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
    """The final answer in `text`, stripped, or None.

    Looks, in order, for: the line after the first `####` (GSM8K; the first, because models often go
    on to invent further question/answer pairs), the content of the last closed `\\boxed{}`/`\\fbox{}`
    (MATH), what follows the last "the answer is" up to the end of its sentence, and, only when
    `last_number_fallback` is set, the last number in the text.
    """
    answer = _marked_answer(text) or _answer_is(text)
    if answer is None and last_number_fallback:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1].rstrip(",") if numbers else None
    return answer


def _marked_answer(text: str) -> str | None:
    """The answer behind an explicit marker: the first `####` line, else the last closed `\\boxed{}`."""
    return _hash_answer(text) or _last_boxed(text)


def _hash_answer(text: str) -> str | None:
    """The text after the first `####`, up to the end of its line (or a further `####`)."""
    start = text.find("####")
    if start < 0:
        return None
    rest = text[start + 4 :].lstrip()
    answer = rest.split("\n", 1)[0].split("####", 1)[0].strip()
    return answer or None


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}`; None if there is none or it is never closed."""
    openers = list(_BOX_OPENER.finditer(text))
    if not openers:
        return None
    start = openers[-1].end()  # just past the opening brace
    depth = 1
    for i in range(start, len(text)):
        depth += _BRACE_STEP.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip() or None
    return None


def _answer_is(text: str) -> str | None:
    """What follows the last "the answer is", up to the end of its sentence or line."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n", 1)[0]
    end = _SENTENCE_END.search(rest)
    answer = (rest[: end.start()] if end else rest).strip()
    return answer or None


# --- Gold answers --------------------------------------------------------------------------------

_MAX_GOLD_CHARS = 256
_MAX_GOLD_WORDS = 5  # more prose words than this and the field holds a sentence, not an answer
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")


def parse_gold_answer(solution: str, answer_format: str) -> str | None:
    """The normalised gold answer of a data set row, or None when it cannot be parsed.

    `answer_format` is "gsm8k" (the number after `####`), "boxed" (the last `\\boxed{}` of a MATH
    solution, which must be closed) or "plain" (the whole field). None means: nothing there, no marker,
    unbalanced braces, or not a recognisable answer (a gsm8k answer that is not a number; any answer
    that is longer than a formula or reads like a sentence). Pure string work: deterministic and fast.
    """
    if answer_format == "gsm8k":
        raw = _hash_answer(solution)
    elif answer_format == "boxed":
        raw = _last_boxed(solution)
    elif answer_format == "plain":
        raw = solution.strip() or None
    else:
        raise UserError(f"answer_format: expected one of 'gsm8k', 'boxed', 'plain', found {answer_format!r}")
    if raw is None or not _braces_balanced(raw):
        return None
    answer = _normalise(raw)
    if answer_format == "gsm8k" and _to_fraction(answer) is None:
        return None
    prose_words = _WORD.findall(_LATEX_COMMAND.sub(" ", answer))
    if not answer or len(answer) > _MAX_GOLD_CHARS or len(prose_words) > _MAX_GOLD_WORDS:
        return None
    return answer


def _braces_balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += _BRACE_STEP.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


# --- Comparing answers ---------------------------------------------------------------------------


def answers_match(predicted: str, gold: str, *, timeout_s: float = 2.0) -> bool:
    """Whether `predicted` equals `gold`: exactly as numbers when both are numbers, else symbolically.

    A symbolic check that times out or fails counts as no match; `math_reward` reports which it was.
    """
    return _match(predicted, gold, timeout_s) == "correct"


def _match(predicted: str, gold: str, timeout_s: float) -> str:
    """The reason string for comparing two extracted answers ("correct", "wrong", "timeout", ...)."""
    pred, ref = _normalise(predicted), _normalise(gold)
    if not ref:
        return "bad_gold"
    if not pred:
        return "no_answer"
    if pred == ref:
        return "correct"
    pred_value, ref_value = _to_fraction(pred), _to_fraction(ref)
    if pred_value is not None and ref_value is not None:
        return "correct" if pred_value == ref_value else "wrong"
    return _pool.check(pred, ref, timeout_s)


_NORMALISE_PASSES = 8
_SPACING = re.compile(r"\\[!,;:]")
_SIZING = re.compile(r"\\(?:left|right)(?![A-Za-z])")
# An opening `\\text{`-style wrapper, or a brace: the tokens `_unwrap_text` tracks.
_WRAPPER_OR_BRACE = re.compile(r"\\(?:text|textrm|textbf|mathrm|mathbf|mbox|operatorname)\s*\{|[{}]")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_THOUSANDS = re.compile(r"(?<![0-9.,])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])")
# A number followed by unit words ("18 dollars", "12 cm", "4 km/h"). Units need two letters and a
# space, so that algebra such as "2x" or "5 i" keeps its variable.
_UNIT_TAIL = re.compile(r"(-?[0-9.]+(?:/[0-9]+)?)\s+[A-Za-z]{2}[A-Za-z\s/.]*")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_SLASH_FRACTION = re.compile(r"([-+]?[0-9]+)/([0-9]+)")
_FRAC_ARG = r"(?:\{([-+]?[0-9]+(?:\.[0-9]+)?)\}|([0-9]))"  # \frac{12}{5} or \frac12
_LATEX_FRACTION = re.compile(r"(-?)\\frac" + _FRAC_ARG + _FRAC_ARG)


def _normalise(answer: str) -> str:
    """Strip what does not change an answer's value: math delimiters, `\\text{}`-style wrappers,
    `\\left`/`\\right`, spacing, currency, percent and degree signs, thousands separators, trailing unit
    words and a final period. Idempotent, so a stored normalised gold answer stays what it is (short of
    input built to nest more than `_NORMALISE_PASSES` removals, which the cap keeps linear in time)."""
    for _ in range(_NORMALISE_PASSES):  # one removal can expose another: "\\te$xt{5}" -> "\\text{5}" -> "5"
        normalised = _normalise_once(answer)
        if normalised == answer:
            break
        answer = normalised
    return answer


def _normalise_once(answer: str) -> str:
    s = answer.replace("−", "-").replace("\\$", "").replace("$", "")
    for delimiter in ("\\(", "\\)", "\\[", "\\]"):
        s = s.replace(delimiter, "")
    s = _SIZING.sub("", _SPACING.sub("", s.replace("\\ ", " ")))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _unwrap_text(s)
    s = _DEGREES.sub("", s).replace("\\%", "").replace("%", "")
    s = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s.replace("{,}", ","))
    s = " ".join(s.split()).rstrip(".").strip()
    unit = _UNIT_TAIL.fullmatch(s)
    return unit.group(1) if unit else s


def _unwrap_text(s: str) -> str:
    """Drop `\\text{...}`-style wrappers and keep their content, in one pass however deep they nest."""
    pieces, wrapper_closes = [], []  # per open brace: is its closing brace a wrapper's (to be dropped)?
    end = 0
    for token in _WRAPPER_OR_BRACE.finditer(s):
        pieces.append(s[end : token.start()])
        end = token.end()
        if token.group() == "}":
            if not (wrapper_closes and wrapper_closes.pop()):
                pieces.append("}")
        else:
            wrapper_closes.append(token.group() != "{")
            if token.group() == "{":
                pieces.append("{")
    pieces.append(s[end:])
    return "".join(pieces)


def _to_fraction(answer: str) -> Fraction | None:
    """The exact value of a normalised answer that is a plain number (`-3`, `0.5`, `1/2`, `\\frac{1}{2}`)."""
    s = answer.replace(" ", "")
    try:
        if _PLAIN_NUMBER.fullmatch(s):
            return Fraction(s)
        if slash := _SLASH_FRACTION.fullmatch(s):
            numerator, denominator = (int(part) for part in slash.groups())
            return Fraction(numerator, denominator) if denominator else None
        if frac := _LATEX_FRACTION.fullmatch(s):
            sign, num_braced, num_digit, den_braced, den_digit = frac.groups()
            numerator, denominator = Fraction(num_braced or num_digit), Fraction(den_braced or den_digit)
            return (-1 if sign else 1) * numerator / denominator if denominator else None
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits): not a plain number
        return None
    return None


# --- Symbolic verification in worker processes ---------------------------------------------------

_STARTUP_TIMEOUT_S = 60.0  # importing sympy and math-verify takes about a second; this allows a loaded machine
_POOL_SIZE = min(4, os.cpu_count() or 1)  # most answers are numbers and never reach the pool
# sympy can build numbers of any size ("2^{2^{40}}" grows by ~100 MB/s); past this a worker gets MemoryError.
_WORKER_MEMORY_BYTES = 2 * 1024**3
# A plain interpreter running `_serve`, rather than multiprocessing: it does not re-run the caller's
# __main__ (which breaks scripts without a main guard), and it works inside daemonic processes too.
_WORKER_COMMAND = [sys.executable, "-c", "from nested_reft.rewards import _serve; _serve()"]


class _Worker:
    """One verifier process (see `_serve`), talking JSON lines over its stdin and stdout; one user at a time."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            _WORKER_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": pythonpath}
        )
        try:
            ready = self._read_reply(_STARTUP_TIMEOUT_S) == "ready"
        except (TimeoutError, EOFError, ValueError):
            ready = False
        if not ready:
            self.close()
            raise RuntimeError(f"the math-verify worker process did not start within {_STARTUP_TIMEOUT_S:.0f} s")

    def ask(self, predicted: str, gold: str, timeout_s: float) -> list:
        """Send one comparison; return the reply ["ok", equal] or ["error", exception name].

        Raises TimeoutError when no reply arrives within `timeout_s`; the caller must then close it.
        """
        self._process.stdin.write(json.dumps([predicted, gold]).encode() + b"\n")
        self._process.stdin.flush()
        return self._read_reply(timeout_s)

    def _read_reply(self, timeout_s: float) -> Any:
        if not wait([self._process.stdout], max(timeout_s, 0.0)):
            raise TimeoutError
        line = self._process.stdout.readline()  # replies are one short line, written at once
        if not line:
            raise EOFError(f"the math-verify worker process closed its output (exit code {self._process.poll()})")
        return json.loads(line)

    def close(self) -> None:
        self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        try:
            self._process.stdin.close()
        except BrokenPipeError:  # bytes left unsent to a process that is gone; the pipe is closed anyway
            pass


class _VerifierPool:
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
        its own bound, `_STARTUP_TIMEOUT_S`): on a loaded machine start-up alone can exceed `timeout_s`, and
        counting it would turn every symbolic check into a "timeout"."""
        started = time.monotonic()
        try:
            worker = self._slots.get(timeout=timeout_s)
        except queue.Empty:
            return "verifier_busy"
        remaining = timeout_s - (time.monotonic() - started)  # measured before any start-up
        healthy, reason = False, "verify_error"
        try:
            worker = worker or _Worker()
            status, value = worker.ask(predicted, gold, remaining)
            healthy = True
            if status == "ok":
                reason = "correct" if value else "wrong"
            else:
                logger.warning("math-verify raised %s comparing an answer with its gold answer", value)
        except TimeoutError:
            reason = "timeout"
        except Exception:  # the worker died or could not start: log it, report it, replace it
            logger.exception("math-verify worker process failed")
        finally:
            if worker is not None and not healthy:
                worker.close()
            self._slots.put(worker if healthy else None)
        return reason

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


_pool = _VerifierPool(_POOL_SIZE)  # no process starts until the first symbolic check
atexit.register(lambda: _pool.close_idle())  # whichever pool is current at exit, also in a forked child


def _new_pool_after_fork() -> None:
    """A forked child must not share its parent's worker pipes."""
    global _pool
    _pool = _VerifierPool(_POOL_SIZE)


os.register_at_fork(after_in_child=_new_pool_after_fork)


def _serve() -> None:
    """Worker process main loop: answer [predicted, gold] lines on stdin until stdin closes."""
    import resource

    from math_verify import parse, verify  # only worker processes import sympy

    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from libraries go to stderr instead of corrupting the replies
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
    for line in sys.stdin:
        predicted, gold = json.loads(line)
        try:
            gold_parsed = parse(f"${gold}$", parsing_timeout=None, raise_on_error=True)
            pred_parsed = parse(f"${predicted}$", parsing_timeout=None, raise_on_error=True)
            reply = ["ok", verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)]
        except Exception as exc:  # only the name: str() of some sympy objects can itself run for ages
            reply = ["error", type(exc).__name__]
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
