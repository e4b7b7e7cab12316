"""`nested-reft calibrate-skips RECIPE`: per-layer and per-ratio costs of skipping, for `strategy: calibrated`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import Progress

from nested_reft.calibrate import calibrate
from nested_reft.cli.console import make_console, print_table
from nested_reft.cli.options import RecipeArgument, parse_ratios, recipe_and_overrides, set_option, show_precision
from nested_reft.preflight import check_skipping
from nested_reft.rundir import atomic_write_json, ensure_writable


def calibrate_skips(
    recipe: Optional[Path] = RecipeArgument,
    overrides: Optional[list[str]] = set_option("skipping.keep_first=2"),
    out: Optional[Path] = typer.Option(None, help="Report path. Default: <run.output_dir>/reports/calibration.json."),
    ratios: str = typer.Option("0.1,0.25,0.4", help="Comma-separated skip ratios to measure."),
    prompts: int = typer.Option(8, min=1, help="Training prompts to sample and measure on."),
) -> None:
    """Measure KL, greedy agreement, importance weights and rollout speed of skipping each layer and each ratio."""
    cfg = recipe_and_overrides(recipe, overrides)
    ratio_values = parse_ratios(ratios, "--ratios")
    out = out or Path(cfg.run.output_dir) / "reports" / "calibration.json"
    ensure_writable(out, "--out")
    check_skipping(cfg, calibrating=True)
    console = make_console()
    show_precision(console, cfg)
    with Progress(console=console) as progress:
        task = progress.add_task("calibrating", total=None)
        report = calibrate(cfg, ratio_values, prompts,
                           progress=lambda stage: progress.update(task, advance=1, description=stage))
    atomic_write_json(out, report)

    title = (f"skip calibration: {report['model']} ({report['num_layers']} layers, {report['num_prompts']} prompts); "
             "KL(full||skipped), greedy agreement, rho = pi/mu")
    columns = ["ratio", "k", "KL", "agree", "rho", "rho p95", "rho max", "ESS", "tok/s", "full", "speedup", "ideal"]
    rows = [[f"{r['ratio']:.2f}", str(r["num_skipped"]), f"{r['kl']:.4f}", f"{r['greedy_agreement']:.3f}",
             f"{r['rho_mean']:.3f}", f"{r['rho_p95']:.3f}", f"{r['rho_max']:.1f}", f"{r['ess']:.3f}",
             f"{r['tokens_per_sec']:.1f}", f"{r['full_tokens_per_sec']:.1f}", f"{r['speedup']:.2f}",
             f"{r['ideal_speedup']:.2f}"] for r in report["ratios"]]
    print_table(console, title, columns, rows)
    cheapest = sorted(report["layers"], key=lambda e: e["kl"])[:5]
    console.print("cheapest layers to skip (KL): " + ", ".join(f"{e['layer']} ({e['kl']:.4f})" for e in cheapest),
                  soft_wrap=True, highlight=False)
    console.print(f"report: {out}   (use it with skipping.strategy=calibrated skipping.calibration_file={out})",
                  soft_wrap=True, highlight=False)
