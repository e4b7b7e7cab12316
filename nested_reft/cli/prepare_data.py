"""`nested-reft prepare-data`: a thin adapter over `nested_reft.data.prepare` that prints its summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from nested_reft.cli.console import make_console
from nested_reft.data import PRESETS, PrepareSummary, prepare


def prepare_data(
    source: str = typer.Argument(
        ...,
        help=f"'arithmetic' (built-in generator), a preset ({', '.join(PRESETS)}), a hub data set id "
        "(owner/name or owner/name:config), or a local .jsonl/.json/.csv/.parquet file.",
        show_default=False,
    ),
    out: Path = typer.Option(..., "--out", help="Output JSONL path (a <name>.summary.json is written beside it)."),
    split: str = typer.Option("train", help="Split to read (for a local file it only labels the ids)."),
    limit: Optional[int] = typer.Option(None, help="Keep at most this many rows (a random subset drawn with --seed)."),
    seed: int = typer.Option(0, help="Seed of the --limit subset, and of the arithmetic generator."),
    question_field: Optional[str] = typer.Option(
        None, help="Field(s) holding the question; several, comma-separated, are joined with a space."
    ),
    answer_field: Optional[str] = typer.Option(None, help="Field holding the gold answer or worked solution."),
    answer_format: Optional[str] = typer.Option(
        None,
        help="How the answer field is written: gsm8k (after ####), boxed (last \\boxed{}), or plain. "
        "Local files: detected when omitted.",
    ),
    difficulty: int = typer.Option(2, help="Arithmetic only: 1 (one or two small steps) to 4 (three or four steps)."),
) -> None:
    """Turn a data set into the project's JSONL ({id, question, answer, source, ...columns} per line).

    Rows with an unparsable gold answer, an empty question or a repeated question are rejected and counted. The
    source's other fields are kept as columns, which reward functions receive as keyword arguments.

    Example: nested-reft prepare-data gsm8k --split test --out data/gsm8k-test.jsonl
    """
    summary = prepare(
        source,
        out,
        split=split,
        limit=limit,
        seed=seed,
        question_field=question_field,
        answer_field=answer_field,
        answer_format=answer_format,
        difficulty=difficulty,
    )
    console = make_console()
    console.print(_summary_table(summary))
    console.print(f"wrote {summary.out}", soft_wrap=True, highlight=False)


def _summary_table(summary: PrepareSummary) -> Table:
    table = Table(title=f"{summary.source} ({summary.split})", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("rows read", str(summary.rows_read))
    for reason, count in summary.rejected.items():
        table.add_row(f"rejected: {reason}", str(count))
    if summary.rows_over_limit:
        table.add_row("left out by --limit", str(summary.rows_over_limit))
    table.add_row("rows written", str(summary.rows_written))
    if summary.columns:
        table.add_row("columns kept", ", ".join(summary.columns))
    for name, why in summary.dropped_columns.items():
        table.add_row(f"column dropped: {name}", why)
    return table
