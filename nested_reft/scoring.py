"""Scoring a rollout: a reward per completion, group advantages, and what the metrics row says about them.

Row i of a rollout belongs to prompt i // G. Rewards come from the recipe's reward functions (`rewards.functions`:
the math reward and the format bonus unless `reward.functions` says otherwise, each function's own rewards kept for
the metrics and the saved rollouts), or, through the Python API `train(recipe, reward_fn=f)`, from a function of
one completion (tests plug in synthetic tasks a tiny random model can learn). Advantages are computed over the
whole batch's rewards (gathered from every rank under torchrun: `scale_rewards: batch` needs them all), then sliced
to this rank's rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nested_reft.data import Example
from nested_reft.distributed import World
from nested_reft.objective import group_advantages
from nested_reft.recipe import Recipe
from nested_reft.rewards.functions import Completions, RewardFunctions, Scores
from nested_reft.rollout import Rollout
from nested_reft.rundir import RunDir, atomic_write_text

# The Python API's reward of one completion: reward_fn(completion_text, completion_token_ids, example) ->
# (reward, correct). Its reward goes into the batch as it is (a NaN included: see `guards`).
RewardFn = Callable[[str, list[int], Example], tuple[float, bool]]
# What scores a batch: the recipe's `RewardFunctions`, or a `RewardFn` applied to each completion.
Scorer = Callable[[Completions], Scores]


@dataclass
class ScoredRollout:
    """A rollout with its rewards: what the update consumes."""

    rollout: Rollout
    rewards: torch.Tensor  # [B]
    correct: list[bool]
    texts: list[str]
    advantages: torch.Tensor  # [B]
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # each reward function's own rewards [B], NaN: None
    # [B, T] lp_old, recorded by the update for the rows it computed it for (NaN elsewhere); None before the update.
    old_log_probs: torch.Tensor | None = None


def reward_scorer(recipe: Recipe, reward_fn: RewardFn | None = None) -> Scorer:
    """What a run scores with: `reward_fn`, one completion at a time, when given; else the recipe's reward functions
    (users' functions are imported in a worker now: UserError if one cannot be)."""
    if reward_fn is None:
        return RewardFunctions.from_config(recipe.reward, recipe.rollout.max_completion_length)

    def score_each(batch: Completions) -> Scores:
        scored = [reward_fn(text, ids, example) for text, ids, example in zip(batch.texts, batch.ids, batch.examples)]
        return Scores([r for r, _ in scored], [c for _, c in scored])

    return score_each


def score(rollout: Rollout, examples: list[Example], tokenizer, scorer: Scorer, group_size: int, scale_rewards: str,
          world: World = World(), *, step: int = 0) -> ScoredRollout:
    """Decode and score every completion of this rank's rollout at `step`; advantages from the whole batch's
    rewards. A reward function's fault is a UserError (nothing of the step is kept)."""
    ids = rollout.completions()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rows = [examples[i // group_size] for i in range(len(ids))]
    scores = scorer(Completions(texts, ids, rows, step, f"step {step}"))
    rewards = torch.tensor(scores.total, dtype=torch.float32)
    values = {name: torch.tensor([math.nan if v is None else v for v in column], dtype=torch.float32)
              for name, column in scores.values.items()}
    first = world.rank * len(rewards)
    advantages = group_advantages(world.gather_rows(rewards), group_size, scale_rewards)
    return ScoredRollout(rollout, rewards, scores.correct, texts, advantages[first : first + len(rewards)], values)


def batch_metrics(batch: ScoredRollout, group_size: int, world: World = World()) -> dict[str, float | None]:
    """Reward, accuracy, completion length and no-signal fraction of the whole batch (every rank's rows), and each
    reward function's `rewards/<name>/mean` and `/std` over the rows it applies to (None when it applies to none)."""
    rewards = world.gather_rows(batch.rewards)
    correct = world.gather_rows(torch.tensor(batch.correct, dtype=torch.float64))
    lengths = world.gather_rows(batch.rollout.completion_mask.sum(1).float())
    groups = rewards.view(-1, group_size)
    metrics: dict[str, float | None] = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "accuracy": correct.mean().item(),
        "completion_length": lengths.mean().item(),
        "frac_reward_zero_std": (groups.std(1, unbiased=False) == 0).float().mean().item(),
    }
    for name, values in batch.values.items():
        gathered = world.gather_rows(values)
        applicable = gathered[~gathered.isnan()]
        some = len(applicable) > 0
        metrics[f"rewards/{name}/mean"] = applicable.mean().item() if some else None
        metrics[f"rewards/{name}/std"] = applicable.std(unbiased=False).item() if some else None
    return metrics


def save_rollouts(run: RunDir, step: int, batch: ScoredRollout, examples: list[Example], group_size: int,
                  world: World = World()) -> None:
    """`rollouts/step-N.jsonl`: each sampled completion with its prompt, gold answer, reward (and each reward
    function's, null where it does not apply), advantage and the row's columns (every rank's, in batch order;
    written by rank 0)."""
    lines = []
    for i, text in enumerate(batch.texts):
        ex = examples[i // group_size]
        own = {name: None if math.isnan(v := values[i].item()) else v for name, values in batch.values.items()}
        lines.append(json.dumps({"id": ex.id, "question": ex.question, "gold": ex.answer, "completion": text,
                                 "reward": batch.rewards[i].item(), "rewards": own, "correct": batch.correct[i],
                                 "advantage": batch.advantages[i].item(), "columns": ex.columns}, ensure_ascii=False))
    lines = [line for part in world.gather_objects(lines) for line in part]
    if world.is_main:
        atomic_write_text(run.rollouts_dir / f"step-{step}.jsonl", "\n".join(lines) + "\n")
