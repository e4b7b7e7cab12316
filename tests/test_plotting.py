"""`nested-reft plot`: a PNG of runs side by side, with and without eval rows; clear errors otherwise."""

import json

from nested_reft.plotting import read_runs, wall_seconds

from .test_cli import run_cli


def write_run(folder, steps=4, eval_every=0, skip=0.0):
    folder.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s, "skip_ratio": skip, "kl_mu_pi": skip,
               "ess": 1.0 - skip, "time_generate": 2.0, "time_probe": 0.0, "time_score": 0.1, "time_train": 3.0,
               "time_elapsed": 5.1 * s, "skipped_layers": [1, 2]}
        if eval_every and s % eval_every == 0:
            row["eval_pass@1"] = 0.02 * s
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plot_writes_a_png_for_runs_with_and_without_eval(tmp_path, capsys):
    baseline = write_run(tmp_path / "baseline", eval_every=2)
    nested = write_run(tmp_path / "nested", skip=0.1)
    out = tmp_path / "plots" / "runs.png"
    code, stdout, err = run_cli(["plot", str(baseline), str(nested), "--out", str(out)], capsys)
    assert code in (0, None), err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_labels_are_unique_and_wall_clock_falls_back_to_the_phases(tmp_path):
    a, b = write_run(tmp_path / "x" / "run"), write_run(tmp_path / "y" / "run")
    assert list(read_runs([a, b])) == ["run", "y/run"]
    rows = [{"time_generate": 1.0, "time_train": 2.0}, {"time_generate": 1.5, "time_score": 0.5}]
    assert wall_seconds(rows) == [3.0, 5.0]


def test_plot_of_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
