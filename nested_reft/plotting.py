"""The project's figures: `nested-reft plot` (training runs side by side, against step and against wall-clock
seconds) and `bench --plot` (rollout tokens/sec against skip ratio).

The runs figure answers "does nested match baseline, and sooner?": each row is one quantity, the left column plots
it per step, the right per second of wall clock (so a run whose steps are cheaper reaches the same reward
further left), then one row per reward function (its mean, `rewards/<name>/mean`), and the bottom panel splits
each run's mean step time into its phases.
"""

from __future__ import annotations

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
PHASES = ["time_generate", "time_probe", "time_score", "time_train"]


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
    """(metrics key, axis label) of each row of the figure: `PANELS`, then each reward function any run logged."""
    keys = dict.fromkeys(k for rows in runs.values() for r in rows for k in r
                         if k.startswith("rewards/") and k.endswith("/mean"))
    return PANELS + [(key, f"reward: {key.split('/')[1]} (mean)") for key in keys]


def wall_seconds(rows: list[dict[str, Any]]) -> list[float]:
    """Seconds since the run started at the end of each step (`time_elapsed`, else the sum of step phases)."""
    if all("time_elapsed" in r for r in rows):
        return [r["time_elapsed"] for r in rows]
    total, out = 0.0, []
    for r in rows:
        total += sum(r.get(k, 0.0) for k in PHASES)
        out.append(total)
    return out


def plot_runs(paths: list[Path], out: Path) -> None:
    """Draw the runs' metrics to the PNG `out` (written atomically)."""
    runs = read_runs(paths)
    rows_of_figure = panels(runs)
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 3 * (len(rows_of_figure) + 1)), dpi=100)
    grid = fig.add_gridspec(len(rows_of_figure) + 1, 2)
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    for row, (key, title) in enumerate(rows_of_figure):
        for col, xlabel in enumerate(("step", "wall-clock seconds")):
            ax = fig.add_subplot(grid[row, col])
            for label, rows in runs.items():
                xs = [r["step"] for r in rows] if col == 0 else wall_seconds(rows)
                points = [(x, r[key]) for x, r in zip(xs, rows) if isinstance(r.get(key), (int, float))]
                if points:
                    ax.plot(*zip(*points), color=colors[label], label=label, lw=1.2)
                if key == "accuracy":
                    evals = [(x, r["eval_pass@1"]) for x, r in zip(xs, rows) if "eval_pass@1" in r]
                    if evals:
                        ax.plot(*zip(*evals), "o--", color=colors[label], ms=5, label=f"{label} eval pass@1")
            ax.set_ylabel(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[len(rows_of_figure), :])
    bottoms = [0.0] * len(runs)
    for i, phase in enumerate(PHASES):
        means = [sum(r.get(phase, 0.0) for r in rows) / len(rows) for rows in runs.values()]
        ax.bar(list(runs), means, bottom=bottoms, color=f"C{i}", label=phase.removeprefix("time_"))
        bottoms = [b + m for b, m in zip(bottoms, means)]
    ax.set_ylabel("mean seconds per step")
    ax.tick_params(axis="x", labelrotation=20 if len(runs) > 4 else 0)  # many run names would overlap
    ax.legend(fontsize=8)
    save_figure(fig, out)


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
