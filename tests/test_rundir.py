"""Run directories: atomic files, resume/overwrite rules, checkpoints with a `latest` pointer."""

import json

import pytest

from nested_reft.errors import UserError
from nested_reft.rundir import RunDir, atomic_write_json, atomic_write_text, resolve_model_path


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    atomic_write_json(tmp_path / "a" / "y.json", {"k": 1})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt", "y.json"]
    assert json.loads((tmp_path / "a" / "y.json").read_text()) == {"k": 1}


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_open_rules(tmp_path):
    root = tmp_path / "run"
    run = RunDir.open(root, "a: 1\n")
    assert run.recipe_path.read_text() == "a: 1\n" and run.reports_dir.is_dir() and run.checkpoints_dir.is_dir()
    RunDir.open(root, "a: 1\n")  # the same recipe again is fine
    RunDir.open(root, "a: 0\n")  # so is another recipe while the run has no results (it failed while starting)
    RunDir.open(root, "a: 1\n")
    run.log_metrics({"step": 1})
    with pytest.raises(UserError, match="different recipe.*--resume.*--overwrite"):
        RunDir.open(root, "a: 2\n")
    RunDir.open(root, "a: 2\n", resume=True)
    assert run.recipe_path.read_text() == "a: 2\n"
    RunDir.open(root, "a: 3\n", overwrite=True)
    assert not run.metrics_path.exists()
    with pytest.raises(UserError, match="nothing to resume"):
        RunDir.open(tmp_path / "empty", "a: 1\n", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(UserError, match="not a nested-reft run directory"):
        RunDir.open(tmp_path / "other", "a: 1\n")


def test_metrics_append_and_truncate(tmp_path):
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    for step in range(1, 5):
        run.log_metrics({"step": step, "loss": step / 10})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 5, "lo')  # a torn line from a crash
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]
    run.truncate_metrics(after_step=2)
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


def test_checkpoints_latest_and_keep_last(tmp_path):
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    assert run.latest_checkpoint() is None
    for step in (1, 2, 3):
        run.save_checkpoint(step, lambda d, s=step: (d / "weights.txt").write_text(str(s)), keep_last=2)
    assert [p.name for p in run.checkpoints()] == ["step-2", "step-3"]
    assert run.latest_checkpoint().name == "step-3"
    assert resolve_model_path(str(run.root)) == str(run.checkpoints_dir / "step-3")
    assert resolve_model_path("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_interrupted_checkpoint_leaves_latest_untouched(tmp_path):
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    run.save_checkpoint(1, lambda d: (d / "w").write_text("1"))

    def crash(d):
        (d / "w").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(2, crash)
    assert run.latest_checkpoint().name == "step-1"
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["latest", "step-1"]
