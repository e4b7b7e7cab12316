"""Scoring a rollout: what the reward functions see, the per-function metrics, and the saved rollouts."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from nested_reft.data import Example
from nested_reft.recipe import load_recipe
from nested_reft.rundir import RunDir
from nested_reft.scoring import ScoredRollout, batch_metrics, reward_scorer, save_rollouts, score
from nested_reft.rewards.functions import Scores
from nested_reft.trainer import train

NAN = math.nan
EXAMPLES = [Example("p0", "first?", "1", "t", {"level": 2}), Example("p1", "second?", "2", "t")]


def fake_rollout(ids):
    """What `score` reads from a rollout: each row's completion ids and their mask."""
    mask = torch.tensor([[1] * len(row) + [0] * (3 - len(row)) for row in ids])
    return SimpleNamespace(completions=lambda: ids, completion_mask=mask)


TOKENIZER = SimpleNamespace(batch_decode=lambda ids, **_: [" ".join(f"t{i}" for i in row) for row in ids])


def test_score_calls_the_scorer_with_each_rows_example_text_ids_and_step():
    seen = []

    def scorer(batch):
        seen.append(batch)
        return Scores([1.0, 0.0, 0.5, 0.5], [True, False, False, False], {"f": [1.0, None, 0.5, 0.5]})

    ids = [[5], [6, 7], [8], [9, 9, 9]]
    scored = score(fake_rollout(ids), EXAMPLES, TOKENIZER, scorer, group_size=2, scale_rewards="group", step=7)
    (batch,) = seen
    assert batch.examples == [EXAMPLES[0], EXAMPLES[0], EXAMPLES[1], EXAMPLES[1]]
    assert (batch.texts, batch.ids, batch.step, batch.stage) == (["t5", "t6 t7", "t8", "t9 t9 t9"], ids, 7, "step 7")
    assert scored.rewards.tolist() == [1.0, 0.0, 0.5, 0.5] and scored.correct == [True, False, False, False]
    # Group 1: (r - 0.5) / sample std 0.5 * sqrt(2); group 2 has no signal.
    assert scored.advantages.tolist() == pytest.approx([0.5 ** 0.5, -(0.5 ** 0.5), 0.0, 0.0], abs=1e-4)
    assert torch.equal(scored.values["f"].isnan(), torch.tensor([False, True, False, False]))


def scored_rollout(rewards, values):
    ids = [[5], [6, 7], [8], [9, 9, 9]]
    return ScoredRollout(fake_rollout(ids), torch.tensor(rewards), [r >= 1 for r in rewards], ["a", "b", "c", "d"],
                         torch.zeros(4), {k: torch.tensor(v) for k, v in values.items()})


def test_each_function_has_a_mean_and_std_over_the_rows_it_applies_to():
    batch = scored_rollout([1.0, 3.0, 0.0, 0.0], {"short": [1.0, 3.0, NAN, NAN], "never": [NAN] * 4,
                                                  "math": [0.0, 1.0, 0.0, 1.0]})
    metrics = batch_metrics(batch, group_size=2)
    # short: 1 and 3 -> mean 2, population std 1; never applies: null; math: mean 0.5, std 0.5.
    assert metrics["rewards/short/mean"] == 2.0 and metrics["rewards/short/std"] == 1.0
    assert metrics["rewards/never/mean"] is None and metrics["rewards/never/std"] is None
    assert (metrics["rewards/math/mean"], metrics["rewards/math/std"]) == (0.5, 0.5)
    assert metrics["reward_mean"] == 1.0 and metrics["accuracy"] == 0.5 and metrics["completion_length"] == 1.75


def test_saved_rollouts_carry_each_functions_reward_and_the_rows_columns(tmp_path):
    run = RunDir(tmp_path)
    save_rollouts(run, 3, scored_rollout([1.0, 0.0, 0.5, 0.5], {"short": [1.0, NAN, 0.5, 0.5]}), EXAMPLES, 2)
    rows = [json.loads(line) for line in (tmp_path / "rollouts" / "step-3.jsonl").read_text().splitlines()]
    assert [r["rewards"] for r in rows] == [{"short": 1.0}, {"short": None}, {"short": 0.5}, {"short": 0.5}]
    assert [r["columns"] for r in rows] == [{"level": 2}, {"level": 2}, {}, {}]
    assert [r["id"] for r in rows] == ["p0", "p0", "p1", "p1"]


def test_the_python_apis_reward_of_one_completion_replaces_the_recipes():
    def reward(text, ids, example):
        return float(len(ids)), example.id == "p1"

    scorer = reward_scorer(load_recipe(None), reward)
    scores = scorer(SimpleNamespace(texts=["a", "b"], ids=[[1], [1, 2]], examples=EXAMPLES))
    assert (scores.total, scores.correct, scores.values) == ([1.0, 2.0], [False, True], {})


def test_a_recipe_without_functions_logs_the_old_metrics_and_each_functions(tiny_run_inputs, tmp_path):
    """No reward.functions: math (weight 1) + format (weight format_weight), as before, plus their own metrics."""
    model_dir, data = tiny_run_inputs
    recipe = load_recipe(None, [
        f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}", "model.device=cpu",
        f"data.train={data}", "data.eval=null", "data.chat_template=false", "data.system_prompt=null",
        "rollout.num_generations=2", "rollout.max_completion_length=3", "train.prompts_per_step=2", "train.steps=1",
        "reward.format_weight=0.1", "train.log_rollouts_every=1",
    ])
    (row,) = train(recipe).read_metrics()
    old = {"reward_mean", "reward_std", "accuracy", "completion_length", "frac_reward_zero_std", "skip_ratio",
           "skipped_layers", "weight_mean", "ess", "kl_mu_pi", "loss", "grad_norm", "lr", "time_generate",
           "time_score", "time_train", "rollout_tokens_per_sec", "peak_memory_mb"}
    new = {"rewards/math/mean", "rewards/math/std", "rewards/format/mean", "rewards/format/std"}
    assert old | new <= set(row)
    assert row["reward_mean"] == pytest.approx(row["rewards/math/mean"] + 0.1 * row["rewards/format/mean"])
