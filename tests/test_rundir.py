"""Run directories: atomic files, resume/overwrite rules, checkpoints with a `latest` pointer."""

import errno
import json
import os
import subprocess

import pytest

from nested_reft.errors import UserError
from nested_reft.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    ensure_writable,
    ordinary_mode,
    resolve_model_path,
)

from .launch import REPO


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    atomic_write_json(tmp_path / "a" / "y.json", {"k": 1})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt", "y.json"]
    assert json.loads((tmp_path / "a" / "y.json").read_text()) == {"k": 1}


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()],
                         ids=["io-error", "interrupt"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, failure):
    """The write path itself fails (after the temporary file holds the new text): the old file stays, the
    temporary goes, and an OSError is a one-line UserError."""
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})
    written = []

    def failing_fsync(fd):
        written.extend(p.read_text() for p in tmp_path.glob(".x.json.*.tmp"))
        raise failure

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(UserError if isinstance(failure, OSError) else KeyboardInterrupt) as e:
        atomic_write_json(target, {"v": 2})
    assert written == ['{\n  "v": 2\n}\n']  # the new text had reached the temporary file
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    if isinstance(failure, OSError):
        assert "x.json: cannot write (Input/output error)" in str(e.value)


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
    for step in (2, 3):
        atomic_write_text(run.rollouts_dir / f"step-{step}.jsonl", "{}\n")
        run.write_report(f"eval-step-{step}", {})
    run.write_report("calibration", {})
    run.truncate_metrics(after_step=2)
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    assert sorted(p.name for p in run.rollouts_dir.iterdir()) == ["step-2.jsonl"]
    assert sorted(p.name for p in run.reports_dir.iterdir()) == ["calibration.json", "eval-step-2.json"]


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


# -- review defects: what --overwrite may delete, re-runs, resume without a checkpoint, pruning -------------------


def write_weights(step):
    return lambda folder: (folder / "weights.txt").write_text(str(step))


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, monkeypatch):
    """`run.output_dir=.` with --overwrite used to delete the working directory."""
    (tmp_path / "precious.txt").write_text("x")
    (tmp_path / "recipe.yaml").write_text("mine: 1\n")  # a user's own recipe there does not make it a run
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"not a nested-reft run directory \(it holds precious\.txt\); --overwrite"):
        RunDir.open(".", "a: 1\n", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt", "recipe.yaml"]
    assert (tmp_path / "recipe.yaml").read_text() == "mine: 1\n"


def test_overwrite_replaces_only_the_run_layout(tmp_path):
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    run.log_metrics({"step": 1})
    run.save_checkpoint(1, write_weights(1))
    (run.root / ".metrics.jsonl.abc.tmp").write_text("")  # a crash's leftover is part of the run
    RunDir.open(run.root, "a: 2\n", overwrite=True)
    assert sorted(p.name for p in run.root.iterdir()) == ["checkpoints", "recipe.yaml", "reports"]
    assert run.recipe_path.read_text() == "a: 2\n" and not run.checkpoints()


def test_overwrite_keeps_the_reports_measured_before_the_run(tmp_path):
    """calibrate-skips writes reports/calibration.json by default and tells the user to pass it as
    skipping.calibration_file; the quickstart always overwrites: the profile must outlive that."""
    reports = tmp_path / "run" / "reports"
    atomic_write_json(reports / "calibration.json", {"num_layers": 4})
    atomic_write_json(reports / "bench.json", {"results": []})
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    run.log_metrics({"step": 1})
    run.write_report("eval-step-1", {})
    run.write_report("layer_costs", {})
    RunDir.open(run.root, "a: 1\n", overwrite=True)
    assert sorted(p.name for p in reports.iterdir()) == ["bench.json", "calibration.json"]
    assert not run.metrics_path.exists()


def test_outputs_have_the_modes_of_ordinary_files_and_folders(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "data.jsonl", "{}\n")
        run = RunDir.open(tmp_path / "run", "a: 1\n")
        checkpoint = run.save_checkpoint(1, write_weights(1))
        assert ordinary_mode() == 0o644 and ordinary_mode(folder=True) == 0o755
        assert (tmp_path / "data.jsonl").stat().st_mode & 0o777 == 0o644
        assert run.recipe_path.stat().st_mode & 0o777 == 0o644
        assert checkpoint.stat().st_mode & 0o777 == 0o755
        assert (checkpoint / "weights.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)  # a user who wants private outputs gets them
        atomic_write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_same_recipe_rerun_with_results_needs_resume_or_overwrite(tmp_path):
    """It used to restart at step 1 and append to the old metrics (duplicated rows)."""
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    run.log_metrics({"step": 1})
    with pytest.raises(UserError, match=r"holds a run with results; pass --resume to continue it or --overwrite"):
        RunDir.open(run.root, "a: 1\n")
    assert [r["step"] for r in run.read_metrics()] == [1]


def test_resume_before_any_checkpoint_starts_over(tmp_path):
    """It used to restart at step 1 and append to the old metrics."""
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    for step in (1, 2, 3):
        run.log_metrics({"step": step})
    atomic_write_text(run.rollouts_dir / "step-2.jsonl", "{}\n")
    resumed = RunDir.open(run.root, "a: 1\n", resume=True)
    assert resumed.latest_checkpoint() is None
    assert resumed.read_metrics() == [] and not list(run.rollouts_dir.iterdir())
    resumed.log_metrics({"step": 1})
    assert [r["step"] for r in resumed.read_metrics()] == [1]


def test_resume_drops_what_was_logged_after_the_latest_checkpoint(tmp_path):
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    for step in (1, 2, 3):
        run.log_metrics({"step": step})
        atomic_write_text(run.rollouts_dir / f"step-{step}.jsonl", "{}\n")
        if step == 2:
            run.save_checkpoint(step, write_weights(step))
    RunDir.open(run.root, "a: 1\n", resume=True)
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    assert sorted(p.name for p in run.rollouts_dir.iterdir()) == ["step-1.jsonl", "step-2.jsonl"]


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """Checkpoints of later steps (from a run that got further) used to count as newer: keep_last pruning then
    deleted the checkpoint just written and left `latest` naming a folder that no longer existed."""
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    for step in (5, 6):
        run.save_checkpoint(step, write_weights(step), keep_last=2)
    run.save_checkpoint(1, write_weights(1), keep_last=2)
    assert run.latest_checkpoint().name == "step-1"
    assert (run.latest_checkpoint() / "weights.txt").read_text() == "1"
    run.save_checkpoint(2, write_weights(2), keep_last=1)
    assert [p.name for p in run.checkpoints()] == ["step-2", "step-5", "step-6"]  # later steps are not counted
    run.save_checkpoint(5, write_weights("5 again"), keep_last=1)  # ...and are replaced when their step comes
    assert [p.name for p in run.checkpoints()] == ["step-5", "step-6"]
    assert (run.latest_checkpoint() / "weights.txt").read_text() == "5 again"


def test_a_missing_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    for step in (1, 2):
        run.save_checkpoint(step, write_weights(step))
    (run.checkpoints_dir / "latest").unlink()  # a crash between the rename and the pointer update
    assert run.latest_checkpoint().name == "step-2"


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"),
     RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")],  # safetensors
    ids=["oserror", "safetensors"],
)
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, error):
    run = RunDir.open(tmp_path / "run", "a: 1\n")
    run.save_checkpoint(1, write_weights(1), keep_last=1)

    def fill_the_disk(folder):
        (folder / "weights.txt").write_text("half")
        raise error

    with pytest.raises(UserError, match=r"cannot write checkpoint step-2 \(no space left on device\); the previous "
                                         r"checkpoint step-1 is intact; free space, then continue with --resume"):
        run.save_checkpoint(2, fill_the_disk, keep_last=1)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["latest", "step-1"]
    assert (run.latest_checkpoint() / "weights.txt").read_text() == "1"


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda tmp: tmp / "file.txt" / "run", r"cannot create folder .*file\.txt is a file"),
        (lambda tmp: tmp / "file.txt", "is a file; expected a folder"),
        (lambda tmp: "/proc/nested-reft-test/run", "cannot write in /proc"),  # refused even to root
    ],
    ids=["under-a-file", "a-file", "unwritable"],
)
def test_output_folder_that_cannot_be_created_is_a_one_line_error(tmp_path, make_path, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match=message) as e:
        RunDir.open(make_path(tmp_path), "a: 1\n")
    assert str(e.value).startswith("run.output_dir ") and "\n" not in str(e.value)


def test_ensure_writable_creates_nothing(tmp_path):
    ensure_writable(tmp_path / "a" / "b" / "report.json", "--report")
    ensure_writable(tmp_path / "x" / "y", "--out", folder=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match=r"--report .*: is a folder; expected a file path"):
        ensure_writable(tmp_path, "--report")


def test_a_folder_that_is_a_broken_symbolic_link_is_named(tmp_path):
    """A committed or copied link to another machine's folder: mkdir only says "File exists"."""
    (tmp_path / "data").symlink_to(tmp_path / "elsewhere" / "data")
    out = tmp_path / "data" / "train.jsonl"
    expected = r"data is a symbolic link to .*elsewhere/data, which does not exist"
    with pytest.raises(UserError, match=r"--out .*train\.jsonl: cannot write \(.*" + expected):
        ensure_writable(out, "--out")
    with pytest.raises(UserError, match=expected):
        atomic_write_text(out, "x")
    with pytest.raises(UserError, match=expected):
        ensure_writable(tmp_path / "data" / "run", "run.output_dir", folder=True)


def test_the_repository_tracks_no_symbolic_links():
    """A tracked link points into one machine's folders: on a fresh clone it dangles (the quickstart's `data`
    link to a study folder once broke `prepare-data` there)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert [line.split("\t")[1] for line in listing.splitlines() if line.startswith("120000")] == []
