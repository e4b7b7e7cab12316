"""Rewards: what a completion is worth.

The package splits along its seams:
- `answers`: the verifiable math reward (extracting a final answer, parsing gold answers, comparing them);
- `builtin`: the built-in reward functions (`math`, `format`, and the shaping terms `soft_overlong`, `length`,
  `repetition`);
- `user`: users' reward functions (`path/to/file.py:function`, `package.module:function`): importing and calling
  them, and describing their faults;
- `workers`: the worker processes where symbolic checks and users' functions run, so that neither can hang or
  crash the trainer;
- `functions`: a run's reward, the weighted sum of its functions called as TRL calls them (`RewardFunctions`).

The math reward's names are re-exported here (`from nested_reft.rewards import math_reward`).
"""

from nested_reft.rewards.answers import (
    RewardResult,
    answers_match,
    extract_answer,
    has_marked_answer,
    math_reward,
    parse_gold_answer,
)

__all__ = ["RewardResult", "answers_match", "extract_answer", "has_marked_answer", "math_reward", "parse_gold_answer"]
