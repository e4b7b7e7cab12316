"""`nested-reft bench RECIPE --compare baseline`: rollout or training-step speed with and without skipping."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import Progress

from nested_reft.bench import bench as run_bench
from nested_reft.plotting import figure_format, plot_bench as draw_plot
from nested_reft.cli.console import make_console, print_table
from nested_reft.cli.options import RecipeArgument, parse_ratios, recipe_and_overrides, set_option, show_precision
from nested_reft.errors import UserError
from nested_reft.preflight import check_skipping
from nested_reft.rundir import atomic_write_json, ensure_writable


def bench(
    recipe: Optional[Path] = RecipeArgument,
    overrides: Optional[list[str]] = set_option("rollout.max_completion_length=64"),
    compare: str = typer.Option("baseline", help="What to compare against; only 'baseline' (the full model)."),
    skip_ratios: str = typer.Option("0.1,0.25,0.4", help="Comma-separated skip ratios."),
    repeats: int = typer.Option(3, min=1, help="Interleaved repeats per mode; medians are reported."),
    what: str = typer.Option("rollout", help="'rollout' (generation only) or 'train' (whole step)."),
    report: Optional[Path] = typer.Option(None, help="JSON report. Default: <run.output_dir>/reports/bench.json."),
    plot: Optional[Path] = typer.Option(None, help="Also draw tokens/sec against skip ratio to this figure (.png, .svg or .pdf)."),
    gradient_checkpointing: str = typer.Option(
        "recipe", help="--what train: 'recipe' (train.gradient_checkpointing), 'on', 'off', or 'both' (every mode "
        "with and without; compares peak memory)."),
) -> None:
    """The same rollouts (or training steps) with the full model and with each skip ratio, side by side."""
    if compare != "baseline":
        raise UserError(f"--compare: expected 'baseline', found {compare!r}")
    if what not in ("rollout", "train"):
        raise UserError(f"--what: expected 'rollout' or 'train', found {what!r}")
    cfg = recipe_and_overrides(recipe, overrides)
    ratios = parse_ratios(skip_ratios, "--skip-ratios")
    report = report or Path(cfg.run.output_dir) / "reports" / "bench.json"
    ensure_writable(report, "--report")
    if plot:
        figure_format(plot, "--plot")
        ensure_writable(plot, "--plot")
    check_skipping(cfg)
    console = make_console()
    show_precision(console, cfg)
    with Progress(transient=True) as progress:
        task = progress.add_task("bench", total=None)
        result = run_bench(cfg, ratios, repeats=repeats, what=what, gradient_checkpointing=gradient_checkpointing,
                           progress=lambda stage: progress.update(task, description=stage))
    atomic_write_json(report, result)
    if plot:
        draw_plot(result, plot)

    title = (f"bench ({what}): {result['model']} on {result['device']}, {result['num_layers']} layers, "
             f"{result['settings']['sequences']} x {result['settings']['completion_length']} tokens, "
             f"precision {result['settings']['mixed_precision']}")
    columns = ["mode", "ratio", "k", "tok/s", "prefill s", "decode s", "peak MB", "speedup", "ideal", "effic.",
               "FLOP ideal", "FLOP effic."]
    if what == "train":
        columns += ["step s", "gen s", "score s", "train s", "step x", "train MB", "gc"]
    by_ratio = {(c["skip_ratio"], c.get("gradient_checkpointing")): c for c in result["comparisons"]}
    rows = []
    for r in result["results"]:
        c = by_ratio.get((r["skip_ratio"], r.get("gradient_checkpointing"))) if r["mode"] == "nested" else None
        ratios = [f"{c[k]:.3f}" for k in ("speedup", "ideal_speedup", "efficiency", "flop_ideal_speedup",
                                          "flop_efficiency")] if c else ["1.000", "1.000", "-", "1.000", "-"]
        row = [r["mode"], f"{r['skip_ratio']:.2f}", str(len(r["skipped_layers"])), f"{r['tokens_per_sec']:.1f}",
               f"{r['prefill_seconds']:.2f}", f"{r['decode_seconds']:.2f}", f"{r['peak_memory_mb']:.0f}", *ratios]
        if what == "train":
            row += [f"{r[k]:.2f}" for k in ("step_seconds", "generate_seconds", "score_seconds", "train_seconds")]
            row.append(f"{c['step_speedup']:.3f}" if c else "1.000")
            row += [f"{r['train_peak_memory_mb']:.0f}", "on" if r["gradient_checkpointing"] else "off"]
        rows.append(row)
    print_table(console, title, columns, rows, key_columns=2)
    print_step_split(console, result)
    if "gradient_checkpointing" in result:
        gc = result["gradient_checkpointing"]
        peak, seconds = gc["train_peak_memory_mb"], gc["train_seconds"]
        console.print(f"gradient checkpointing (baseline): update peak {peak['off']:.0f} -> {peak['on']:.0f} MB, "
                      f"update time x{seconds['on_over_off']:.2f}"
                      f"  [{result['settings']['peak_memory']}]", highlight=False, soft_wrap=True)
    console.print(f"report: {report}" + (f"   plot: {plot}" if plot else ""), soft_wrap=True, highlight=False)


def print_step_split(console, result: dict) -> None:
    """Each part's tokens/sec and the fraction of the probed matmul peak its model FLOPs reach, per mode."""
    settings = result["settings"]
    parts = ["prefill", "decode"] + (["train"] if result["what"] == "train" else [])
    columns = ["mode", "ratio", *(f"{p} tok/s" for p in parts), *(f"{p} %peak" for p in parts)]
    columns += ["step %peak"] if result["what"] == "train" else []
    rows = []
    for r in result["results"]:
        row = [r["mode"], f"{r['skip_ratio']:.2f}", *(f"{r[f'{p}_tokens_per_sec']:.1f}" for p in parts),
               *(f"{100 * r[f'{p}_peak_fraction']:.1f}" for p in parts)]
        rows.append(row + ([f"{100 * r['step_peak_fraction']:.1f}"] if result["what"] == "train" else []))
    print_table(console, f"step split: peak {settings['matmul_peak_gflops']:.0f} GFLOP/s ({settings['peak_dtype']} "
                f"matmul probe, {result['device']}); model FLOPs only", columns, rows, key_columns=2)
