"""The adaptive skip controller on synthetic measurements, and the per-layer cost profile it reads."""

import json
import math
import random

import pytest

from nested_reft.errors import UserError
from nested_reft.skip_control import AdaptiveController, LayerCosts

from .test_skipping import PROFILE, write_profile

ELIGIBLE = sorted(PROFILE)


def controller(target=0.5, lo=0, hi=18, **costs_override) -> AdaptiveController:
    return AdaptiveController(LayerCosts(dict(PROFILE, **costs_override), 20), ELIGIBLE, target, lo, hi)


def true_kl(layers: tuple[int, ...], interaction: float = 1.6) -> float:
    """A synthetic model whose layers interact: skipping them together costs `interaction` times their sum."""
    return interaction * sum(PROFILE[i] for i in layers)


def run(ctrl: AdaptiveController, steps: int, noise: float = 0.0, seed: int = 0, **kw) -> list[int]:
    rng, counts = random.Random(seed), []
    for _ in range(steps):
        layers = ctrl.layers()
        counts.append(len(layers))
        ctrl.update(len(layers), true_kl(layers, **kw) * math.exp(rng.gauss(0, noise)))
    return counts


def test_cheapest_orders_by_cost_then_index():
    costs = LayerCosts({1: 0.5, 2: 0.1, 3: 0.1, 4: 0.3}, 6)
    assert costs.cheapest(2) == (2, 3) and costs.cheapest(3) == (2, 3, 4)
    assert costs.cheapest(2, among=[1, 3, 4]) == (3, 4) and costs.total((2, 4)) == pytest.approx(0.4)


def test_starts_where_the_profile_says():
    assert controller(target=0.5).count == 3  # 0.11 + 0.14 + 0.15 = 0.40 <= 0.5 < 0.56
    assert controller(target=0.05).count == 0  # even the cheapest layer costs more than the target


def test_raises_the_count_below_target_one_layer_at_a_time():
    ctrl = controller(target=0.5)
    ctrl.update(1, 0.05)  # measured far below the prediction for one layer
    assert ctrl.last["decision"] == "raise" and ctrl.count == 2  # +1 per batch, however low the measurement
    ctrl.update(2, 0.1)
    assert ctrl.count == 3


def test_lowers_the_count_above_target_at_once():
    ctrl = controller(target=0.5)
    ctrl.update(6, 3.0)  # a batch at six layers came out at 6x the target
    assert ctrl.last["decision"] == "lower" and ctrl.count < 3


def test_holds_inside_the_dead_band():
    ctrl = controller(target=0.5)
    ctrl.update(3, 0.55)  # above target, but within the dead band
    assert ctrl.last["decision"] == "hold" and ctrl.count == 3


def test_settles_and_then_stays_put():
    counts = run(controller(target=0.5), 40)
    settled = counts[-1]
    assert true_kl(ELIGIBLE_CHEAPEST(settled)) <= 0.5 * 1.25
    assert true_kl(ELIGIBLE_CHEAPEST(settled + 1)) > 0.5  # the largest count within the target
    first = next(i for i, c in enumerate(counts) if c == settled)
    assert first <= 10 and all(c == settled for c in counts[first:])


def ELIGIBLE_CHEAPEST(k: int) -> tuple[int, ...]:
    return LayerCosts(PROFILE, 20).cheapest(k)


def test_does_not_oscillate_on_noisy_measurements():
    """Batch-to-batch KL noise of 30%: the count moves by one layer at most and rarely changes."""
    for seed in range(5):
        counts = run(controller(target=0.5), 60, noise=0.3, seed=seed)[10:]
        changes = sum(a != b for a, b in zip(counts, counts[1:]))
        assert max(counts) - min(counts) <= 2 and changes <= 12, counts


def test_respects_its_bounds():
    low = run(controller(target=5.0, lo=0, hi=4), 20)
    assert max(low) == 4  # a generous target is capped at the upper bound
    high = run(controller(target=0.01, lo=2, hi=18), 20)
    assert min(high) == 2  # a target no set can meet stops at the lower bound, never below


def test_state_round_trip_gives_the_same_decisions():
    ctrl = controller(target=0.5)
    run(ctrl, 7, noise=0.3, seed=1)
    state = json.loads(json.dumps(ctrl.state_dict()))
    expected = run(ctrl, 10, noise=0.3, seed=2)
    resumed = controller(target=0.5)
    resumed.load_state_dict(state)
    assert run(resumed, 10, noise=0.3, seed=2) == expected


@pytest.mark.parametrize("lo, hi", [(0, 4), (14, 18)], ids=["narrower-above", "narrower-below"])
def test_a_state_resumed_under_a_narrower_range_skips_within_it(lo, hi):
    ctrl = controller(target=1.2)
    run(ctrl, 12)
    assert 4 < ctrl.count < 14  # the saved decision lies outside both resumed ranges
    resumed = controller(target=1.2, lo=lo, hi=hi)
    resumed.load_state_dict(ctrl.state_dict())
    assert lo <= resumed.count <= hi and resumed.log_scale == ctrl.log_scale
    assert all(lo <= k <= hi for k in run(resumed, 10))


def test_profile_round_trip(tmp_path):
    costs = LayerCosts({3: 0.25, 4: 0.125}, 8)
    costs.write(tmp_path / "costs.json")
    assert LayerCosts.read(tmp_path / "costs.json", 8) == costs
    reverse_preferred = write_profile(tmp_path / "both.json", {}, 8)
    reverse_preferred.write_text(json.dumps({"layers": [{"layer": 3, "kl": 9.0, "kl_mu_pi": 0.5}]}))
    assert LayerCosts.read(reverse_preferred, 8).kl == {3: 0.5}  # training measures KL(mu || pi)
    with pytest.raises(UserError, match="both.json.*8 layers"):
        LayerCosts.read(write_profile(tmp_path / "both.json", {3: 0.1}, 8), 12)


def test_rises_as_the_measured_cost_of_the_next_set_falls():
    """Synthetic: every layer's true cost shrinks by 10% a step (the skip bridges learning); the controller is told
    the KL of the set it uses and of the next one (count + 1), measured. It skips more as they fall, past what the
    stale step-1 profile predicts, and never uses a set whose measured KL is above the target at the time."""
    ctrl = controller(target=0.5)
    start = ctrl.count
    shrink = 1.0
    counts, used_kls = [], []
    for _ in range(40):
        used = ctrl.count
        used_kls.append(shrink * true_kl(ctrl.layers()))
        ctrl.update(used, used_kls[-1], (len(ctrl.next_layers()), shrink * true_kl(ctrl.next_layers())))
        counts.append(ctrl.count)
        shrink *= 0.9
    assert counts[-1] > start + 3 and counts[3:] == sorted(counts[3:])
    assert max(used_kls[3:]) <= 0.5  # each raise rested on a measurement within the target
    stale = controller(target=0.5)
    for _ in range(40):  # told only of the set it uses: it relies on the profile's prediction for the next
        stale.update(stale.count, true_kl(stale.layers()))
    assert counts[-1] > stale.count
