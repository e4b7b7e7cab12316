"""The example a user copies: examples/rewards.py and recipes/examples/custom_reward.yaml."""

import json
import sys
from pathlib import Path

import pytest

from .test_cli import run_cli
from .tiny import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "examples" / "custom_reward.yaml"


@pytest.fixture(scope="module")
def rewards():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import rewards as module
    finally:
        sys.path.remove(str(REPO / "examples"))
    return module


def test_the_example_functions_by_hand(rewards):
    completions = ["12 + 7 = 19\n#### 19", "It is 19.\n#### 19", "nineteen", "word " * 12]
    # 7, 5, 1 and 12 words
    assert rewards.within_budget(completions, max_words=[7, 4, 1, 10]) == [1.0, 4 / 5, 1.0, 10 / 12]
    assert rewards.shows_work(completions) == [1.0, 0.0, None, None]


def test_the_example_recipe_trains_on_a_tiny_model(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli([
        "train", str(RECIPE), "--set", f"model.name_or_path={write_tiny_model(tmp_path / 'model')}",
        "--set", "model.device=cpu", "--set", "data.chat_template=false", "--set", "data.system_prompt=null",
        "--set", f"run.output_dir={run}", "--set", "train.steps=2", "--set", "rollout.max_completion_length=20",
        "--set", "train.log_rollouts_every=1", "--set", "train.prompts_per_step=2",
    ], capsys)
    assert code in (0, None), err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = ("math", "within_budget", "shows_work", "soft_overlong")
    assert {f"rewards/{name}/{stat}" for name in names for stat in ("mean", "std")} <= set(rows[0])
    assert rows[0]["rewards/shows_work/mean"] is None  # no `####` answer from a random model: never applies
    rollouts = [json.loads(line) for line in (run / "rollouts" / "step-2.jsonl").read_text().splitlines()]
    # The data's max_words column reached the function (and the saved rollouts); a random model's 20-token
    # completions of words fit every budget (30 + 15 per step).
    assert all(r["columns"]["max_words"] >= 45 and r["rewards"]["within_budget"] == 1.0 for r in rollouts)
    for r in rollouts:  # the total is the weighted sum of the recipe's weights
        own = r["rewards"]
        assert r["reward"] == pytest.approx(own["math"] + 0.2 * own["within_budget"] + 0.5 * own["soft_overlong"])
