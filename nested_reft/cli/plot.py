"""`nested-reft plot RUN [RUN ...] --out FILE.png`: training curves of runs side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nested_reft.plotting import plot_runs


def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories (each with a metrics.jsonl).", show_default=False),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
) -> None:
    """Reward, accuracy (and eval pass@1), skip ratio, KL(mu||pi), ESS, each reward function's mean and the time
    split of runs, against step and against wall-clock seconds."""
    plot_runs(runs, out)
    Console().print(f"plot: {out}")
