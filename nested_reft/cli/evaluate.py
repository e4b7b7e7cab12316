"""`nested-reft evaluate`: accuracy of a model or checkpoint, as a JSON report and an exit code CI can gate on."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.progress import Progress

from nested_reft.cli.console import make_console, print_table
from nested_reft.cli.options import RecipeArgument, recipe_and_overrides, set_option, show_precision
from nested_reft.evaluate import check_sampling
from nested_reft.evaluate import evaluate as run_evaluation
from nested_reft.preflight import check_rewards
from nested_reft.rundir import ensure_writable, resolve_model_path


def evaluate(
    recipe: Optional[Path] = RecipeArgument,
    overrides: Optional[list[str]] = set_option("data.eval_limit=20"),
    model: Optional[str] = typer.Option(None, help="Model folder, alias, .gguf or run directory (its latest checkpoint). Default: the recipe's model."),
    data: Optional[str] = typer.Option(None, help="Data file, preset or 'arithmetic'. Default: the recipe's data.eval."),
    split: Optional[str] = typer.Option(None, help="Split of a preset or built-in source. Default: data.eval_split."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate N examples drawn at random with run.seed (the same "
                                        "N for the same seed and file, in file order). Default: data.eval_limit."),
    samples: int = typer.Option(1, min=1, help="Completions per example (K); K > 1 adds pass@k and maj@k."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="Default: rollout.max_completion_length."),
    batch_size: int = typer.Option(64, min=1, help="Completions decoded together; lower it if memory is short."),
    report: Optional[Path] = typer.Option(None, help="JSON report path. Default: <run>/reports/evaluate.json for a run directory, else reports/evaluate.json."),
    min_accuracy: Optional[float] = typer.Option(None, help="Exit with code 1 when pass@1 is below this."),
    compare: Optional[str] = typer.Option(None, help="Also evaluate this model (e.g. the starting one) on the same problems with the same settings, side by side; its report goes beside --report as *.compare.json."),
) -> None:
    """Measure pass@1 (and pass@k, maj@k) with the full model; write a JSON report and per-example JSONL."""
    cfg = recipe_and_overrides(recipe, overrides)
    model_spec = model or cfg.model.name_or_path
    data_spec = data or cfg.data.eval or cfg.data.train
    if report is None:
        is_run = resolve_model_path(model_spec) != model_spec
        report = (Path(model_spec) / "reports" if is_run else Path("reports")) / "evaluate.json"
    jobs = [(model_spec, report)] + ([(compare, report.with_name(f"{report.stem}.compare.json"))] if compare else [])
    for _, path in jobs:  # before any model loads
        ensure_writable(path, "--report")
        ensure_writable(path.with_suffix(".examples.jsonl"), "--report")
    check_sampling(samples, temperature)
    check_rewards(cfg, max_new_tokens or cfg.rollout.max_completion_length)
    results = []
    console = make_console()
    show_precision(console, cfg)
    with Progress(transient=True, console=console) as progress:
        for spec, path in jobs:
            task = progress.add_task(f"evaluate {spec}", total=None)
            results.append(run_evaluation(
                spec, data_spec, split=split or cfg.data.eval_split,
                limit=limit if limit is not None else cfg.data.eval_limit, samples=samples, temperature=temperature,
                max_new_tokens=max_new_tokens or cfg.rollout.max_completion_length, data_cfg=cfg.data,
                reward_cfg=cfg.reward, dtype=cfg.model.dtype, device=cfg.model.device,
                mixed_precision=cfg.model.mixed_precision, head_dtype=cfg.model.head_dtype, seed=cfg.run.seed,
                report_path=path, on_batch=lambda n, task=task: progress.advance(task, n),
                kv_cache=cfg.rollout.kv_cache, cuda_graphs=cfg.rollout.cuda_graphs, batch_size=batch_size,
                compile=cfg.rollout.compile,
            ))
    result = results[0]
    rows = [[spec, *("-" if v is None else f"{v:.3f}" for v in r["metrics"].values()), f"{r['tokens_per_sec']:.1f}",
             f"{r['seconds']:.1f}"] for (spec, _), r in zip(jobs, results)]
    print_table(console, f"evaluate on {data_spec} (n={result['n']})",
                ["model", *result["metrics"], "tokens/sec", "seconds"], rows, left=("model",),
                table_box=box.HEAVY_HEAD)
    console.print(f"report: {report}  examples: {report.with_suffix('.examples.jsonl')}"
                  + (f"  compared: {jobs[1][1]}" if compare else ""), soft_wrap=True, highlight=False)
    if min_accuracy is not None and result["metrics"]["pass@1"] < min_accuracy:
        console.print(f"[red]pass@1 {result['metrics']['pass@1']:.3f} is below --min-accuracy {min_accuracy}[/]")
        raise typer.Exit(1)
