"""The project's JSONL rows: one problem per line, `{"id", "question", "answer", "source"}`.

`Example` is one row; `read_examples` reads a prepared file and names `FILE:LINE` of any bad row;
`PrepareSummary` says what preparing a source kept and rejected. Every other data module builds on these.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nested_reft.errors import UserError

ROW_KEYS = ("id", "question", "answer", "source")


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


def is_project_jsonl(path: Path) -> bool:
    """Whether the first row of `path` has exactly the project's keys (else it is raw data for `load_source`)."""
    if not path.is_file():
        return False
    first = next((line for line in _text_lines(path) if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and sorted(row) == sorted(ROW_KEYS)


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
