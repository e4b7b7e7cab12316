"""The training loop stops cleanly: SIGTERM through a real process (checkpoint, then a bit-exact resume), and
non-finite steps (their updates skipped, never checkpointed, and too many in a row end the run)."""

import math
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nested_reft.guards import NonFiniteError
from nested_reft.trainer import train

from .test_trainer import starts_with_target, target_id, tiny_recipe


def cli_train(model_dir, data, run_dir, *extra):
    return [sys.executable, "-m", "nested_reft.cli.main", "train",
            "--set", f"model.name_or_path={model_dir}", "--set", f"data.train={data}", "--set", "data.eval=null",
            "--set", "data.chat_template=false", "--set", "data.system_prompt=null", "--set", "model.device=cpu",
            "--set", "rollout.num_generations=4", "--set", "rollout.max_completion_length=4",
            "--set", "train.prompts_per_step=2", "--set", "train.steps=6", "--set", "train.save_every=100",
            "--set", "skipping.ratio=0.25", "--set", f"run.output_dir={run_dir}", *extra]


def test_sigterm_checkpoints_the_step_reached_and_resume_is_bit_exact(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    full = subprocess.run(cli_train(model_dir, data, tmp_path / "full"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr

    child = subprocess.Popen(cli_train(model_dir, data, tmp_path / "stopped"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.startswith("step 2/6"):
            child.send_signal(signal.SIGTERM)
            break
    out, err = child.communicate(timeout=300)
    assert child.returncode == 143, err
    stopped_at = int(err.split("after step ")[1].split(";")[0])
    assert 2 <= stopped_at < 6
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at}"
    assert "resume with: nested-reft train" in err and err.rstrip().endswith("--resume")

    resumed = subprocess.run(cli_train(model_dir, data, tmp_path / "stopped", "--resume"), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "full" / "checkpoints" / "step-6" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "checkpoints" / "step-6" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)




def test_a_nonfinite_loss_skips_the_update_and_never_reaches_a_checkpoint(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=3", "train.save_every=1",
                         "train.keep_last=3", "skipping.ratio=0.25")
    per_step = recipe.train.prompts_per_step * recipe.rollout.num_generations
    calls = {"n": 0}
    target = starts_with_target(target_id(model_dir))

    def reward(text, ids, example):
        calls["n"] += 1
        value, hit = target(text, ids, example)
        return (math.nan if (calls["n"] - 1) // per_step + 1 == 2 else value), hit

    run = train(recipe, reward_fn=reward)
    rows = run.read_metrics()
    assert [r["nonfinite_updates"] for r in rows] == [0, 1, 0]
    w1 = load_file(run.checkpoints_dir / "step-1" / "model.safetensors")
    w2 = load_file(run.checkpoints_dir / "step-2" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # step 2's update was skipped
    assert all(torch.isfinite(t).all() for t in w2.values())


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_last_checkpoint(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=6", "train.save_every=1",
                         "train.max_nonfinite_steps=2")
    per_step = recipe.train.prompts_per_step * recipe.rollout.num_generations
    calls = {"n": 0}

    def reward(text, ids, example):
        calls["n"] += 1
        return (math.nan if (calls["n"] - 1) // per_step + 1 >= 3 else 0.0), False

    with pytest.raises(NonFiniteError, match=r"steps 3-4: .*max_nonfinite_steps=2"):
        train(recipe, reward_fn=reward)
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-3"  # step 3 skipped its update (weights = step 2's) and was saved; step 4 stopped it


def test_the_trainer_never_checkpoints_nonfinite_weights(tiny_run_inputs, tmp_path, monkeypatch):
    """Through the trainer's own save path: a weight that turns NaN in step 2's update (a finite loss and gradient
    norm do not rule it out) stops the run with the divergence error before step 2 is written; step 1's checkpoint
    stays the latest, complete and finite."""
    from nested_reft import trainer

    model_dir, data = tiny_run_inputs
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=3", "train.save_every=1")
    real_optimise, calls = trainer.optimise, []

    def optimise(model, *args, **kwargs):
        stats = real_optimise(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan
        return stats

    monkeypatch.setattr(trainer, "optimise", optimise)
    with pytest.raises(NonFiniteError, match="step 2") as error:
        train(recipe, reward_fn=starts_with_target(target_id(model_dir)))
    assert error.value.exit_code == 3
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-1" and not (checkpoints / "step-2").exists()
    assert all(torch.isfinite(t).all() for t in load_file(checkpoints / "step-1" / "model.safetensors").values())
