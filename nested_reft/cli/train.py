"""`nested-reft train RECIPE`: the RL loop, with a live display of each step's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nested_reft.cli.options import RecipeArgument, SetOption, recipe_and_overrides
from nested_reft.distributed import env_rank
from nested_reft.trainer import train as run_training


def train(
    recipe: Optional[Path] = RecipeArgument,
    overrides: Optional[list[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in run.output_dir from its latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever run is in run.output_dir."),
) -> None:
    """Train with GRPO on rollouts from the layer-skipped behavior model (baseline ReFT when nothing is skipped)."""
    cfg = recipe_and_overrides(recipe, overrides)
    if env_rank() != 0:  # under torchrun rank 0 shows the (global) progress; the others train quietly
        run_training(cfg, resume=resume, overwrite=overwrite)
        return
    console = Console()
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[last]}")]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=cfg.train.steps, last="loading model and data")

        def on_step(row: dict) -> None:
            line = (f"reward {row['reward_mean']:.3f}  acc {row['accuracy']:.3f}  skip {len(row['skipped_layers'])} "
                    f"layers  kl {row['kl_mu_pi']:.2f}")
            if "target_kl" in row:  # the adaptive controller: target, measurement, decision
                line += f" (target {row['target_kl']:.2f}: {row['skip_decision']} to {row['next_num_skipped']})"
            line += f"  ess {row['ess']:.2f}  {row['rollout_tokens_per_sec']:.0f} tok/s"
            line += "  no signal: update skipped" if row["update_skipped"] else f"  loss {row['loss']:+.4f}"
            if "eval_pass@1" in row:
                line += f"  eval pass@1 {row['eval_pass@1']:.3f}"
            progress.update(task, completed=row["step"], last=line)
            if "warning" in row:
                progress.console.print(f"[yellow]warning[/] (step {row['step']}): {escape(row['warning'])}")

        run = run_training(cfg, resume=resume, overwrite=overwrite, on_step=on_step)
    console.print(f"run directory: [bold]{run.root}[/]  (metrics: {run.metrics_path}, "
                  f"latest checkpoint: {run.latest_checkpoint()})")
    reports = sorted(run.reports_dir.glob("eval-step-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if reports:
        console.print(f"eval report: [bold]{reports[-1]}[/]")
