"""Scoring a rollout: a reward per completion, group advantages, and what the metrics row says about them.

Row i of a rollout belongs to prompt i // G. Rewards come from a `RewardFn` (the math reward by default; tests
plug in synthetic tasks a tiny random model can learn). Advantages are computed over the whole batch's rewards
(gathered from every rank under torchrun: `scale_rewards: batch` needs them all), then sliced to this rank's rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nested_reft.data import Example
from nested_reft.distributed import World
from nested_reft.objective import group_advantages
from nested_reft.recipe import Recipe
from nested_reft.rewards import math_reward
from nested_reft.rollout import Rollout
from nested_reft.rundir import RunDir, atomic_write_text

# reward_fn(completion_text, completion_token_ids, example) -> (reward, correct).
RewardFn = Callable[[str, list[int], Example], tuple[float, bool]]


@dataclass
class ScoredRollout:
    """A rollout with its rewards: what the update consumes."""

    rollout: Rollout
    rewards: torch.Tensor  # [B]
    correct: list[bool]
    texts: list[str]
    advantages: torch.Tensor  # [B]


def math_reward_fn(recipe: Recipe) -> RewardFn:
    """The recipe's math reward (answer extraction, equivalence check, format bonus) as a RewardFn."""
    cfg = recipe.reward

    def reward(text: str, _ids: list[int], example: Example) -> tuple[float, bool]:
        result = math_reward(text, example.answer, last_number_fallback=cfg.last_number_fallback,
                             format_weight=cfg.format_weight, timeout_s=cfg.timeout_s)
        return result.reward, result.reason == "correct"

    return reward


def score(rollout: Rollout, examples: list[Example], tokenizer, reward_fn: RewardFn, group_size: int,
          scale_rewards: str, world: World = World()) -> ScoredRollout:
    """Decode and score every completion of this rank's rollout; advantages from the whole batch's rewards."""
    ids = rollout.completions()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    scored = [reward_fn(text, row, examples[i // group_size]) for i, (text, row) in enumerate(zip(texts, ids))]
    rewards = torch.tensor([r for r, _ in scored], dtype=torch.float32)
    first = world.rank * len(rewards)
    advantages = group_advantages(world.gather_rows(rewards), group_size, scale_rewards)
    return ScoredRollout(rollout, rewards, [c for _, c in scored], texts, advantages[first : first + len(rewards)])


def batch_metrics(batch: ScoredRollout, group_size: int, world: World = World()) -> dict[str, float]:
    """Reward, accuracy, completion length and no-signal fraction of the whole batch (every rank's rows)."""
    rewards = world.gather_rows(batch.rewards)
    correct = world.gather_rows(torch.tensor(batch.correct, dtype=torch.float64))
    lengths = world.gather_rows(batch.rollout.completion_mask.sum(1).float())
    groups = rewards.view(-1, group_size)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "accuracy": correct.mean().item(),
        "completion_length": lengths.mean().item(),
        "frac_reward_zero_std": (groups.std(1, unbiased=False) == 0).float().mean().item(),
    }


def save_rollouts(run: RunDir, step: int, batch: ScoredRollout, examples: list[Example], group_size: int,
                  world: World = World()) -> None:
    """`rollouts/step-N.jsonl`: each sampled completion with its prompt, gold answer, reward and advantage
    (every rank's, in batch order; written by rank 0)."""
    lines = []
    for i, text in enumerate(batch.texts):
        ex = examples[i // group_size]
        lines.append(json.dumps({"id": ex.id, "question": ex.question, "gold": ex.answer, "completion": text,
                                 "reward": batch.rewards[i].item(), "correct": batch.correct[i],
                                 "advantage": batch.advantages[i].item()}, ensure_ascii=False))
    lines = [line for part in world.gather_objects(lines) for line in part]
    if world.is_main:
        atomic_write_text(run.rollouts_dir / f"step-{step}.jsonl", "\n".join(lines) + "\n")
