"""The project's figures: `nested-reft plot` (training runs side by side, against step and against wall-clock
seconds) and `bench --plot` (rollout tokens/sec against skip ratio).

The runs figure answers "does nested match baseline, and sooner?": each row is one quantity, the left column plots
it per step, the right per second of wall clock (so a run whose steps are cheaper reaches the same reward
further left), then one row per reward function (its mean, `rewards/<name>/mean`) and, for runs that train skip
bridges, the KL of the set they train and the policy's drift; the bottom panel splits each arm's mean step time
into its phases.

Runs that differ only by their seed (same recipe but `run.seed` and `run.output_dir`) are one *arm*: drawn as the
mean over its runs with a min-max band, in one colour, as a paper's figure shows seeds. `smooth` averages each
run's curve over a trailing window of that many steps first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nested_reft.errors import UserError
from nested_reft.rundir import RunDir

# (metrics key, axis label); eval pass@1 is drawn as markers on the accuracy panel when a run has it.
PANELS = [
    ("reward_mean", "reward (mean)"),
    ("accuracy", "accuracy (train) / eval pass@1"),
    ("skip_ratio", "skip ratio"),
    ("kl_mu_pi", "KL(mu||pi) nats/token"),
    ("ess", "ESS"),
]
# Drawn when some run logged them (skip bridges: `robustness`).
OPTIONAL_PANELS = [
    ("num_skipped", "layers skipped"),
    ("robust_kl_mu_pi", "KL(mu||pi) of the set the bridges train"),
    ("policy_drift", "policy drift per step (k3)"),
]
PHASES = ["time_generate", "time_probe", "time_score", "time_train", "time_robust"]


def read_runs(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """{label: metrics rows} per run directory; labels are folder names, made unique with their parents."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        if not (path / "metrics.jsonl").is_file():
            raise UserError(f"{path}: not a run directory with metrics (no metrics.jsonl)")
        rows = RunDir(path).read_metrics()
        if not rows:
            raise UserError(f"{path}/metrics.jsonl: no complete metrics row")
        label = path.resolve().name
        if label in runs:
            label = f"{path.resolve().parent.name}/{label}"
        runs[label] = rows
    return runs


def panels(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """(metrics key, axis label) of each row of the figure: `PANELS`, the optional panels any run logged, then
    each reward function any run logged."""
    logged = {k for rows in runs.values() for r in rows for k in r}
    rewards = dict.fromkeys(k for rows in runs.values() for r in rows for k in r
                            if k.startswith("rewards/") and k.endswith("/mean"))
    return (PANELS + [(key, label) for key, label in OPTIONAL_PANELS if key in logged]
            + [(key, f"reward: {key.split('/')[1]} (mean)") for key in rewards])


def arms(paths: list[Path], runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    """{arm label: run labels}: runs whose recipes differ only by `run.seed` and `run.output_dir` form one arm,
    labelled by the runs' common name without its seed suffix (`adaptive-s0`, `adaptive-s1` -> `adaptive`)."""
    import yaml

    groups: dict[str, list[str]] = {}
    for path, label in zip(paths, runs):
        recipe_file = path / "recipe.yaml"
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else None
        run = recipe.get("run") if isinstance(recipe, dict) else None
        if isinstance(run, dict):  # what differs between the seeds of one arm
            run.pop("seed", None)
            run.pop("output_dir", None)
        key = repr(recipe) if recipe is not None else f"name:{_stem(label)}"  # no recipe: by name alone
        groups.setdefault(key, []).append(label)
    named = {}
    for members in groups.values():
        stems = {_stem(m) for m in members}
        named[stems.pop() if len(stems) == 1 else members[0]] = members
    return named


def _stem(label: str) -> str:
    """A run's name without its seed suffix: `adaptive-s1` -> `adaptive`."""
    return re.sub(r"[-_]?s(eed)?[-_]?\d+$", "", label)


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (the first points average what there is)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def wall_seconds(rows: list[dict[str, Any]]) -> list[float]:
    """Seconds since the run started at the end of each step (`time_elapsed`, else the sum of step phases)."""
    if all("time_elapsed" in r for r in rows):
        return [r["time_elapsed"] for r in rows]
    total, out = 0.0, []
    for r in rows:
        total += sum(r.get(k, 0.0) for k in PHASES)
        out.append(total)
    return out


def plot_runs(paths: list[Path], out: Path, smooth: int = 1) -> None:
    """Draw the runs' metrics to `out` (written atomically): one curve per arm (the mean of its seeds, with a
    min-max band), each run's curve averaged over a trailing window of `smooth` steps first."""
    runs = read_runs(paths)
    groups = arms(paths, runs)
    rows_of_figure = panels(runs)
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 3 * (len(rows_of_figure) + 1)), dpi=100)
    grid = fig.add_gridspec(len(rows_of_figure) + 1, 2)
    for row, (key, title) in enumerate(rows_of_figure):
        for col, xlabel in enumerate(("step", "wall-clock seconds")):
            ax = fig.add_subplot(grid[row, col])
            for i, (arm, members) in enumerate(groups.items()):
                _draw_arm(ax, [runs[m] for m in members], key, col, smooth, f"C{i % 10}",
                          f"{arm} ({len(members)} seeds)" if len(members) > 1 else arm)
            ax.set_ylabel(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[len(rows_of_figure), :])
    bottoms = [0.0] * len(groups)
    for i, phase in enumerate(PHASES):
        means = [sum(r.get(phase, 0.0) for m in members for r in runs[m]) / sum(len(runs[m]) for m in members)
                 for members in groups.values()]
        ax.bar(list(groups), means, bottom=bottoms, color=f"C{i}", label=phase.removeprefix("time_"))
        bottoms = [b + m for b, m in zip(bottoms, means)]
    ax.set_ylabel("mean seconds per step")
    ax.tick_params(axis="x", labelrotation=20 if len(groups) > 4 else 0)  # many arm names would overlap
    ax.legend(fontsize=8)
    save_figure(fig, out)


def _draw_arm(ax, members: list[list[dict[str, Any]]], key: str, col: int, smooth: int, color: str,
              label: str) -> None:
    """One arm on one panel: the mean over its runs at each step they all reached, with a min-max band; against
    wall-clock seconds the x of a step is the runs' mean time at that step. Eval pass@1 as markers."""
    series = []
    for rows in members:
        xs = [r["step"] for r in rows] if col == 0 else wall_seconds(rows)
        points = [(r["step"], x, r[key]) for x, r in zip(xs, rows) if isinstance(r.get(key), (int, float))]
        if points:
            steps, xs, ys = zip(*points)
            series.append(dict(zip(steps, zip(xs, smoothed(list(ys), smooth)))))
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if common:
        x = [sum(s[t][0] for s in series) / len(series) for t in common]
        ys = [[s[t][1] for s in series] for t in common]
        ax.plot(x, [sum(v) / len(v) for v in ys], color=color, label=label, lw=1.4)
        if len(series) > 1:
            ax.fill_between(x, [min(v) for v in ys], [max(v) for v in ys], color=color, alpha=0.2, lw=0)
    if key == "accuracy":
        for rows in members:
            xs = [r["step"] for r in rows] if col == 0 else wall_seconds(rows)
            evals = [(x, r["eval_pass@1"]) for x, r in zip(xs, rows) if "eval_pass@1" in r]
            if evals:
                ax.plot(*zip(*evals), "o", color=color, ms=4)


def plot_bench(report: dict[str, Any], path: Path) -> None:
    """`bench --plot`: PNG of tokens/sec against skip ratio, measured and ideal (baseline x L / (L - k))."""
    plt = _pyplot()
    results = report["results"]
    base = results[0]["tokens_per_sec"]
    L = report["num_layers"]
    ratios = [r["skip_ratio"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ratios, [r["tokens_per_sec"] for r in results], "o-", label="measured")
    ax.plot(ratios, [base * L / (L - len(r["skipped_layers"])) for r in results], "--", label="ideal L/(L-k)")
    ax.set_xlabel("skip ratio")
    ax.set_ylabel("rollout tokens/sec")
    ax.set_title(f"{Path(report['model']).name} on {report['device']} ({report['what']})")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


FIGURE_FORMATS = ("png", "svg", "pdf")


def figure_format(path: Path, option: str = "--out") -> str:
    """The format a figure file's suffix names (png, svg or pdf); UserError for any other, before any work."""
    fmt = path.suffix.lower().removeprefix(".")
    if fmt not in FIGURE_FORMATS:
        raise UserError(f"{option} {path}: expected a .png, .svg or .pdf file name, found suffix '{path.suffix}'")
    return fmt


def save_figure(fig, path: Path) -> None:
    """Write `fig` to `path` in the format its suffix names, atomically (a temporary sibling, then rename), and
    release it."""
    fmt = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format=fmt)
    _pyplot().close(fig)
    tmp.replace(path)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported late: only plotting commands pay for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
