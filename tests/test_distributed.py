"""Data-parallel training with 2 CPU ranks (gloo): same result as one process, exact resume, clean failures.

Each job runs the real `nested-reft train` command in 2 processes started like torchrun starts them
(tests/launch.py), on the tiny model of tests/tiny.py with a reward a tiny model can earn (first token w5).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nested_reft.recipe import load_recipe
from nested_reft.rundir import RunDir
from nested_reft.trainer import train

from .launch import REPO, WORKER, free_port, launch, rank_env
from .test_trainer import starts_with_target, target_id
from .tiny import write_examples, write_tiny_model

# Weights of a 2-rank run against one process: the same rows, rewards and advantages, but each rank pads its
# prompts to its own longest and sums its own micro-batches, so float rounding differs (~1e-7 relative per op).
# AdamW divides each gradient element by its own magnitude, so elements with a near-zero gradient amplify that
# rounding: after 2 steps at lr 3e-2 the largest difference measured is 1.1e-5 (ddp) and 1.6e-5 (fsdp).
# 1e-4 leaves room for that and is still 300x smaller than one update step (lr).
WEIGHT_ATOL = 1e-4
LORA = "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj, lm_head]}"
VOLATILE = ("time_", "rollout_tokens", "peak")  # per-process timings and memory


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return write_tiny_model(root / "model"), write_examples(root / "train.jsonl", 24)


def overrides(model_dir, data, out, *extra) -> list[str]:
    return [f"run.output_dir={out}", f"model.name_or_path={model_dir}", "model.device=cpu", f"data.train={data}",
            "data.eval=null", "data.chat_template=false", "data.system_prompt=null", "rollout.num_generations=8",
            "rollout.max_completion_length=3", "optimizer.lr=3e-2", "optimizer.max_grad_norm=10.0",
            "train.prompts_per_step=4", "train.micro_batch_size=6", "train.save_every=100",
            "train.log_rollouts_every=1", "train.steps=2", *extra]


def run_ranks(tmp_path, sets: list[str], target: int, timeout: float = 240.0, extra_argv=(), **worker) -> list:
    """Every rank's result of `nested-reft train --set ...` (through tests/dist_worker.py) on 2 ranks."""
    config = tmp_path / f"worker-{len(list(tmp_path.glob('worker-*')))}.json"
    argv = [*(a for s in sets for a in ("--set", s)), *extra_argv]
    config.write_text(json.dumps({"argv": argv, "target_id": target, **worker}))
    results, _ = launch(2, [str(WORKER), str(config)], timeout=timeout)
    return results


def stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def weights(run_dir):
    """The latest checkpoint's tensors: the model's, or a LoRA run's adapters."""
    folder = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    lora = folder / "adapter_model.safetensors"
    return load_file(lora if lora.is_file() else folder / "model.safetensors")


@pytest.mark.parametrize("extra", [
    pytest.param(["skipping.ratio=0.25"], id="ddp-random-skips"),
    pytest.param(["train.parallel=fsdp", "skipping.strategy=adaptive"], id="fsdp-adaptive"),
    pytest.param(["skipping.ratio=0.25", LORA], id="ddp-lora"),
    pytest.param(["train.parallel=fsdp", "skipping.ratio=0.25", LORA], id="fsdp-lora"),
    pytest.param(["train.parallel=fsdp", "skipping.ratio=0.25", "rollout.kv_cache=static"], id="fsdp-static-cache"),
])
def test_two_ranks_train_like_one_process(inputs, tmp_path, extra):
    model_dir, data = inputs
    target = target_id(model_dir)
    single = train(load_recipe(None, overrides(model_dir, data, tmp_path / "one", *extra)),
                   reward_fn=starts_with_target(target))
    results = run_ranks(tmp_path, overrides(model_dir, data, tmp_path / "two", *extra), target)
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:] + results[1].stderr[-3000:]

    one, two = single.read_metrics(), RunDir(tmp_path / "two").read_metrics()
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        # Sampling is seeded per prompt group: the same completions, hence exactly the same rewards.
        for key in ("reward_mean", "reward_std", "accuracy", "completion_length", "frac_reward_zero_std",
                    "skipped_layers", "trained_sequences", "update_skipped"):
            assert a[key] == b[key], key
        for key in ("kl_mu_pi", "ess", "weight_mean", "loss", "grad_norm"):  # float summation order only
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert one[0]["reward_mean"] > 0 and not one[0]["update_skipped"]  # a step with signal was compared
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    start = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in a.items()} if LORA in extra else \
        load_file(model_dir / "model.safetensors")  # LoRA: B starts at 0
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 100 * WEIGHT_ATOL  # training moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
    # Rank 0 alone wrote the run directory, with every rank's completions in batch order.
    lines = (tmp_path / "two" / "rollouts" / "step-2.jsonl").read_text().splitlines()
    assert [json.loads(line)["reward"] for line in lines] == \
        [json.loads(line)["reward"] for line in (tmp_path / "one" / "rollouts" / "step-2.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_under_two_ranks_is_bit_identical(inputs, tmp_path, mode):
    """Stop a 2-rank run after step 2 (both ranks), resume it with 2 ranks: the same weights and metrics, bit for
    bit, as an uninterrupted 2-rank run (an FSDP checkpoint is gathered to one HF folder and resharded)."""
    model_dir, data = inputs
    target = target_id(model_dir)
    common = ["train.steps=3", "train.save_every=1", "skipping.ratio_range=[0.0, 0.5]", "optimizer.warmup_steps=2",
              "optimizer.schedule=cosine", f"train.parallel={mode}"]
    full = run_ranks(tmp_path, overrides(model_dir, data, tmp_path / "full", *common), target)
    stopped = run_ranks(tmp_path, overrides(model_dir, data, tmp_path / "resumed", *common), target, stop_after=2)
    assert all(r.returncode == 0 for r in full + stopped), [r.stderr[-2000:] for r in full + stopped]
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "step-2"
    resumed = run_ranks(tmp_path, [*overrides(model_dir, data, tmp_path / "resumed", *common)], target,
                        extra_argv=["--resume"])
    assert all(r.returncode == 0 for r in resumed), [r.stderr[-2000:] for r in resumed]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert stable(RunDir(tmp_path / "full").read_metrics()) == stable(RunDir(tmp_path / "resumed").read_metrics())


def test_prompts_per_step_not_dividing_is_one_line_on_every_rank(inputs, tmp_path):
    """Found before any model loads or any rank joins the group: each rank exits 2 with the same single line."""
    model_dir, data = inputs
    results, seconds = launch(2, ["-m", "nested_reft", "train", *[a for s in overrides(
        model_dir, data, tmp_path / "run", "train.prompts_per_step=3") for a in ("--set", s)]], timeout=120)
    for r in results:
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "prompts_per_step=3 does not divide by the world size 2" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # nothing was written either


def test_a_failing_rank_ends_the_job_with_one_line_each(inputs, tmp_path):
    """Rank 1 fails at step 1; rank 0, waiting for it in a collective, stops at once (not after the 600 s
    collective timeout) and says why in one line."""
    model_dir, data = inputs
    results = run_ranks(tmp_path, overrides(model_dir, data, tmp_path / "run", "train.distributed_timeout_s=600"),
                        target_id(model_dir), timeout=150, fail_rank=1, fail_step=1)
    failed, peer = results[1], results[0]
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == \
        "error: rank 1/2: simulated failure on rank 1", failed.stderr
    assert peer.returncode == 1, peer.stderr
    last = peer.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0/2: stopped because another rank failed"), peer.stderr
    assert "Traceback" not in peer.stderr + failed.stderr


def test_a_rank_that_stops_answering_times_out(inputs, tmp_path):
    """Rank 1 hangs at step 1: rank 0's next collective times out after train.distributed_timeout_s (5 s) and
    rank 0 ends with one line instead of waiting forever."""
    model_dir, data = inputs
    config = tmp_path / "hang.json"
    config.write_text(json.dumps({"argv": [a for s in overrides(model_dir, data, tmp_path / "run",
                                                                 "train.distributed_timeout_s=5") for a in ("--set", s)],
                                  "hang_rank": 1, "hang_step": 1, "hang_s": 300}))
    results, seconds = launch(2, [str(WORKER), str(config)], timeout=150, stop_when_rank_exits=0)
    assert results[0].returncode == 1, results[0].stderr
    assert results[0].stderr.strip().splitlines()[-1].startswith("error: rank 0/2: stopped because another rank")
    assert seconds < 140  # well before rank 1 would have woken up (300 s)


def test_torchrun_runs_python_m_nested_reft(inputs, tmp_path):
    """The documented launch: `torchrun --nproc-per-node 2 -m nested_reft train ...` (the math reward: a tiny
    model earns nothing, which is fine here: the job must run, log and checkpoint once, from rank 0)."""
    model_dir, data = inputs
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m", "nested_reft", "train"]
    sets = [a for s in overrides(model_dir, data, tmp_path / "run", "train.steps=1") for a in ("--set", s)]
    done = subprocess.run([*torchrun, *sets], env=rank_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = RunDir(tmp_path / "run").read_metrics()
    assert [r["step"] for r in rows] == [1]
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "model.safetensors").is_file()


@pytest.mark.parametrize("delivery", ["SIGTERM-to-torchrun", "SIGUSR1-to-torchrun-and-every-rank"])
def test_preemption_under_torchrun_keeps_the_last_step_and_resume_is_bit_identical(inputs, tmp_path, delivery):
    """Preemption, as a cluster delivers it: 2 gloo ranks under torchrun, whose third step's rollout (8 s) is slower
    than torchrun's shutdown timeout (5 s: what it waits between forwarding the signal and SIGKILL). The signal goes
    to torchrun (which forwards it), or, as SLURM does, to torchrun and every rank at once (each rank gets it
    twice). Every rank abandons step 3 at its next decode step, rank 0 checkpoints step 2, and each rank exits
    128 + the signal once rank 0 has written. `--resume` then gives an uninterrupted run's weights and metrics,
    bit for bit."""
    model_dir, data = inputs
    target = target_id(model_dir)
    common = ["train.steps=4", "rollout.max_completion_length=8"]
    full = run_ranks(tmp_path, overrides(model_dir, data, tmp_path / "full", *common), target)
    assert all(r.returncode == 0 for r in full), [r.stderr[-2000:] for r in full]

    signum = signal.SIGTERM if delivery.startswith("SIGTERM") else signal.SIGUSR1
    marker = tmp_path / "slow-step-started"
    config = tmp_path / "preempted.json"
    config.write_text(json.dumps({"argv": [a for s in overrides(model_dir, data, tmp_path / "stopped", *common)
                                           for a in ("--set", s)],
                                  "target_id": target, "slow_step": 3, "slow_token_s": 1.0, "marker": str(marker)}))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "--shutdown-timeout", "5", "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"]
    job = subprocess.Popen([*torchrun, str(WORKER), str(config)], env=rank_env(), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not all(marker.with_name(f"{marker.name}.{rank}").is_file() for rank in (0, 1)):
        assert job.poll() is None and time.monotonic() < deadline, "step 3 never started"
        time.sleep(0.1)
    job.send_signal(signum)
    if delivery.endswith("every-rank"):
        for rank in (0, 1):
            os.kill(int(marker.with_name(f"{marker.name}.{rank}").read_text()), signum)
    out, err = job.communicate(timeout=120)

    code = 128 + signum
    assert f"rank 0 exit {code}" in out and f"rank 1 exit {code}" in out, out[-2000:] + err[-3000:]
    assert err.count(f"stopped by {signal.Signals(signum).name} during step 3") == 2, err[-3000:]
    assert "SIGKILL" not in err and "no checkpoint" not in err, err[-3000:]
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert [r["step"] for r in RunDir(tmp_path / "stopped").read_metrics()] == [1, 2]

    resumed = run_ranks(tmp_path, overrides(model_dir, data, tmp_path / "stopped", *common), target,
                        extra_argv=["--resume"])
    assert all(r.returncode == 0 for r in resumed), [r.stderr[-2000:] for r in resumed]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert stable(RunDir(tmp_path / "full").read_metrics()) == stable(RunDir(tmp_path / "stopped").read_metrics())
