"""Data sets as the project's JSONL: one problem per line, `{"id", "question", "answer", "source"}`.

The package splits along its seams:
- `rows`: the row format (`Example`), reading prepared files, the preparation summary;
- `arithmetic`: the built-in generator of grade-school word problems;
- `sources`: every SOURCE (`arithmetic`, presets, hub ids, local tables) turned into rows, `prepare` and
  `load_examples` (what train, evaluate, bench and calibrate-skips read);
- `stream`: the seeded, resumable stream of training prompts.

Everything public is re-exported here, so `from nested_reft.data import Example, load_examples` is the import
to use.
"""

from nested_reft.data.arithmetic import (
    ARITHMETIC,
    ARITHMETIC_DEFAULT_SIZE,
    DEFAULT_DIFFICULTY,
    ArithmeticProblem,
    arithmetic_problems,
    generate_arithmetic,
)
from nested_reft.data.rows import ROW_KEYS, Example, PrepareSummary, read_examples
from nested_reft.data.sources import (
    ANSWER_FORMATS,
    LOCAL_SUFFIXES,
    PRESETS,
    Preset,
    load_examples,
    load_source,
    prepare,
    summary_path,
)
from nested_reft.data.stream import PromptStream

__all__ = [
    "ANSWER_FORMATS", "ARITHMETIC", "ARITHMETIC_DEFAULT_SIZE", "DEFAULT_DIFFICULTY", "LOCAL_SUFFIXES", "PRESETS",
    "ROW_KEYS", "ArithmeticProblem", "Example", "PrepareSummary", "Preset", "PromptStream", "arithmetic_problems",
    "generate_arithmetic", "load_examples", "load_source", "prepare", "read_examples", "summary_path",
]  # fmt: skip
