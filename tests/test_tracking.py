"""Experiment tracking: flattened scalars, TensorBoard events read back with TensorBoard's own reader, the
missing-extra error, and W&B in offline mode (only where wandb is installed: it is an optional extra)."""

import importlib.util
import math

import pytest

from nested_reft import tracking
from nested_reft.errors import UserError
from nested_reft.tracking import Tracker, check_available, scalars


def rows(steps, offset=0.0):
    return [{"step": s, "reward_mean": s / 10 + offset, "accuracy": 0.5, "skipped_layers": [1, 2], "ok": True,
             "timing": {"generate": 1.5, "train": 2}, "note": "text", "eval_pass@1": None} for s in steps]


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def test_scalars_keeps_numbers_and_flattens_mappings():
    assert scalars(rows([3])[0]) == {"reward_mean": 0.3, "accuracy": 0.5, "ok": 1.0, "timing/generate": 1.5,
                                     "timing/train": 2.0}
    assert math.isnan(scalars({"step": 1, "loss": math.nan})["loss"])  # a diverging run is shown as it is


def test_no_tracker_does_nothing(tmp_path):
    with Tracker.open([], tmp_path) as tracker:
        tracker.log(rows([1])[0])
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_events_hold_every_numeric_field_of_every_step(tmp_path):
    with Tracker.open(["tensorboard"], tmp_path) as tracker:
        for row in rows([1, 2, 3]):
            tracker.log(row)
    events = read_events(tmp_path / "tensorboard")
    assert set(events.Tags()["scalars"]) == {"reward_mean", "accuracy", "ok", "timing/generate", "timing/train"}
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("reward_mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_a_resumed_run_replaces_the_redone_steps(tmp_path):
    with Tracker.open(["tensorboard"], tmp_path) as tracker:
        for row in rows([1, 2, 3]):  # step 3 had no checkpoint: the resumed run redoes it
            tracker.log(row)
    with Tracker.open(["tensorboard"], tmp_path, start_step=2) as tracker:
        for row in rows([3, 4], offset=1.0):
            tracker.log(row)
    values = [(e.step, round(e.value, 6)) for e in read_events(tmp_path / "tensorboard").Scalars("reward_mean")]
    assert values == [(1, 0.1), (2, 0.2), (3, 1.3), (4, 1.4)]


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_extra_is_a_one_line_error_naming_it(monkeypatch, tmp_path, tracker):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    with pytest.raises(UserError, match=rf"train\.report_to: {tracker} needs the `{tracker}` package; install it "
                                        rf"with: pip install 'nested-reft\[{tracker}\]'"):
        check_available(["tensorboard", "wandb"])
    with pytest.raises(UserError, match="pip install"):
        Tracker.open([tracker], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wandb_mode_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"


def test_wandb_offline_run_in_the_run_directory(monkeypatch, tmp_path):
    pytest.importorskip("wandb", reason="wandb is an optional extra, not part of the test extra (heavy)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Tracker.open(["wandb"], tmp_path, {"train": {"steps": 2}}) as tracker:
        for row in rows([1, 2]):
            tracker.log(row)
    run_id = (tmp_path / "wandb" / tracking.WANDB_ID_FILE).read_text().strip()
    offline_runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    with Tracker.open(["wandb"], tmp_path, start_step=2) as tracker:  # a resumed run keeps its W&B id
        tracker.log(rows([3])[0])
    assert (tmp_path / "wandb" / tracking.WANDB_ID_FILE).read_text().strip() == run_id
