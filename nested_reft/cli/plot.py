"""`nested-reft plot RUN [RUN ...] --out FILE.png|svg|pdf`: training curves of runs side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nested_reft.plotting import figure_format, plot_runs


def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories (each with a metrics.jsonl).", show_default=False),
    out: Path = typer.Option(..., "--out", help="Figure to write: .png, .svg or .pdf."),
    smooth: int = typer.Option(1, "--smooth", min=1, help="Average each run's curves over a trailing window of N steps."),
) -> None:
    """Reward, accuracy (and eval pass@1), skip ratio, KL(mu||pi), ESS, each reward function's mean and the time
    split of runs, against step and against wall-clock seconds. Runs that differ only by seed are drawn as one
    arm: their mean with a min-max band."""
    figure_format(out)  # a suffix we cannot write is an error before any run is read
    plot_runs(runs, out, smooth)
    Console().print(f"plot: {out}")
