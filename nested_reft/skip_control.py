"""Deciding how much to skip: per-layer skip costs, and the controller that holds KL(mu || pi) at a target.

Skipping is only worth it while the behavior model stays close to the policy. On SmolLM2-135M a quarter of
the layers skipped at random gives 2-7 nats/token and completions that never earn a reward, while the
cheapest single layers cost ~0.1 nats/token each. So two things decide a good skip set:

- **Which layers**: the cheapest first. `LayerCosts` holds, per eligible layer, the KL of the model with that
  one layer skipped, measured by `calibrate-skips` or by a short probe at the start of a run
  (`calibrate.probe_layer_costs`), and saved as JSON in the same schema either way.
- **How many**: `AdaptiveController` predicts the KL of skipping the k cheapest layers as
  `scale * (sum of their single-layer costs)`, where `scale` (the measured over the predicted KL, smoothed)
  corrects for layers interacting and for the model changing as it trains. After each batch it reads the
  KL(mu || pi) that training measured anyway (`kl_mu_pi`) and picks the largest k whose prediction stays at
  `target_kl`. It adds at most one layer per batch (a layer it has not tried is only a prediction) but
  backs off at once when the measurement overshoots, and a dead band keeps it from dithering.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nested_reft.errors import UserError

# Backing off needs the smoothed prediction for the current count to exceed the target by this factor; the
# band between target and target * DEAD_BAND is where the controller holds still instead of dithering.
DEAD_BAND = 1.25
# Weight of a new measurement in the smoothed log(measured / predicted) KL. One batch holds a few thousand
# tokens, whose KL estimate varies by ~20-30% from batch to batch; 0.5 halves that noise and still follows a
# real change within two or three batches.
SMOOTHING = 0.5


@dataclass
class LayerCosts:
    """The cost of skipping each eligible decoder layer alone, in nats/token of KL between the two models.

    `kl` maps layer index -> cost. The JSON form is the `calibrate-skips` report's: {"num_layers": L,
    "layers": [{"layer": i, "kl": cost, ...}, ...]}, with `kl_mu_pi` (KL(skipped || full), the direction
    training measures) preferred over `kl` (KL(full || skipped)) when an entry has both.
    """

    kl: dict[int, float]
    num_layers: int

    def cheapest(self, k: int, among: list[int] | None = None) -> tuple[int, ...]:
        """The k cheapest layers (restricted to `among` when given), ties broken by index."""
        pool = sorted(self.kl if among is None else [i for i in among if i in self.kl], key=lambda i: (self.kl[i], i))
        return tuple(sorted(pool[:k]))

    def total(self, layers: tuple[int, ...]) -> float:
        """Sum of the single-layer costs: the additive prediction of skipping them together."""
        return sum(self.kl[i] for i in layers)

    def to_json(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers,
                "layers": [{"layer": i, "kl_mu_pi": cost} for i, cost in sorted(self.kl.items())]}

    @classmethod
    def read(cls, path: str | Path, num_layers: int) -> LayerCosts:
        """Read a profile written by `calibrate-skips` or by a run's probe; UserError naming the file otherwise."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"skipping.calibration_file: cannot read '{path}' as JSON ({exc})") from None
        entries = data.get("layers") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise UserError(f"skipping.calibration_file: '{path}' has no \"layers\" list (write it with calibrate-skips)")
        if isinstance(data.get("num_layers"), int) and data["num_layers"] != num_layers:
            raise UserError(f"skipping.calibration_file: '{path}' was measured on {data['num_layers']} layers, "
                            f"the model has {num_layers}")
        kl: dict[int, float] = {}
        for entry in entries:
            index = entry.get("layer") if isinstance(entry, dict) else None
            cost = entry.get("kl_mu_pi", entry.get("kl")) if isinstance(entry, dict) else None
            valid_cost = isinstance(cost, (int, float)) and not isinstance(cost, bool) and math.isfinite(cost) and cost >= 0
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers or not valid_cost:
                raise UserError(f"skipping.calibration_file: '{path}' layers: expected {{\"layer\": index in "
                                f"[0, {num_layers - 1}], \"kl\": finite cost >= 0}}, found {entry!r}")
            kl[index] = float(cost)
        return cls(kl, num_layers)

    def write(self, path: Path) -> None:
        from nested_reft.rundir import atomic_write_json

        atomic_write_json(path, self.to_json())


@dataclass
class AdaptiveController:
    """Chooses the number of layers to skip per batch so that the measured KL(mu || pi) stays at `target_kl`.

    `count` is the decision for the next batch, always within [min_count, max_count]. `update` takes the
    count a batch was sampled with and the KL measured on it. The whole state is a few numbers, saved in the
    checkpoint, so a resumed run decides exactly what an uninterrupted one would. With skip bridges, `update` is
    also told the measured KL of the next set, which then decides whether to raise (smoothed, as measurements on a
    few rows are noisy).
    """

    costs: LayerCosts
    eligible: list[int]
    target_kl: float
    min_count: int
    max_count: int
    count: int = -1
    log_scale: float = 0.0  # smoothed log(measured KL / additive prediction); 0 until the first measurement
    measured: bool = False
    # The next set's measured KL (`update`'s candidate), smoothed over the batches that measured that same count.
    next_count: int = -1
    next_kl: float = math.inf
    last: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.max_count = min(self.max_count, len(self.eligible))
        self.min_count = min(self.min_count, self.max_count)
        if self.count < 0:  # start where the profile says, trusting its costs as they are
            self.count = self._largest_within_target()

    def predicted_kl(self, k: int) -> float:
        return math.exp(self.log_scale) * self.costs.total(self.costs.cheapest(k, self.eligible))

    def layers(self) -> tuple[int, ...]:
        """The layers to skip in the next batch: the `count` cheapest eligible ones."""
        return self.costs.cheapest(self.count, self.eligible)

    def next_layers(self) -> tuple[int, ...]:
        """The set it would try next: the `count + 1` cheapest (the current set when it cannot skip more)."""
        return self.costs.cheapest(min(self.count + 1, self.max_count), self.eligible)

    def update(self, used: int, measured_kl: float, candidate: tuple[int, float] | None = None) -> None:
        """Learn from a batch sampled with `used` layers skipped whose measured KL(mu || pi) was `measured_kl`.

        `candidate` (count, KL): the KL of the next set (`next_layers`), measured on the same batch (the skip
        bridges' training measures it). Raising to `used + 1` then rests on that measurement instead of the
        prediction: layer costs change as the skipped view learns to track the policy, and a probe made at step 1
        no longer knows them."""
        predicted = self.costs.total(self.costs.cheapest(used, self.eligible))
        if used > 0 and predicted > 0 and math.isfinite(measured_kl):
            observed = math.log(max(measured_kl, 1e-6) / predicted)
            self.log_scale = observed if not self.measured else self.log_scale + SMOOTHING * (observed - self.log_scale)
            self.measured = True
        best = self._largest_within_target()
        if candidate is not None and math.isfinite(candidate[1]):
            count, kl = candidate
            self.next_kl = kl if count != self.next_count else self.next_kl + SMOOTHING * (kl - self.next_kl)
            self.next_count = count
        if self.next_count == used + 1:
            can_raise = self.next_kl <= self.target_kl  # measured (on a few rows, smoothed) beats predicted
        else:
            can_raise = best > used
        if can_raise and used < self.max_count:
            decision, self.count = "raise", max(self.min_count, used + 1)
        elif used > self.min_count and self.predicted_kl(used) > DEAD_BAND * self.target_kl:
            decision, self.count = "lower", min(best, used - 1)
        else:
            decision, self.count = "hold", used
        self.last = {"decision": decision, "kl_predicted_next": self.predicted_kl(self.count)}

    def _largest_within_target(self) -> int:
        best = self.min_count
        for k in range(self.min_count, self.max_count + 1):
            if self.predicted_kl(k) <= self.target_kl:
                best = k
        return best

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "log_scale": self.log_scale, "measured": self.measured,
                "next_count": self.next_count, "next_kl": self.next_kl}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state. The saved count is brought within this controller's [min_count,
        max_count]: a run resumed with a narrower `ratio_range` skips within the new range from its first batch."""
        self.log_scale, self.measured = state["log_scale"], state["measured"]
        self.next_count, self.next_kl = state.get("next_count", -1), state.get("next_kl", math.inf)
        self.count = min(max(state["count"], self.min_count), self.max_count)
