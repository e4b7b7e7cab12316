"""Data sets as the project's JSONL: one problem per line, `{"id", "question", "answer", "source"}`.

A SOURCE is one of
- `arithmetic`: the built-in generator of grade-school word problems (no download; the default data set);
- a preset (`gsm8k`, `math500`, `svamp`, `aime24`, `amc23`): a hub data set whose field mapping is known;
- any other hub data set id (`owner/name`, or `owner/name:config`) with an explicit field mapping;
- a local `.jsonl/.json/.csv/.parquet` file (fields `question`/`answer` unless told otherwise).

Gold answers are parsed once, here, by `rewards.parse_gold_answer`: a row whose answer cannot be parsed is
rejected and counted, never written with a guessed answer, so training and evaluation can trust every `answer`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import operator
import os
import random
import re
import socket
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from nested_reft.errors import UserError
from nested_reft.rewards import parse_gold_answer
from nested_reft.rundir import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # importing `datasets` costs about a second; only hub and file sources need it
    from datasets import Dataset

ROW_KEYS = ("id", "question", "answer", "source")
ANSWER_FORMATS = ("gsm8k", "boxed", "plain")
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ARITHMETIC = "arithmetic"
ARITHMETIC_DEFAULT_SIZE = {"train": 5000, "test": 500}  # rows generated when no --limit is given
DEFAULT_DIFFICULTY = 2
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*(:[\w.-]+)?")
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Example:
    """One problem, as a row of the project's JSONL. `answer` is the normalised gold answer."""

    id: str
    question: str
    answer: str
    source: str

    def to_json(self) -> str:
        """The JSONL line (without newline): keys in the order of `ROW_KEYS`, non-ASCII kept as is."""
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass
class PrepareSummary:
    """What preparing a SOURCE did: rows read, rows kept, and why the others were rejected."""

    source: str
    split: str
    rows_read: int
    rows_written: int
    rejected: dict[str, int]  # reason ("unparsable_answer", "empty_question", "duplicate_question") -> count
    answer_format: str | None  # how gold answers were parsed; None for the arithmetic generator
    limit: int | None
    seed: int
    out: Path | None = None

    @property
    def rows_over_limit(self) -> int:
        """Usable rows that --limit left out."""
        return self.rows_read - sum(self.rejected.values()) - self.rows_written

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": None if self.out is None else str(self.out)}


@dataclass(frozen=True)
class Preset:
    """A hub data set and where its rows keep the question and the gold answer."""

    dataset: str
    config: str | None
    question_fields: tuple[str, ...]  # joined with a space: SVAMP splits a problem into a Body and a Question
    answer_field: str
    answer_format: str


PRESETS: dict[str, Preset] = {
    "gsm8k": Preset("openai/gsm8k", "main", ("question",), "answer", "gsm8k"),
    "math500": Preset("HuggingFaceH4/MATH-500", None, ("problem",), "answer", "plain"),
    "svamp": Preset("ChilleD/SVAMP", None, ("Body", "Question"), "Answer", "plain"),
    "aime24": Preset("HuggingFaceH4/aime_2024", None, ("problem",), "answer", "plain"),
    "amc23": Preset("math-ai/amc23", None, ("question",), "answer", "plain"),
}


# --- Entry points ------------------------------------------------------------------------------------------


def load_source(
    source: str,
    *,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    question_field: str | None = None,
    answer_field: str | None = None,
    answer_format: str | None = None,
    difficulty: int = DEFAULT_DIFFICULTY,
) -> tuple[list[Example], PrepareSummary]:
    """Read SOURCE into examples, in source order, and say what was rejected.

    `question_field` may name several fields separated by commas (joined with a space). `limit` keeps a
    random subset of that many usable rows, drawn with `seed` and kept in source order; for `arithmetic`,
    `seed` seeds the generator and `limit` is the number of problems. Raises UserError on any bad input,
    including a source with no usable row.
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if answer_format is not None and answer_format not in ANSWER_FORMATS:
        raise UserError(f"--answer-format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    if source == ARITHMETIC:
        if question_field or answer_field or answer_format:
            raise UserError("--question-field, --answer-field and --answer-format do not apply to arithmetic")
        return _arithmetic_source(split, limit, seed, difficulty)
    if difficulty != DEFAULT_DIFFICULTY:
        raise UserError(f"--difficulty applies only to the {ARITHMETIC} generator, not to {source!r}")
    mapping, dataset = _open_table(source, split, question_field, answer_field, answer_format)
    return _convert(dataset, mapping, source=source, split=split, limit=limit, seed=seed)


def prepare(source: str, out: Path, **options: Any) -> PrepareSummary:
    """Write SOURCE as the project's JSONL at `out` and its summary at `summary_path(out)`, both atomically.

    `options` are those of `load_source`. The same arguments always produce byte-identical files.
    """
    out = Path(out)
    if out.suffix != ".jsonl":
        raise UserError(f"--out {out}: expected a path ending in .jsonl")
    if Path(source).exists() and Path(source).resolve() == out.resolve():
        raise UserError(f"--out {out}: would overwrite the SOURCE file; choose another path")
    examples, summary = load_source(source, **options)
    atomic_write_text(out, "".join(example.to_json() + "\n" for example in examples))
    summary.out = out
    atomic_write_json(summary_path(out), summary.to_dict())
    return summary


def summary_path(out: Path) -> Path:
    """Where `prepare` writes the summary of `out`: `data/train.jsonl` -> `data/train.summary.json`."""
    return Path(out).with_suffix(".summary.json")


def read_examples(path: Path) -> list[Example]:
    """Read a JSONL file written by `prepare`. A bad row is a UserError naming `FILE:LINE`; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    examples: list[Example] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            example = _parse_row(line, where=f"{path}:{number}")
            if example.id in first_line_of:
                first = first_line_of[example.id]
                raise UserError(f"{path}:{number}: duplicate id {example.id!r} (first on line {first})")
            first_line_of[example.id] = number
            examples.append(example)
    if not examples:
        raise UserError(f"{path}: no rows")
    return examples


def load_examples(spec: str, *, split: str, limit: int | None, seed: int) -> list[Example]:
    """The examples train and evaluate use: `spec` is a JSONL file in the project's format (read as is; `split`
    is then ignored), or any SOURCE that `load_source` accepts, prepared in memory (`data.train: arithmetic`)."""
    path = Path(spec)
    if path.suffix == ".jsonl" and _is_project_jsonl(path):
        return _subset(read_examples(path), limit, seed)
    examples, _ = load_source(spec, split=split, limit=limit, seed=seed)
    return examples


def _parse_row(line: str, *, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict) or sorted(row) != sorted(ROW_KEYS):
        found = ", ".join(row) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        raise UserError(
            f"{where}: expected an object with keys {', '.join(ROW_KEYS)}, found {found} "
            "(convert raw data with `nested-reft prepare-data`)"
        )
    for key in ROW_KEYS:
        if not isinstance(row[key], str) or not row[key].strip():
            raise UserError(f"{where}: {key!r} must be a non-empty string, found {row[key]!r}")
    return Example(**{key: row[key] for key in ROW_KEYS})


def _is_project_jsonl(path: Path) -> bool:
    """Whether the first row of `path` has exactly the project's keys (else it is raw data for `load_source`)."""
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and sorted(row) == sorted(ROW_KEYS)


def _subset(items: list[Example], limit: int | None, seed: int) -> list[Example]:
    """`limit` items drawn at random with `seed`, in their original order (all of them without a limit)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


# --- Hub and local tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mapping:
    name: str  # written as each row's `source` and used in its id
    question_fields: tuple[str, ...]
    answer_field: str
    answer_format: str | None  # None: detect from the answers (local files)


def _open_table(
    source: str, split: str, question_field: str | None, answer_field: str | None, answer_format: str | None
) -> tuple[_Mapping, Dataset]:
    """Resolve SOURCE to a field mapping and the rows of `split`. Flags override a preset's mapping."""
    question_fields = tuple(f.strip() for f in question_field.split(",")) if question_field else None
    if source in PRESETS:
        preset = PRESETS[source]
        mapping = _Mapping(
            source,
            question_fields or preset.question_fields,
            answer_field or preset.answer_field,
            answer_format or preset.answer_format,
        )
        return mapping, _load_hub(preset.dataset, preset.config, split, label=source)
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        mapping = _Mapping(path.stem, question_fields or ("question",), answer_field or "answer", answer_format)
        return mapping, _load_local(path)
    if _HUB_ID.fullmatch(source):
        flags = {"--question-field": question_field, "--answer-field": answer_field, "--answer-format": answer_format}
        missing = [flag for flag, value in flags.items() if value is None]
        if missing:
            raise UserError(f"{source}: a hub data set needs {', '.join(missing)} (its question and answer columns)")
        dataset_id, _, config = source.partition(":")
        mapping = _Mapping(dataset_id, question_fields, answer_field, answer_format)
        return mapping, _load_hub(dataset_id, config or None, split, label=source)
    known = [ARITHMETIC, *PRESETS]
    close = difflib.get_close_matches(source, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"unknown SOURCE {source!r}: {hint}expected the built-in {ARITHMETIC!r}, a preset ({', '.join(PRESETS)}), "
        "a hub data set id (owner/name) or a local .jsonl/.json/.csv/.parquet file"
    )


def _import_datasets():
    """The `datasets` module (imported lazily: it costs about a second) with its progress bars off, which would
    otherwise interleave with our one-line errors and summary table."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _load_local(path: Path) -> Dataset:
    """All rows of a local file, read by the `datasets` builder for its type."""
    datasets = _import_datasets()

    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:  # the builders fail on an empty file with an unrelated message
        raise UserError(f"{path}: no rows")
    builder = datasets.load_dataset_builder(kind, data_files=str(path))
    try:
        builder.download_and_prepare()
    except datasets.exceptions.DatasetGenerationError as e:
        raise UserError(f"{path}: could not be read as {kind}: {_one_line(e.__cause__ or e)}") from e
    # The builder (what `load_dataset` runs inside) exposes the row count, so a file with no rows (blank
    # lines, a CSV header) is reported as such rather than as "Instruction 'train' corresponds to no data".
    if not builder.info.splits["train"].num_examples:
        raise UserError(f"{path}: no rows")
    return builder.as_dataset(split="train")


def _load_hub(dataset_id: str, config: str | None, split: str, *, label: str) -> Dataset:
    """The rows of `split` of a hub data set (downloaded, or from the local cache when HF_HUB_OFFLINE is set)."""
    datasets = _import_datasets()

    offline = f"could not download {dataset_id} (offline?); pass a local .jsonl/.json/.csv/.parquet file instead"
    # Without network `datasets` retries every request with backoff and gives up only after ~25 s; a quick
    # connection check fails in milliseconds. In offline mode the hub is not contacted and the cache is used.
    if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
        raise UserError(offline)
    try:
        builder = datasets.load_dataset_builder(dataset_id, config)
        builder.download_and_prepare()
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(f"{dataset_id}: no such data set on the hub, or it is gated (log in: `hf auth login`)") from e
    except ConnectionError as e:
        raise UserError(offline) from e
    except ValueError as e:  # e.g. a data set with several configs and none chosen
        raise UserError(f"{label}: {_one_line(e)}") from e
    if split not in builder.info.splits:
        available = ", ".join(builder.info.splits)
        raise UserError(f"{label}: no split {split!r}; available: {available} (choose with --split)")
    return builder.as_dataset(split=split)


def _hub_reachable() -> bool:
    """Whether the hub accepts a TCP connection within a few seconds.

    The offline variables are read here too because `datasets` reads them only once, when it is imported.
    """
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").upper() in {"1", "ON", "YES", "TRUE"}:
            return False
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    if urllib.request.getproxies().get(endpoint.scheme):
        return True  # behind a proxy a direct connection proves nothing; the hub client will use the proxy
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _convert(
    dataset: Dataset, mapping: _Mapping, *, source: str, split: str, limit: int | None, seed: int
) -> tuple[list[Example], PrepareSummary]:
    """Turn table rows into examples, rejecting rows with an empty question, an unparsable answer or a
    question seen before (whitespace-insensitive). Ids carry the row's index in the source."""
    fields = [*mapping.question_fields, mapping.answer_field]
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        raise UserError(
            f"{source}: no field {missing[0]!r}; available: {', '.join(dataset.column_names)} "
            "(choose with --question-field/--answer-field)"
        )
    rows = dataset.select_columns(list(dict.fromkeys(fields))).to_list()
    answers = [_cell_text(row[mapping.answer_field]) for row in rows]
    answer_format = mapping.answer_format or _detect_format(answers)
    examples: list[Example] = []
    rejected: Counter[str] = Counter()
    seen: set[str] = set()
    for index, (row, answer) in enumerate(zip(rows, answers)):
        question = " ".join(_cell_text(row[f]).strip() for f in mapping.question_fields).strip()
        gold = parse_gold_answer(answer, answer_format)
        key = " ".join(question.split())
        if not question:
            rejected["empty_question"] += 1
        elif gold is None:
            rejected["unparsable_answer"] += 1
        elif key in seen:
            rejected["duplicate_question"] += 1
        else:
            seen.add(key)
            examples.append(Example(f"{mapping.name}-{split}-{index:06d}", question, gold, mapping.name))
    if not examples:
        raise UserError(f"{source}: no usable rows (rejected: {dict(rejected)})")
    kept = _subset(examples, limit, seed)
    summary = PrepareSummary(
        source=source,
        split=split,
        rows_read=len(rows),
        rows_written=len(kept),
        rejected=dict(sorted(rejected.items())),
        answer_format=answer_format,
        limit=limit,
        seed=seed,
    )
    return kept, summary


def _detect_format(answers: list[str]) -> str:
    """A file's answer format: GSM8K's `####` if any answer has one, else `\\boxed` if any has one, else plain."""
    if any("####" in a for a in answers):
        return "gsm8k"
    if any("\\boxed" in a for a in answers):
        return "boxed"
    return "plain"


def _cell_text(value: Any) -> str:
    """A table cell as text. Whole-number floats lose their `.0` (SVAMP stores answers as float64)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- The arithmetic generator ------------------------------------------------------------------------------
# A problem is a starting quantity followed by 1 to 4 steps (+, -, x, /), each told by a sentence drawn from
# templates for its operation, and a closing question. Whether a problem belongs to train or test is decided by
# a SHA-256 bucket of its question text alone, so the two splits can never share a question, whatever the seed,
# difficulty or size; the generator draws problems until it has `n` distinct ones of the requested split.

_NAMES = (
    ("Ava", "she"), ("Liam", "he"), ("Mia", "she"), ("Noah", "he"), ("Zoe", "she"), ("Omar", "he"),
    ("Lena", "she"), ("Ravi", "he"), ("Sofia", "she"), ("Ben", "he"), ("Priya", "she"), ("Diego", "he"),
    ("Hana", "she"), ("Kwame", "he"), ("Elena", "she"), ("Tom", "he"), ("Aisha", "she"), ("Lucas", "he"),
    ("Maya", "she"), ("Felix", "he"), ("Nora", "she"), ("Jamal", "he"), ("Ingrid", "she"), ("Kenji", "he"),
)  # fmt: skip
_PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}  # subject, object, possessive
_OBJECTS = (
    "marbles", "stickers", "apples", "cookies", "pencils", "books", "coins", "trading cards", "seashells",
    "balloons", "crayons", "stamps", "beads", "oranges", "toy cars", "flowers", "eggs", "buttons",
)  # fmt: skip
_OPENINGS = (
    "{name} has {n} {obj}.",
    "{name} collected {n} {obj} last week.",
    "{name} starts the day with {n} {obj}.",
    "{name} keeps {n} {obj} in a shoebox.",
)
_STEPS = {
    "+": (
        "{Sub} buys {k} more {obj}.",
        "{friend} gives {obj_pron} {k} {obj}.",
        "{Sub} finds {k} more {obj} at the park.",
        "Later, {sub} wins {k} {obj} at a fair.",
    ),
    "-": (
        "{Sub} gives {k} {obj} to {friend}.",
        "{Sub} loses {k} {obj} on the way home.",
        "{Sub} sells {k} {obj} at the market.",
        "{Sub} uses {k} {obj} for a school project.",
    ),
    "*": (
        "After a good week, {sub} has {k} times as many {obj} as before.",
        "{Sub} trades with {friend} and ends up with {k} times as many {obj} as {sub} had.",
        "{Poss} collection of {obj} grows to {k} times its size.",
    ),
    "/": (
        "{Sub} splits {poss} {obj} into {k} equal groups and keeps only one group.",
        "{Sub} packs the {obj} equally into {k} bags and gives away all the bags but one.",
        "{Sub} keeps one out of every {k} {obj} and donates the rest.",
    ),
}
_QUESTIONS = (
    "How many {obj} does {name} have now?",
    "How many {obj} does {name} have in the end?",
    "How many {obj} does {name} end up with?",
)
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
_MAX_DRAWS_PER_PROBLEM = 100  # a test-split problem takes about 10 draws; running out means the space is exhausted


@dataclass(frozen=True)
class _Level:
    steps: tuple[int, int]  # inclusive range of the number of steps
    start: tuple[int, int]  # inclusive range of the starting quantity
    addend: int  # the largest number added or taken away
    factor: int  # the largest multiplier or divisor; below 2, no multiplication or division
    ceiling: int  # a multiplication never takes the quantity above this


_LEVELS = {
    1: _Level(steps=(1, 2), start=(2, 10), addend=9, factor=0, ceiling=0),
    2: _Level(steps=(1, 3), start=(4, 30), addend=20, factor=5, ceiling=200),
    3: _Level(steps=(2, 4), start=(10, 60), addend=50, factor=9, ceiling=1000),
    4: _Level(steps=(3, 4), start=(20, 150), addend=150, factor=12, ceiling=5000),
}


@dataclass(frozen=True)
class ArithmeticProblem:
    """A generated problem with its trace: the quantity starts at `start`, then each (operation, operand) step
    of `steps` applies in order. Every quantity along the way is a whole number of at least 2."""

    question: str
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def answer(self) -> int:
        value = self.start
        for op, operand in self.steps:
            value = _APPLY[op](value, operand)
        return value


def generate_arithmetic(split: str, n: int, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> list[Example]:
    """`n` distinct word problems of `split` ("train" or "test"), the same for the same arguments."""
    problems = arithmetic_problems(split, n, seed, difficulty)
    return [
        Example(f"{ARITHMETIC}-{split}-{i:06d}", p.question, str(p.answer), ARITHMETIC) for i, p in enumerate(problems)
    ]


def arithmetic_problems(
    split: str, n: int, seed: int, difficulty: int = DEFAULT_DIFFICULTY
) -> list[ArithmeticProblem]:
    """The problems behind `generate_arithmetic`, with their traces. Difficulty 1 to 4 widens the number ranges
    and raises the step count (1: one or two additions or subtractions of numbers up to 10)."""
    _check_arithmetic_split(split)
    if difficulty not in _LEVELS:
        raise UserError(f"--difficulty must be 1 to {len(_LEVELS)}, got {difficulty}")
    rng = random.Random(seed)
    problems: list[ArithmeticProblem] = []
    seen: set[str] = set()
    for _ in range(_MAX_DRAWS_PER_PROBLEM * n):
        if len(problems) == n:
            break
        problem = _draw_problem(rng, _LEVELS[difficulty])
        if _split_of(problem.question) == split and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < n:
        raise UserError(
            f"{ARITHMETIC}: only {len(problems)} distinct {split} problems at difficulty {difficulty}; lower --limit"
        )
    return problems


def _check_arithmetic_split(split: str) -> None:
    if split not in ARITHMETIC_DEFAULT_SIZE:
        raise UserError(f"{ARITHMETIC}: no split {split!r}; expected one of {', '.join(ARITHMETIC_DEFAULT_SIZE)}")


def _arithmetic_source(
    split: str, limit: int | None, seed: int, difficulty: int
) -> tuple[list[Example], PrepareSummary]:
    _check_arithmetic_split(split)
    examples = generate_arithmetic(split, limit or ARITHMETIC_DEFAULT_SIZE[split], seed, difficulty)
    n = len(examples)
    summary = PrepareSummary(ARITHMETIC, split, n, n, rejected={}, answer_format=None, limit=limit, seed=seed)
    return examples, summary


def _split_of(question: str) -> str:
    """The split a question belongs to: test for one in ten, train for the others. A stable function of the
    text (SHA-256, not `hash()`, which Python salts per process)."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "train"


def _draw_problem(rng: random.Random, level: _Level) -> ArithmeticProblem:
    name, pronoun = rng.choice(_NAMES)
    sub, obj_pron, poss = _PRONOUNS[pronoun]
    obj = rng.choice(_OBJECTS)
    start = value = rng.randint(*level.start)
    sentences = [rng.choice(_OPENINGS).format(name=name, n=start, obj=obj)]
    words = dict(Sub=sub.capitalize(), sub=sub, obj_pron=obj_pron, Poss=poss.capitalize(), poss=poss, obj=obj)
    steps: list[tuple[str, int]] = []
    template = ""
    for _ in range(rng.randint(*level.steps)):
        op, operand = _draw_step(rng, level, value)
        friend = rng.choice([other for other, _ in _NAMES if other != name])
        template = rng.choice([t for t in _STEPS[op] if t != template])  # never the same sentence twice in a row
        sentences.append(template.format(k=operand, friend=friend, **words))
        steps.append((op, operand))
        value = _APPLY[op](value, operand)
    sentences.append(rng.choice(_QUESTIONS).format(obj=obj, name=name))
    return ArithmeticProblem(" ".join(sentences), start, tuple(steps))


def _draw_step(rng: random.Random, level: _Level, value: int) -> tuple[str, int]:
    """A step that keeps the quantity a whole number of at least 2 (so every count in the text is plural):
    subtraction leaves 2 or more, division is exact and leaves 2 or more, multiplication stays under the ceiling."""
    divisors = [d for d in range(2, min(level.factor, value // 2) + 1) if value % d == 0]
    options = ["+"]
    if value >= 4:
        options.append("-")
    if level.factor >= 2 and 2 * value <= level.ceiling:
        options.append("*")
    if divisors:
        options.append("/")
    op = rng.choice(options)
    if op == "+":
        return op, rng.randint(2, level.addend)
    if op == "-":
        return op, rng.randint(2, min(level.addend, value - 2))
    if op == "*":
        return op, rng.randint(2, min(level.factor, level.ceiling // value))
    return op, rng.choice(divisors)
