"""`nested-reft plot`: a PNG of runs side by side, with and without eval rows; clear errors otherwise."""

import json

from nested_reft.plotting import PANELS, panels, read_runs, wall_seconds

from .test_cli import run_cli


def write_run(folder, steps=4, eval_every=0, skip=0.0, functions=()):
    folder.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s, "skip_ratio": skip, "kl_mu_pi": skip,
               "ess": 1.0 - skip, "time_generate": 2.0, "time_probe": 0.0, "time_score": 0.1, "time_train": 3.0,
               "time_elapsed": 5.1 * s, "skipped_layers": [1, 2]}
        if eval_every and s % eval_every == 0:
            row["eval_pass@1"] = 0.02 * s
        for name in functions:  # a function that applies to no completion logs null
            row[f"rewards/{name}/mean"], row[f"rewards/{name}/std"] = (None, None) if name == "never" else (0.1, 0.0)
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


def test_each_reward_function_gets_a_row_of_its_own(tmp_path, capsys):
    custom = write_run(tmp_path / "custom", functions=("math", "short", "never"))
    plain = write_run(tmp_path / "plain", functions=("math", "format"))
    assert panels(read_runs([custom, plain])) == PANELS + [
        ("rewards/math/mean", "reward: math (mean)"), ("rewards/short/mean", "reward: short (mean)"),
        ("rewards/never/mean", "reward: never (mean)"), ("rewards/format/mean", "reward: format (mean)")]
    out = tmp_path / "runs.png"
    code, _, err = run_cli(["plot", str(custom), str(plain), "--out", str(out)], capsys)
    assert code in (0, None), err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_are_unique_and_wall_clock_falls_back_to_the_phases(tmp_path):
    a, b = write_run(tmp_path / "x" / "run"), write_run(tmp_path / "y" / "run")
    assert list(read_runs([a, b])) == ["run", "y/run"]
    rows = [{"time_generate": 1.0, "time_train": 2.0}, {"time_generate": 1.5, "time_score": 0.5}]
    assert wall_seconds(rows) == [3.0, 5.0]


def test_plot_of_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "no metrics.jsonl" in err and len(err.strip().splitlines()) == 1


def test_plot_writes_the_format_its_suffix_names(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    for suffix, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF"), (".png", b"\x89PNG")):
        out = tmp_path / f"runs{suffix}"
        code, _, err = run_cli(["plot", str(run), "--out", str(out)], capsys)
        assert code == 0, err
        assert out.read_bytes().startswith(magic), suffix
    code, _, err = run_cli(["plot", str(run), "--out", str(tmp_path / "runs.jpeg")], capsys)
    assert code == 2 and "expected a .png, .svg or .pdf file name" in err and not (tmp_path / "runs.jpeg").exists()


def test_runs_that_differ_only_by_seed_are_one_arm(tmp_path):
    import yaml

    from nested_reft.plotting import arms, read_runs, smoothed

    paths = []
    for name, seed, target in [("adaptive-s0", 0, 0.2), ("adaptive-s1", 1, 0.2), ("robust-s0", 0, 0.3)]:
        run = write_run(tmp_path / name)
        (run / "recipe.yaml").write_text(yaml.safe_dump({"run": {"seed": seed, "output_dir": str(run)},
                                                         "skipping": {"target_kl": target}}))
        paths.append(run)
    assert arms(paths, read_runs(paths)) == {"adaptive": ["adaptive-s0", "adaptive-s1"], "robust": ["robust-s0"]}
    assert smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_draws_arms_with_bands_and_smoothing(tmp_path, capsys):
    runs = [write_run(tmp_path / f"arm-s{seed}", skip=0.1 * seed) for seed in range(3)]
    out = tmp_path / "arms.png"
    code, _, err = run_cli(["plot", *map(str, runs), "--out", str(out), "--smooth", "3"], capsys)
    assert code == 0 and out.read_bytes().startswith(b"\x89PNG"), err
