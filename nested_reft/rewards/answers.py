"""Verifiable math rewards: extract a model's final answer and decide whether it equals the gold answer.

Answers are compared in three steps, cheapest first: the normalised strings are equal; both parse as
plain numbers and are exactly equal (`fractions.Fraction`, so GSM8K's common case costs microseconds);
math-verify finds them symbolically equal. The symbolic step runs in the reward worker processes
(`rewards.workers`): math-verify's own timeout relies on `signal.alarm`, which fails outside the main
thread, and a runaway sympy call inside a thread could never be stopped. A worker that overruns its time
budget is killed and replaced, so a call never hangs and a stuck computation never outlives its call.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from fractions import Fraction

from nested_reft.errors import UserError
from nested_reft.rewards import workers

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
        bonus = format_weight if has_marked_answer(completion) else 0.0
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


def has_marked_answer(text: str) -> bool:
    """Whether `text` has a well-formed final-answer marker: a `####` line or a closed `\\boxed{}` whose content is
    not empty once normalised (the format bonus, and the `format` reward)."""
    marked = _marked_answer(text)
    return marked is not None and bool(_normalise(marked))


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
    return workers.pool().check(pred, ref, timeout_s)


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
