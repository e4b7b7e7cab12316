"""Noticing a run that cannot learn, and saying why in one line.

GRPO learns only from groups whose completions scored differently. A run can spend every step computing
updates from nothing: when the task is out of the model's reach (every reward 0), when it is trivial (every
reward 1), or when the skipped behavior model is so far from the policy that it samples noise. The last is
the one Nested-ReFT adds, and the costliest to miss: measured on SmolLM2-135M, batches at KL(mu || pi) of
1.4 nats/token barely learned and at 3.7 nothing at all, where the full model learned at once.
`TrainingHealth` watches the metrics rows and names the likely cause and the setting to change.
"""

from __future__ import annotations

from typing import Any

from nested_reft.recipe import Recipe

# Steps in a row without any learning signal before warning.
PATIENCE = 3
# KL(mu || pi) per token, in nats, far above what learning tolerates (see the module docstring).
KL_LIMIT = 1.0
# While a problem lasts, the warning repeats every this many steps.
REPEAT_EVERY = 10


class TrainingHealth:
    """Reads each metrics row; `check` returns a one-line warning when the run is not learning, else None."""

    def __init__(self, recipe: Recipe):
        self.skipping = recipe.skipping
        self.quiet_steps = 0  # steps in a row where every group's rewards were equal
        self.far_steps = 0  # steps in a row with KL(mu || pi) above KL_LIMIT
        self.told_cannot_pay = False

    def check(self, row: dict[str, Any]) -> str | None:
        self.quiet_steps = self.quiet_steps + 1 if row["frac_reward_zero_std"] == 1.0 else 0
        self.far_steps = self.far_steps + 1 if row["kl_mu_pi"] > KL_LIMIT else 0
        if _due(self.quiet_steps, PATIENCE):
            prefix = f"no learning signal for {self.quiet_steps} steps: every group's rewards were equal"
            if self.far_steps:
                return (f"{prefix}, and KL(mu||pi) is {row['kl_mu_pi']:.2f} nats/token: the skipped model samples "
                        f"noise; {self._less_skipping()}")
            if row["accuracy"] == 1.0:
                return f"{prefix} (all correct): the data is too easy for the model; use harder problems"
            if row["accuracy"] == 0.0:
                return (f"{prefix} (none correct): the task is beyond the model as sampled; raise "
                        f"rollout.num_generations or rollout.max_completion_length, add reward.format_weight, "
                        f"or use easier problems")
            return f"{prefix}: raise rollout.num_generations or rollout.temperature"
        if _due(self.far_steps, 2):
            return (f"KL(mu||pi) {row['kl_mu_pi']:.2f} nats/token is far above what learning tolerates (~{KL_LIMIT}): "
                    f"the skipped model samples what the policy would not; {self._less_skipping()}")
        if row.get("next_num_skipped") == 0 and not row["skipped_layers"] and not self.told_cannot_pay:
            self.told_cannot_pay = True  # once: it is the model's property, not a passing state
            costs = self.skipping.calibration_file or "reports/layer_costs.json"
            return (f"skipping cannot pay here: even the cheapest layer is predicted above skipping.target_kl "
                    f"{row['target_kl']:g} nats/token ({costs}), so the full model samples, at baseline's cost; "
                    f"a higher target_kl skips layers, at the risk of learning less")
        return None

    def _less_skipping(self) -> str:
        if self.skipping.strategy == "adaptive":
            return "lower skipping.ratio_range's lower bound, or skipping.target_kl"
        return "lower skipping.ratio, or use skipping.strategy=adaptive"


def _due(count: int, patience: int) -> bool:
    """Warn when a streak reaches `patience`, then every REPEAT_EVERY steps while it lasts."""
    return count == patience or (count > patience and (count - patience) % REPEAT_EVERY == 0)
