"""Data sources: turn the built-in generator, a hub data set or a local table into project rows.

A SOURCE is one of
- `arithmetic`: the built-in generator of grade-school word problems (no download; the default data set);
- a preset (`gsm8k`, `math500`, `svamp`, `aime24`, `amc23`): a hub data set whose field mapping is known;
- any other hub data set id (`owner/name`, or `owner/name:config`) with an explicit field mapping;
- a local `.jsonl/.json/.csv/.parquet` file (fields `question`/`answer` unless told otherwise).

Gold answers are parsed once, here, by `rewards.parse_gold_answer`: a row whose answer cannot be parsed is
rejected and counted, never written with a guessed answer, so training and evaluation can trust every `answer`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import socket
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from nested_reft.data.arithmetic import ARITHMETIC, DEFAULT_DIFFICULTY, arithmetic_source
from nested_reft.data.rows import Example, PrepareSummary, is_project_jsonl, is_reserved, read_examples, subset
from nested_reft.errors import UserError
from nested_reft.rewards import parse_gold_answer
from nested_reft.rundir import atomic_write_json, atomic_write_text, ensure_writable

if TYPE_CHECKING:  # importing `datasets` costs about a second; only hub and file sources need it
    from datasets import Dataset

ANSWER_FORMATS = ("gsm8k", "boxed", "plain")
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*(:[\w.-]+)?")
_HUB_PROBE_TIMEOUT_S = 3.0


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
        return arithmetic_source(split, limit, seed, difficulty)
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
    ensure_writable(out, "--out")  # before a download or a long generation, not after
    examples, summary = load_source(source, **options)
    atomic_write_text(out, "".join(example.to_json() + "\n" for example in examples))
    summary.out = out
    atomic_write_json(summary_path(out), summary.to_dict())
    return summary


def summary_path(out: Path) -> Path:
    """Where `prepare` writes the summary of `out`: `data/train.jsonl` -> `data/train.summary.json`."""
    return Path(out).with_suffix(".summary.json")


def load_examples(spec: Any, *, split: str, limit: int | None, seed: int) -> list[Example]:
    """The examples train and evaluate use. `spec` is a JSONL file in the project's format (read as is; `split` is
    then ignored), any SOURCE that `load_source` accepts, prepared in memory (`data.train: arithmetic`), or a
    recipe's `{source, question_field, answer_field, answer_format}` (`recipe.DataSource`) naming a SOURCE's fields."""
    fields = {}
    if not isinstance(spec, str):
        fields = {"question_field": spec.question_field, "answer_field": spec.answer_field,
                  "answer_format": spec.answer_format}
        spec = spec.source
    path = Path(spec)
    if path.suffix == ".jsonl" and is_project_jsonl(path):
        return subset(read_examples(path), limit, seed)
    examples, _ = load_source(spec, split=split, limit=limit, seed=seed, **fields)
    return examples


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
            raise UserError(f"{source}: a hub data set needs {', '.join(missing)} (its question and answer columns; in "
                            "a recipe, data.train: {source, question_field, answer_field, answer_format})")
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


@contextlib.contextmanager
def _quiet_builder_errors() -> Iterator[None]:
    """The file builders log a parse error at ERROR level before raising it; the raised error becomes our one
    line, so the log record would only print the same message twice."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_local(path: Path) -> Dataset:
    """All rows of a local file, read by the `datasets` builder for its type."""
    datasets = _import_datasets()
    import pyarrow  # a dependency of `datasets`

    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:  # the builders fail on an empty file with an unrelated message
        raise UserError(f"{path}: no rows")
    builder = datasets.load_dataset_builder(kind, data_files=str(path))
    try:
        with _quiet_builder_errors():
            builder.download_and_prepare()
    # A corrupt parquet file fails in pyarrow before the builder can wrap the error.
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as e:
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
    question seen before (whitespace-insensitive). Ids carry the row's index in the source; the source's other
    fields become the rows' columns (see `_extra_columns`)."""
    fields = [*mapping.question_fields, mapping.answer_field]
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        raise UserError(
            f"{source}: no field {missing[0]!r}; available: {', '.join(dataset.column_names)} "
            "(choose with --question-field/--answer-field, or question_field/answer_field in a recipe's data source)"
        )
    columns, dropped = _extra_columns(dataset, fields)
    rows = dataset.select_columns(list(dict.fromkeys(fields)) + columns).to_list()
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
            examples.append(Example(f"{mapping.name}-{split}-{index:06d}", question, gold, mapping.name,
                                    {name: row[name] for name in columns}))
    if not examples:
        raise UserError(f"{source}: no usable rows (rejected: {dict(rejected)})")
    kept = subset(examples, limit, seed)
    summary = PrepareSummary(
        source=source,
        split=split,
        rows_read=len(rows),
        rows_written=len(kept),
        rejected=dict(sorted(rejected.items())),
        answer_format=answer_format,
        limit=limit,
        seed=seed,
        columns=columns,
        dropped_columns=dropped,
    )
    return kept, summary


_MEDIA_FEATURES = {"Image", "Audio", "Video", "Pdf"}


def _extra_columns(dataset: Dataset, used: list[str]) -> tuple[list[str], dict[str, str]]:
    """The fields besides the question and answer ones that rows keep as columns, and those they cannot keep
    (with why): fields named like a row key or a reward function's standard argument, media, and fields whose
    values are not JSON (the rows are JSON lines)."""
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for name in dataset.column_names:
        if name in used:
            continue
        feature = type(dataset.features[name]).__name__
        if is_reserved(name):
            dropped[name] = "the name is taken"
        elif feature in _MEDIA_FEATURES:
            dropped[name] = f"{feature.lower()} data"
        elif not _is_json(dataset[name][:]):  # datasets 4 returns a Column: sliced, a list
            dropped[name] = "not JSON values"
        else:
            kept.append(name)
    return kept, dropped


def _is_json(values: list[Any]) -> bool:
    try:
        json.dumps(values)
    except (TypeError, ValueError):
        return False
    return True


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


