"""End-to-end on the real embedded SmolLM2-135M-Instruct, through the CLI as a user runs it (CPU, minutes)."""

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from .test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def arithmetic_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for split, limit in (("train", 200), ("test", 50)):
        with pytest.raises(SystemExit) as e:
            from nested_reft.cli.main import main

            main(["prepare-data", "arithmetic", "--split", split, "--limit", str(limit), "--difficulty", "1",
                  "--out", str(root / f"{split}.jsonl")])
        assert e.value.code in (0, None)
    return root / "train.jsonl", root / "test.jsonl"


# The rewards the quickstart's math reward can give: 1 for a correct answer, plus format_weight 0.1 for a
# '#### <answer>' line.
QUICKSTART_REWARDS = (0.0, 0.1, 1.0, 1.1)


def assert_quickstart_steps(run: Path) -> None:
    """What two steps of recipes/quickstart.yaml must do (with rollouts logged every step), read from its run folder.

    - Step 1 samples with the full model and probes the skip cost of each eligible layer (all but keep_first 2
      and keep_last 2 of 30) into reports/layer_costs.json.
    - The adaptive controller follows those costs: before any measurement it predicts a skip set's KL as the sum
      of its layers' costs, so after step 1 it adds the cheapest layer exactly when that layer alone costs at
      most target_kl, and holds at none otherwise; step 2 skips the layers it announced, the cheapest ones.
    - Every completion's reward is one the math reward can give, and `correct` exactly when it is >= 1; each
      row's reward_mean and trained_sequences (the rows with a non-zero advantage) are those of its rollouts.
    """
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["skipped_layers"] == [] and rows[0]["time_probe"] > 0
    layers = json.loads((run / "reports" / "layer_costs.json").read_text())["layers"]
    costs = {e["layer"]: e["kl_mu_pi"] for e in layers}
    assert sorted(costs) == list(range(2, 28)) and all(math.isfinite(c) and c > 0 for c in costs.values())
    cheapest = sorted(costs, key=lambda i: (costs[i], i))
    assert rows[0]["target_kl"] == 0.1
    pays = costs[cheapest[0]] <= rows[0]["target_kl"]
    assert (rows[0]["skip_decision"], rows[0]["next_num_skipped"]) == (("raise", 1) if pays else ("hold", 0))
    assert rows[1]["skipped_layers"] == cheapest[: rows[0]["next_num_skipped"]]
    if not pays:  # nothing skipped, so nothing measured: the same costs give the same decision
        assert (rows[1]["skip_decision"], rows[1]["next_num_skipped"]) == ("hold", 0)
    for row in rows:
        rollouts = [json.loads(line) for line in (run / "rollouts" / f"step-{row['step']}.jsonl").read_text().splitlines()]
        assert len(rollouts) == 16  # 4 prompts x 4 generations
        assert all(min(abs(r["reward"] - v) for v in QUICKSTART_REWARDS) < 1e-6 for r in rollouts)
        assert all(r["correct"] == (r["reward"] >= 1) for r in rollouts)
        assert row["reward_mean"] == pytest.approx(sum(r["reward"] for r in rollouts) / 16)
        assert row["trained_sequences"] == sum(r["advantage"] != 0 for r in rollouts)


def test_quickstart_trains_two_steps_and_checkpoint_loads(arithmetic_data, tmp_path, capsys):
    train, test = arithmetic_data
    run = tmp_path / "run"
    code, out, err = run_cli(["train", str(REPO / "recipes" / "quickstart.yaml"), "--set", "train.steps=2",
                              "--set", f"run.output_dir={run}", "--set", f"data.train={train}",
                              "--set", f"data.eval={test}", "--set", "rollout.max_completion_length=48",
                              "--set", "train.log_rollouts_every=1"], capsys)
    assert code in (0, None), err
    assert_quickstart_steps(run)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-2"
    model = AutoModelForCausalLM.from_pretrained(latest)
    assert model.config.num_hidden_layers == 30


def test_evaluate_gates_on_min_accuracy(arithmetic_data, tmp_path, capsys):
    _, test = arithmetic_data
    report = tmp_path / "eval.json"
    common = ["evaluate", "--model", "smollm2-135m-instruct", "--data", str(test), "--max-new-tokens", "64"]
    code, _, _ = run_cli([*common, "--limit", "50", "--report", str(report), "--min-accuracy", "1.01"], capsys)
    assert code == 1
    result = json.loads(report.read_text())
    assert result["n"] == 50 and 0.0 <= result["metrics"]["pass@1"] <= 1.0
    assert {"model", "data", "settings", "metrics", "n", "seconds", "tokens_per_sec"} <= set(result)
    code, _, _ = run_cli([*common, "--limit", "8", "--report", str(tmp_path / "e2.json"), "--min-accuracy", "0"],
                         capsys)
    assert code in (0, None)


def test_calibrate_skips_writes_a_profile_the_sampler_reads(arithmetic_data, tmp_path, capsys):
    train, _ = arithmetic_data
    out = tmp_path / "calibration.json"
    code, _, err = run_cli(["calibrate-skips", str(REPO / "recipes" / "quickstart.yaml"), "--prompts", "2",
                            "--ratios", "0.1,0.4", "--out", str(out), "--set", f"data.train={train}",
                            "--set", "rollout.max_completion_length=24"], capsys)
    assert code in (0, None), err
    report = json.loads(out.read_text())
    assert len(report["layers"]) == 26 and [r["num_skipped"] for r in report["ratios"]] == [3, 12]
    assert report["ratios"][0]["kl"] < report["ratios"][1]["kl"]  # skipping more layers moves further away

    from nested_reft.skipping import SkipSampler

    sampler = SkipSampler(30, strategy="calibrated", ratio=0.25, keep_first=2, keep_last=2, calibration_file=out, seed=0)
    assert len(sampler.sample()[1]) == 8


def test_quickstart_two_steps_under_torchrun_with_two_ranks(arithmetic_data, tmp_path):
    """The documented data-parallel launch on the real model: 2 CPU ranks (gloo), each sampling 2 of the 4
    prompt groups; rank 0 writes the global metrics, rollouts and layer costs, and a checkpoint that
    transformers loads."""
    import subprocess
    import sys

    from .launch import free_port, rank_env

    train, test = arithmetic_data
    run = tmp_path / "run"
    sets = ["train.steps=2", f"run.output_dir={run}", f"data.train={train}", f"data.eval={test}",
            "rollout.max_completion_length=24", "model.device=cpu", "train.log_rollouts_every=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "nested_reft", "train", str(REPO / "recipes" / "quickstart.yaml"),
               *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(command, env=rank_env(), cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_quickstart_steps(run)  # the global batch: both ranks' rollouts, rewards and probed costs
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-2"
    assert AutoModelForCausalLM.from_pretrained(latest).config.num_hidden_layers == 30


def test_the_quickstart_scripts_commands_run_in_a_fresh_clone(tmp_path):
    """The main job's own commands, read from scripts/quickstart.sh and shortened (one training step of 16
    tokens, 4 problems scored), run in a `git clone` of this repository: what a new machine holds, without this
    checkout's ignored files (data/, runs/). A tracked link to one machine's data folder once broke the
    quickstart's first command on every fresh clone while every other test passed."""
    import shlex
    import subprocess
    import sys

    from .launch import rank_env

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: there is no committed tree to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    script = (clone / "scripts" / "quickstart.sh").read_text().splitlines()
    commands = [[a for a in shlex.split(line)[1:] if a != "$@"] for line in script if line.startswith('"$cli" ')]
    assert [c[0] for c in commands] == ["prepare-data", "prepare-data", "train", "evaluate"]
    shorter = {"train": ["--set", "train.steps=1", "--set", "rollout.max_completion_length=16"],
               "evaluate": ["--limit", "4", "--max-new-tokens", "16"]}
    env = rank_env({"PYTHONPATH": str(clone)})  # the clone's package, not this checkout's
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "nested_reft", *argv, *shorter.get(argv[0], [])], cwd=clone,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    assert (clone / "runs" / "quickstart" / "checkpoints" / "step-1").is_dir()
    compared = json.loads((clone / "runs" / "quickstart" / "reports" / "evaluate.compare.json").read_text())
    assert compared["n"] == 4
