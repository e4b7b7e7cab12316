"""Does Nested-ReFT learn as well as baseline ReFT, with less rollout time? Runs, evaluates and summarises.

Each configuration trains the quickstart recipe (or the baseline recipe) for the same number of steps with
several seeds, then evaluates the final checkpoint greedily on the held-out problems; the starting model is
evaluated once on the same problems. Writes to --out: `summary.json` (per run: held-out pass@1, total rollout
seconds, total wall seconds; per configuration: mean and standard deviation over seeds), each run's
`metrics.jsonl`, and `curves.png` (`nested-reft plot` of every run).

    python benchmarks/learning_curves.py --steps 20 --seeds 0 1 2 --parallel 2 --threads 1

Jobs of different configurations are interleaved, so a slow phase of a shared machine hits all of them alike;
with --parallel 2 two runs share the machine at any time. Checkpoints stay in --runs-dir (not committed); a run
whose evaluation report is already there is reused, so an interrupted batch picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "nested_reft.cli.main"]
CONFIGS = {  # name -> (recipe, overrides)
    "baseline": ("recipes/baseline.yaml", []),
    "fixed-0.25": ("recipes/quickstart.yaml", ["skipping.strategy=random", "skipping.ratio=0.25"]),
    "adaptive": ("recipes/quickstart.yaml", []),  # the quickstart's target_kl
    "adaptive-0.2": ("recipes/quickstart.yaml", ["skipping.target_kl=0.2"]),
    "adaptive-0.5": ("recipes/quickstart.yaml", ["skipping.target_kl=0.5"]),
    # skip bridges trained to track the policy (skipping.robustness_weight), at two bridge learning rates
    "robust-0.2-lr1e-3": ("recipes/quickstart.yaml", ["skipping.target_kl=0.2", "skipping.robustness_weight=1.0",
                                                      "skipping.robustness_lr=1e-3"]),
    "robust-0.2-lr3e-3": ("recipes/quickstart.yaml", ["skipping.target_kl=0.2", "skipping.robustness_weight=1.0",
                                                      "skipping.robustness_lr=3e-3"]),
}
DEFAULT_CONFIGS = ["baseline", "adaptive-0.2", "robust-0.2-lr1e-3", "robust-0.2-lr3e-3"]


def run(command: list[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)


def commit() -> str:
    """The code version that ran (git HEAD of this checkout, '+dirty' with uncommitted changes)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def train_and_evaluate(config: str, seed: int, args: argparse.Namespace) -> dict:
    recipe, overrides = CONFIGS[config]
    name = f"{config}-s{seed}"
    run_dir = args.runs_dir / name
    sets = [*overrides, f"run.seed={seed}", f"run.output_dir={run_dir}", f"train.steps={args.steps}", *args.set]
    log = args.runs_dir / f"{name}.log"
    report = run_dir / "reports" / "evaluate.json"
    if not report.is_file():  # a run that finished its evaluation earlier is reused as it is
        run([*CLI, "train", recipe, "--overwrite", *[x for s in sets for x in ("--set", s)]], log, args.threads)
        (run_dir / "commit").write_text(commit() + "\n")
        run([*CLI, "evaluate", recipe, "--model", str(run_dir), "--report", str(report),
             "--limit", str(args.eval_limit),
             *[x for s in args.set for x in ("--set", s)]], log, args.threads)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saved = args.out / name
    saved.mkdir(parents=True, exist_ok=True)
    for name_ in ("metrics.jsonl", "recipe.yaml"):  # the recipe groups seeds into arms in the plot
        shutil.copy(run_dir / name_, saved / name_)
    evaluation = json.loads(report.read_text())
    made_by = run_dir / "commit"
    return {"config": config, "seed": seed, "pass@1": evaluation["metrics"]["pass@1"], "n": evaluation["n"],
            "commit": made_by.read_text().strip() if made_by.is_file() else "unknown",
            "rollout_seconds": sum(r["time_generate"] for r in rows),
            "wall_seconds": rows[-1]["time_elapsed"],
            "final_train_accuracy": statistics.mean(r["accuracy"] for r in rows[-5:]),
            "mean_skipped_layers": statistics.mean(len(r["skipped_layers"]) for r in rows),
            "mean_skipped_layers_second_half": statistics.mean(len(r["skipped_layers"]) for r in rows[len(rows) // 2:]),
            # Decoder-layer work of the rollouts against the full model's on the same tokens (the LM head and the
            # bridges, each < 1% of a layer's FLOPs per bridge, aside): 1 - this is the share of rollout FLOPs saved.
            "rollout_layer_fraction": rollout_layer_fraction(rows),
            "robust_seconds": sum(r.get("time_robust", 0.0) for r in rows),
            "steps_without_update": sum(r["update_skipped"] for r in rows)}


def rollout_layer_fraction(rows: list[dict]) -> float:
    """Token-weighted fraction of the decoder layers the rollouts ran (1.0: the full model every step)."""
    tokens = [r["completion_length"] for r in rows]  # per row; the batch size is the same every step
    return sum(t * (1.0 - r["skip_ratio"]) for t, r in zip(tokens, rows)) / sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-limit", type=int, default=200, help="Held-out problems each checkpoint is scored on.")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at a time.")
    parser.add_argument("--threads", type=int, default=2, help="Torch threads per run (OMP_NUM_THREADS).")
    parser.add_argument("--set", nargs="*", default=[], help="Extra recipe overrides for every run.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "robust")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "learning")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs_dir.mkdir(parents=True, exist_ok=True)

    start = time.time()
    jobs = [(config, seed) for seed in args.seeds for config in args.configs]  # configurations interleaved
    starting = args.runs_dir / "starting-model.json"
    with ThreadPoolExecutor(args.parallel) as pool:
        base = None if starting.is_file() else pool.submit(
            run, [*CLI, "evaluate", "recipes/quickstart.yaml", "--report", str(starting),
                  "--limit", str(args.eval_limit),
                  *[x for s in args.set for x in ("--set", s)]], args.runs_dir / "starting-model.log", args.threads)
        results = list(pool.map(lambda job: train_and_evaluate(*job, args), jobs))
        if base:
            base.result()
    start_eval = json.loads(starting.read_text())
    summary = {"steps": args.steps, "seeds": args.seeds, "threads_per_run": args.threads, "parallel": args.parallel,
               "extra_overrides": args.set, "starting_model_pass@1": start_eval["metrics"]["pass@1"],
               "n": start_eval["n"], "runs": results, "configs": {}, "seconds": time.time() - start}
    for config in args.configs:
        mine = [r for r in results if r["config"] == config]
        summary["configs"][config] = {
            key: {"mean": statistics.mean(r[key] for r in mine),
                  "std": statistics.stdev(r[key] for r in mine) if len(mine) > 1 else 0.0}
            for key in ("pass@1", "rollout_seconds", "wall_seconds", "mean_skipped_layers",
                        "mean_skipped_layers_second_half", "rollout_layer_fraction", "robust_seconds")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run([*CLI, "plot", *[str(args.out / f"{r['config']}-s{r['seed']}") for r in results],
         "--out", str(args.out / "curves.png"), "--smooth", "3"], args.runs_dir / "plot.log", args.threads)
    print(json.dumps(summary["configs"], indent=2))
    print(f"starting model pass@1 {summary['starting_model_pass@1']:.3f} (n={summary['n']}); "
          f"summary: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
