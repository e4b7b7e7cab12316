"""The project's JSONL rows: one problem per line, `{"id", "question", "answer", "source", ...columns}`.

The four keys are every row's; any other key is a column of the row's own (a difficulty, test cases, a reference
solution), kept from the source by `prepare` and handed to reward functions as a keyword argument. `Example` is one
row; `read_examples` reads a prepared file and names `FILE:LINE` of any bad row;
`PrepareSummary` says what preparing a source kept and rejected. Every other data module builds on these.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nested_reft.errors import UserError

ROW_KEYS = ("id", "question", "answer", "source")
# Reward functions receive every column as a keyword argument beside these (TRL's names, and the step).
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "step")


@dataclass(frozen=True)
class Example:
    """One problem, as a row of the project's JSONL. `answer` is the normalised gold answer; `columns` are the
    row's other fields (JSON values)."""

    id: str
    question: str
    answer: str
    source: str
    columns: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> str:
        """The JSONL line (without newline): the keys of `ROW_KEYS` in order, then the columns; non-ASCII kept."""
        row = {"id": self.id, "question": self.question, "answer": self.answer, "source": self.source}
        return json.dumps({**row, **self.columns}, ensure_ascii=False)


def is_reserved(name: str) -> bool:
    """Whether a field cannot be a column: a row key, or a name reward functions receive something else under."""
    return name in ROW_KEYS or name in RESERVED_COLUMNS


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
    columns: list[str] = field(default_factory=list)  # the source's other fields, kept in every row
    dropped_columns: dict[str, str] = field(default_factory=dict)  # field -> why it could not be kept

    @property
    def rows_over_limit(self) -> int:
        """Usable rows that --limit left out."""
        return self.rows_read - sum(self.rejected.values()) - self.rows_written

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": None if self.out is None else str(self.out)}


def read_examples(path: Path) -> list[Example]:
    """Read a JSONL file written by `prepare`. A bad row is a UserError naming `FILE:LINE`; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    examples: list[Example] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(_text_lines(path), start=1):
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


def _parse_row(line: str, *, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict) or not set(ROW_KEYS) <= set(row):
        found = ", ".join(row) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        raise UserError(
            f"{where}: expected an object with keys {', '.join(ROW_KEYS)} (and any columns), found {found} "
            "(convert raw data with `nested-reft prepare-data`)"
        )
    for key in ROW_KEYS:
        if not isinstance(row[key], str) or not row[key].strip():
            raise UserError(f"{where}: {key!r} must be a non-empty string, found {row[key]!r}")
    columns = {key: value for key, value in row.items() if key not in ROW_KEYS}
    reserved = next((key for key in columns if is_reserved(key)), None)
    if reserved is not None:
        raise UserError(f"{where}: a column may not be named {reserved!r} (reward functions receive "
                        f"{', '.join(RESERVED_COLUMNS)} under these names); rename it")
    return Example(row["id"], row["question"], row["answer"], row["source"], columns)


def is_project_jsonl(path: Path) -> bool:
    """Whether the first row of `path` has the project's keys (else it is raw data for `load_source`)."""
    if not path.is_file():
        return False
    first = next((line for line in _text_lines(path) if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and set(ROW_KEYS) <= set(row)


def subset(items: list[Example], limit: int | None, seed: int) -> list[Example]:
    """`limit` items drawn at random with `seed`, in their original order (all of them without a limit)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def _text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a binary or otherwise undecodable file is a one-line UserError."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected JSON lines") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
