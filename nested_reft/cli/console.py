"""Console output that stays readable wherever it goes: a terminal of any width, a log file, a CI log.

rich lays output out for an 80-column terminal when stdout is not a terminal, and shrinks a table that does
not fit by truncating every cell to `m…`. Here, output that is not a terminal is laid out `LOG_WIDTH` wide
(unless `COLUMNS` says otherwise), and a table wider than the console is split into several tables that each
fit, repeating the key columns, so that no header or value is ever cut.
"""

from __future__ import annotations

import os

from rich import box
from rich.console import Console
from rich.table import Table

LOG_WIDTH = 200  # logs are read in editors and CI viewers, not in an 80-column terminal


def make_console(*, stderr: bool = False) -> Console:
    """A console for a command's output: the terminal's width, or `LOG_WIDTH` when not writing to a terminal
    (an explicit `COLUMNS` wins in both cases, as rich does)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=LOG_WIDTH)
    return console


def print_table(console: Console, title: str, columns: list[str], rows: list[list[str]], *, key_columns: int = 1,
                table_box: box.Box = box.SIMPLE, left: tuple[str, ...] = ()) -> None:
    """Print a table of strings in full (right-aligned, but the columns named in `left`): when it is wider than
    the console, its columns are split over several tables that each fit, the first `key_columns` repeated in
    each (a single column too wide for the console wraps its text rather than truncate it)."""
    keys, others = list(range(key_columns)), list(range(key_columns, len(columns)))
    chunks: list[list[int]] = []
    for index in others:
        if chunks and _width(console, title, columns, rows, keys + chunks[-1] + [index], table_box, left) <= console.width:
            chunks[-1].append(index)
        else:
            chunks.append([index])
    for n, chunk in enumerate(chunks or [[]]):
        part = title if n == 0 else f"(continued, {n + 1}/{len(chunks)})"
        console.print(_table(part, columns, rows, keys + chunk, table_box, left))


def _table(title: str, columns: list[str], rows: list[list[str]], picked: list[int], table_box: box.Box,
           left: tuple[str, ...]) -> Table:
    table = Table(title=title, box=table_box)
    for index in picked:
        justify = "left" if columns[index] in left else "right"
        table.add_column(columns[index], justify=justify, no_wrap=False, overflow="fold")
    for row in rows:
        table.add_row(*(row[index] for index in picked))
    return table


def _width(console: Console, title: str, columns: list[str], rows: list[list[str]], picked: list[int],
           table_box: box.Box, left: tuple[str, ...]) -> int:
    """The width the table would take with nothing wrapped (measured without the console's own width limit)."""
    unbounded = console.options.update_width(1_000_000)
    return console.measure(_table(title, columns, rows, picked, table_box, left), options=unbounded).maximum
