"""`nested-reft train RECIPE`: the RL loop, with a live display of each step's metrics (one line per step when
the output is a log file rather than a terminal)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nested_reft.cli.console import make_console
from nested_reft.cli.options import RecipeArgument, recipe_and_overrides, set_option, show_precision
from nested_reft.distributed import env_rank
from nested_reft.errors import UserError
from nested_reft.preflight import check_training
from nested_reft.recipe import Recipe
from nested_reft.rundir import RunDir
from nested_reft.stopping import GracefulStop, TrainingStopped, signal_name
from nested_reft.trainer import train as run_training


def train(
    recipe: Optional[Path] = RecipeArgument,
    overrides: Optional[list[str]] = set_option("train.steps=3"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in run.output_dir from its latest checkpoint (from the start when it has none)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in run.output_dir (only ever a nested-reft run directory; its reports/calibration.json and bench.json, measured before it, stay)."),
) -> None:
    """Train with GRPO on rollouts from the layer-skipped behavior model (baseline ReFT when nothing is skipped)."""
    cfg = recipe_and_overrides(recipe, overrides)
    if env_rank() != 0:  # under torchrun rank 0 shows the (global) progress; the others train quietly
        with GracefulStop() as stop:  # torchrun forwards the signal to every rank: they agree where to stop
            run_training(cfg, resume=resume, overwrite=overwrite, stop=stop)
        return
    check_training(cfg)
    console = make_console()
    show_precision(console, cfg)

    def notify(signum: int) -> None:
        console.print(f"[yellow]{signal_name(signum)}: stopping at the next safe point, then checkpointing the last "
                      "finished step (Ctrl-C again, a second later, stops at once)[/]", soft_wrap=True,
                      highlight=False)

    try:
        with GracefulStop(on_request=notify) as stop:
            if console.is_terminal:
                run = _train_with_progress(cfg, console, resume=resume, overwrite=overwrite, stop=stop)
            else:  # a log file: one line per step rather than the frames of a progress bar
                def on_step(row: dict[str, Any]) -> None:
                    console.print(f"step {row['step']}/{cfg.train.steps}  {_summary(row)}", soft_wrap=True,
                                  highlight=False)
                    _print_warning(console, row)

                run = run_training(cfg, resume=resume, overwrite=overwrite, on_step=on_step, stop=stop)
    except KeyboardInterrupt:
        raise TrainingStopped(None, _latest_checkpoint(cfg), signal.SIGINT) from None
    console.print(f"run directory: [bold]{run.root}[/]  (metrics: {run.metrics_path}, "
                  f"latest checkpoint: {run.latest_checkpoint()})", soft_wrap=True, highlight=False)
    reports = sorted(run.reports_dir.glob("eval-step-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if reports:
        console.print(f"eval report: [bold]{reports[-1]}[/]", soft_wrap=True, highlight=False)


def _train_with_progress(cfg: Recipe, console: Console, **options: Any) -> RunDir:
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[last]}")]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=cfg.train.steps, last="loading model and data")

        def on_step(row: dict[str, Any]) -> None:
            progress.update(task, completed=row["step"], last=_summary(row))
            _print_warning(progress.console, row)

        return run_training(cfg, on_step=on_step, **options)


def _summary(row: dict[str, Any]) -> str:
    line = f"reward {row['reward_mean']:.3f}{_per_function(row)}  acc {row['accuracy']:.3f}  " \
           f"skip {len(row['skipped_layers'])} layers  kl {row['kl_mu_pi']:.2f}"
    if "target_kl" in row:  # the adaptive controller: target, measurement, decision
        line += f" (target {row['target_kl']:.2f}: {row['skip_decision']} to {row['next_num_skipped']})"
    if "robust_kl_mu_pi" in row:  # the skip bridges: the KL of the set they train, and the policy's drift
        line += (f"  bridges: kl {row['robust_kl_mu_pi']:.2f} at {len(row['robust_skipped_layers'])} layers, "
                 f"drift {row['policy_drift']:.1e}")
    line += f"  ess {row['ess']:.2f}  {row['rollout_tokens_per_sec']:.0f} tok/s"
    line += "  no signal: update skipped" if row["update_skipped"] else f"  loss {row['loss']:+.4f}"
    if "eval_pass@1" in row:
        line += f"  eval pass@1 {row['eval_pass@1']:.3f}"
    return line


def _per_function(row: dict[str, Any]) -> str:
    """' (math 0.50 format 0.25)': each reward function's mean, '-' where it applied to no completion."""
    means = [(key.split("/")[1], value) for key, value in row.items()
             if key.startswith("rewards/") and key.endswith("/mean")]
    return " (" + " ".join(f"{name} {'-' if v is None else f'{v:.2f}'}" for name, v in means) + ")" if means else ""


def _print_warning(console: Console, row: dict[str, Any]) -> None:
    """The trainer's training-health warning for this step, if any, on a line of its own."""
    if "warning" in row:
        console.print(f"[yellow]warning[/] (step {row['step']}): {escape(row['warning'])}", soft_wrap=True,
                      highlight=False)


def _latest_checkpoint(cfg: Recipe) -> Path | None:
    try:
        return RunDir(Path(cfg.run.output_dir)).latest_checkpoint()
    except UserError:
        return None
