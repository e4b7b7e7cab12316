"""`nested-reft train` as a user runs it: its log output, TensorBoard tracking, and how a stopped run ends."""

import json
import os
import signal
import subprocess
import sys

import pytest

from nested_reft.cli.main import main, resume_command
from nested_reft.stopping import TrainingStopped

from .tiny import write_examples, write_tiny_model

# The rollout engine still passes `past_key_values` (its owner is moving it to transformers' `cache`); until that
# lands this is the one warning a run prints. Every other warning fails the test below.
PENDING = "`past_key_values` is deprecated"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-train")
    return write_tiny_model(root / "model"), write_examples(root / "train.jsonl", 8)


def train_args(tiny, run_dir, *extra):
    model, data = tiny
    return ["train", "--set", f"model.name_or_path={model}", "--set", f"data.train={data}", "--set", "data.eval=null",
            "--set", "data.chat_template=false", "--set", "data.system_prompt=null", "--set", "model.device=cpu",
            "--set", "rollout.num_generations=2", "--set", "rollout.max_completion_length=3",
            "--set", "train.prompts_per_step=2", "--set", "train.steps=3", "--set", "train.save_every=2",
            "--set", f"run.output_dir={run_dir}", *extra]


def test_a_logged_run_prints_one_line_per_step_no_warning_and_tensorboard_events(tiny, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "nested_reft.cli.main",
                               *train_args(tiny, run_dir, "--set", "train.report_to=[tensorboard]")],
                              stdout=out, stderr=subprocess.PIPE, text=True, env=env)
    assert done.returncode == 0, done.stderr
    stdout = log.read_text()
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[0] for line in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(" (math 0.00 format 0.00)  acc " in line for line in steps)  # each reward function's mean
    assert f"run directory: {run_dir}" in stdout
    warnings = [line for line in (stdout + done.stderr).splitlines() if "Warning" in line and PENDING not in line]
    assert warnings == []

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in events.Scalars("reward_mean")]
    assert logged == [(r["step"], pytest.approx(r["reward_mean"])) for r in rows] and len(logged) == 3
    assert {"loss", "ess", "kl_mu_pi", "lr", "rewards/math/mean", "rewards/format/std"} <= set(events.Tags()["scalars"])


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_a_stopped_run_says_how_to_resume_and_exits_with_the_signal_code(tiny, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"

    def stopped(*_, **__):
        raise TrainingStopped(2, checkpoint, signal.SIGTERM)

    monkeypatch.setattr("nested_reft.cli.train.run_training", stopped)
    argv = train_args(tiny, tmp_path / "run", "--overwrite")
    code, _, err = run_main(argv, capsys)
    assert code == 143
    assert f"stopped: stopped by SIGTERM after step 2; checkpoint {checkpoint}" in err
    assert "resume with: nested-reft train --set" in err and err.rstrip().endswith("--resume")
    assert "--overwrite" not in err


def test_an_interrupted_run_names_its_latest_checkpoint_and_exits_130(tiny, tmp_path, monkeypatch, capsys):
    from nested_reft.rundir import RunDir

    run = RunDir.open(tmp_path / "run", "a: 1\n")
    run.save_checkpoint(2, lambda folder: (folder / "w").write_text("2"))

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("nested_reft.cli.train.run_training", interrupted)
    code, _, err = run_main(train_args(tiny, run.root, "--resume"), capsys)
    assert code == 130
    assert f"interrupted by SIGINT (Ctrl-C); the latest complete checkpoint is {run.checkpoints_dir / 'step-2'}" in err


def test_a_failing_reward_function_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from .test_cli import assert_one_line_error

    rewards = tmp_path / "rewards.py"
    rewards.write_text("def flaky(completions, step, **kwargs):\n    if step == 3:\n"
                       "        raise ConnectionError('judge unreachable')\n    return [0.5] * len(completions)\n")
    run = tmp_path / "run"
    code, _, err = run_main(train_args(tiny, run, "--set", f"reward.functions=[{{name: '{rewards}:flaky'}}]",
                                       "--set", "train.save_every=1"), capsys)
    assert_one_line_error(code, err, f"reward function 'flaky' ({rewards}:flaky) raised ConnectionError: judge "
                          "unreachable (rewards.py line 3) on row 0 (example 'tiny-", "at step 3")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-2"
    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-2")  # intact
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["rewards/flaky/mean"] == 0.5


def test_resume_command():
    assert resume_command(["train", "r.yaml", "--overwrite", "--set", "a.b=c d"]) == \
        "nested-reft train r.yaml --set 'a.b=c d' --resume"
    assert resume_command(["train", "--resume"]) == "nested-reft train --resume"
