"""The skip-robustness term: it trains the bridges and nothing else, is 0 when nothing is skipped, lowers the KL of
the set it trains, and in a run lets the adaptive controller skip more; resumes bit for bit."""

import pytest
import torch

from nested_reft.checkpointing import load_trainer_state
from nested_reft.distributed import World
from nested_reft.models import load_model
from nested_reft.parallel import no_parallel
from nested_reft.recipe import load_recipe
from nested_reft.robustness import Robustness, token_kls
from nested_reft.sampling import SamplingParams
from nested_reft.trainer import train
from nested_reft.update import optimise

from .test_trainer import (GradRecorder, NoSchedule, assert_same_run, scored_batch, starts_with_target, target_id,
                           tiny_recipe, train_until)

REWARDS = [0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1]


@pytest.fixture
def setup(tiny_run_inputs):
    model_dir, data = tiny_run_inputs
    model, _ = load_model(str(model_dir), device="cpu")
    recipe = tiny_recipe(model_dir, data, "unused", "rollout.num_generations=4", "skipping.robustness_weight=1.0",
                         "skipping.robustness_rows=8", "skipping.robustness_lr=1e-2")
    batch = scored_batch(model, REWARDS, skip=(1,))
    optimise(model, None, GradRecorder(model.parameters()), NoSchedule(), batch, recipe, SamplingParams(1.0))
    model.zero_grad(set_to_none=True)
    return model, recipe, batch, Robustness(model, recipe.skipping, [1, 2], World())


def test_the_term_trains_the_bridges_and_leaves_the_policy_bit_identical(setup):
    model, recipe, batch, robustness = setup
    policy = {k: v.clone() for k, v in model.state_dict().items()}
    bridges = {k: v.clone() for k, v in robustness.bridges.state_dict().items()}
    metrics = robustness.step(model, batch, (1, 2), SamplingParams(1.0), no_parallel(model), 7)
    assert all(torch.equal(policy[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(bridges[k], v) for k, v in robustness.bridges.state_dict().items())
    assert metrics["robust_loss"] > 0 and metrics["robust_kl_mu_pi"] > 0
    assert metrics["robust_skipped_layers"] == [1, 2]
    assert abs(metrics["policy_drift"]) < 1e-9  # the recorder changed no weight: the rows' log-probs are as before


def test_the_term_is_zero_when_nothing_is_skipped(setup):
    model, recipe, batch, robustness = setup
    hidden = torch.randn(5, model.config.hidden_size)
    forward, reverse, _ = token_kls(model.lm_head, hidden, hidden.clone().requires_grad_(), SamplingParams(0.7), 2,
                                    torch.zeros(5, dtype=torch.long))
    assert forward.item() == 0.0 and reverse == 0.0
    bridges = {k: v.clone() for k, v in robustness.bridges.state_dict().items()}
    metrics = robustness.step(model, batch, (), SamplingParams(1.0), no_parallel(model), 64)
    assert metrics["robust_loss"] == 0.0 and metrics["robust_kl_mu_pi"] == 0.0
    assert all(torch.equal(bridges[k], v) for k, v in robustness.bridges.state_dict().items())


def test_the_kl_of_the_trained_set_falls(setup):
    model, recipe, batch, robustness = setup
    kls = [robustness.step(model, batch, (1, 2), SamplingParams(1.0), no_parallel(model), 64)["robust_kl_mu_pi"]
           for _ in range(30)]
    assert kls[-1] < 0.5 * kls[0], kls


def test_with_lambda_0_a_run_is_todays(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    reward = starts_with_target(target_id(model_dir))
    common = ["train.steps=3", "skipping.ratio=0.25"]
    today = train(tiny_recipe(model_dir, data, tmp_path / "a", *common), reward_fn=reward)
    off = train(tiny_recipe(model_dir, data, tmp_path / "b", *common, "skipping.robustness_weight=0.0"),
                reward_fn=reward)
    assert_same_run(today, off)
    assert not any(k.startswith("robust") for k in off.read_metrics()[0])


ADAPTIVE_ROBUST = ["skipping.strategy=adaptive", "skipping.target_kl=0.5", "skipping.robustness_weight=1.0",
                   "skipping.robustness_lr=1e-2", "skipping.robustness_rows=8"]


def test_a_run_with_the_term_logs_it_and_resumes_bit_for_bit(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    reward = starts_with_target(target_id(model_dir))
    common = ["train.steps=4", "train.save_every=1", *ADAPTIVE_ROBUST]
    full = train(tiny_recipe(model_dir, data, tmp_path / "full", *common), reward_fn=reward)
    rows = full.read_metrics()
    assert all({"robust_loss", "robust_kl_mu_pi", "robust_skipped_layers", "policy_drift", "time_robust",
                "num_skipped"} <= set(r) for r in rows)
    # the set it trains is the one the controller would try next: one layer more (of the 2 eligible)
    assert all(len(r["robust_skipped_layers"]) == min(r["num_skipped"] + 1, 2) for r in rows[1:])
    # Something to resume: the policy was updated, and the bridges left their zero start (`up` starts at 0).
    assert any(not r["update_skipped"] for r in rows[:2]) and any(not r["update_skipped"] for r in rows[2:])
    latest = full.checkpoints_dir / (full.checkpoints_dir / "latest").read_text().strip()
    bridges = load_trainer_state(latest)["robustness"]["bridges"]
    assert max(v.abs().max().item() for k, v in bridges.items() if k.endswith("up.weight")) > 0
    recipe = tiny_recipe(model_dir, data, tmp_path / "resumed", *common)
    train_until(recipe, 2, reward)
    assert_same_run(full, train(recipe, resume=True, reward_fn=reward))
