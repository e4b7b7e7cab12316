"""One-line warnings for runs that cannot learn, each naming the cause and the setting to change."""

from nested_reft.health import PATIENCE, TrainingHealth
from nested_reft.recipe import load_recipe


def row(zero_std=1.0, accuracy=0.0, kl=0.0):
    return {"frac_reward_zero_std": zero_std, "accuracy": accuracy, "kl_mu_pi": kl, "skipped_layers": []}


def feed(health, rows):
    return [health.check(r) for r in rows]


def test_no_signal_from_a_hard_task_warns_once_at_patience():
    warnings = feed(TrainingHealth(load_recipe(None)), [row()] * (PATIENCE + 2))
    assert warnings[: PATIENCE - 1] == [None] * (PATIENCE - 1) and warnings[PATIENCE:] == [None, None]
    assert "none correct" in warnings[PATIENCE - 1] and "rollout.num_generations" in warnings[PATIENCE - 1]


def test_no_signal_with_a_far_behavior_model_blames_skipping():
    health = TrainingHealth(load_recipe(None, ["skipping.ratio=0.25"]))
    warnings = feed(health, [row(kl=3.7)] * PATIENCE)
    assert "KL(mu||pi) 3.70" in warnings[1] and "skipping.ratio" in warnings[1]  # far KL: after two steps
    assert "samples noise" in warnings[2] and "skipping.strategy=adaptive" in warnings[2]


def test_adaptive_runs_are_pointed_at_their_own_settings():
    health = TrainingHealth(load_recipe(None, ["skipping.strategy=adaptive"]))
    assert "skipping.target_kl" in feed(health, [row(zero_std=0.5, kl=2.0)] * 2)[1]


def test_a_learning_run_gets_no_warning_and_easy_data_is_named():
    assert feed(TrainingHealth(load_recipe(None)), [row(zero_std=0.5, accuracy=0.3, kl=0.2)] * 20) == [None] * 20
    assert "too easy" in feed(TrainingHealth(load_recipe(None)), [row(accuracy=1.0)] * PATIENCE)[-1]


def adaptive_row(skipped, next_count):
    return row(zero_std=0.5, accuracy=0.2) | {"skipped_layers": skipped, "next_num_skipped": next_count,
                                              "target_kl": 0.1, "skip_decision": "hold"}


def test_an_adaptive_run_that_cannot_skip_is_told_once():
    health = TrainingHealth(load_recipe(None, ["skipping.strategy=adaptive"]))
    warnings = feed(health, [adaptive_row([], 0)] * 12)
    assert "skipping cannot pay" in warnings[0] and "target_kl 0.1 " in warnings[0]
    assert warnings[1:] == [None] * 11


def test_an_adaptive_run_is_told_only_once_it_samples_with_the_full_model_by_decision():
    health = TrainingHealth(load_recipe(None, ["skipping.strategy=adaptive"]))
    # the probe batch (full model) decides 1, the layer is measured above the target and lowered to 0: the
    # batch after that is the first the controller chose to sample with the full model
    warnings = feed(health, [adaptive_row([], 1), adaptive_row([3], 0), adaptive_row([], 0)])
    assert warnings[:2] == [None, None] and "skipping cannot pay" in warnings[2]
