"""The policy update (`update.optimise`) on a tiny model: unbiased statistics over silent groups, no host read per
micro-batch, a stop request that abandons the update with nothing changed, no dropout noise in the ratios."""

import sys
from pathlib import Path

import pytest
import torch

from nested_reft.distributed import World
from nested_reft.models import load_model
from nested_reft.objective import completion_log_probs
from nested_reft.sampling import SamplingParams
from nested_reft.stopping import GracefulStop, StepAbandoned, StopCheck
from nested_reft.update import optimise

from .test_trainer import GradRecorder, NoSchedule, scored_batch, tiny_recipe

PACKAGE = str(Path(__file__).resolve().parents[1] / "nested_reft")
# Groups 0 and 2 carry no signal (equal rewards); groups 1 and 3 do.
REWARDS = [0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1]


@pytest.fixture
def model_and_recipe(tiny_run_inputs):
    model_dir, data = tiny_run_inputs
    model, _ = load_model(str(model_dir), device="cpu")
    # scored_batch samples 4 completions per prompt
    return model, lambda *overrides: tiny_recipe(model_dir, data, "unused", "rollout.num_generations=4", *overrides)


def test_a_silent_group_counts_as_its_whole_group_in_the_kl(model_and_recipe):
    """Off-policy, a silent group's KL is measured on one of its G rows; that row stands for all G, so the
    controller reads the batch's KL, not one biased towards the groups that earned a signal."""
    model, recipe = model_and_recipe
    batch = scored_batch(model, REWARDS, skip=(1,))
    stats = optimise(model, None, GradRecorder(model.parameters()), NoSchedule(), batch, recipe(), SamplingParams(1.0))
    r = batch.rollout
    ids, attention = r.sequences()
    with torch.no_grad():
        lp_old = completion_log_probs(model, ids, attention, r.prompt_ids.shape[1], SamplingParams(1.0))
    per_token = (r.behavior_log_probs - lp_old) * r.completion_mask
    sums, counts = per_token.sum(1), r.completion_mask.sum(1).double()
    trained, silent_first = [4, 5, 6, 7, 12, 13, 14, 15], [0, 8]
    expected = (sums[trained].sum() + 4 * sums[silent_first].sum()) / (counts[trained].sum() + 4 * counts[silent_first].sum())
    unweighted = (sums[trained].sum() + sums[silent_first].sum()) / (counts[trained].sum() + counts[silent_first].sum())
    assert stats["kl_mu_pi"] == pytest.approx(expected.item(), rel=1e-4)
    assert abs(expected - unweighted) > 1e-3 * abs(expected)  # the weighting matters on this batch


def test_the_update_reads_the_device_once_per_pass_not_per_micro_batch(model_and_recipe, monkeypatch):
    """On a GPU every host read of a tensor (.item(), int(), float(), bool(), .tolist()) waits for the device. The
    package's own reads during an update must not grow with the number of micro-batches (transformers' reads
    inside the model's forward are not ours to count)."""
    model, recipe = model_and_recipe
    batch = scored_batch(model, REWARDS, skip=(1,))
    reads = []
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                reads.append(sys._getframe(1).f_code.co_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for micro_batch_size in (1, 8):
        reads.clear()
        optimise(model, None, GradRecorder(model.parameters()), NoSchedule(), batch,
                 recipe(f"train.micro_batch_size={micro_batch_size}", "objective.num_iterations=2"),
                 SamplingParams(1.0))
        counts[micro_batch_size] = len(reads)
    assert counts[1] == counts[8], counts  # 8 micro-batches per pass against 1
    assert counts[1] < 20, counts


def test_a_stop_request_abandons_the_update_before_any_weight_changes(model_and_recipe):
    model, recipe = model_and_recipe
    batch = scored_batch(model, REWARDS, skip=(1,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    stop = GracefulStop()
    stop.request()
    with pytest.raises(StepAbandoned):
        optimise(model, None, optimizer, NoSchedule(), batch, recipe("train.micro_batch_size=2"), SamplingParams(1.0),
                 stop=StopCheck(stop, World()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # AdamW never stepped


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_bucketed_micro_batches_give_the_loss_and_gradients_of_full_width_ones(model_and_recipe, monkeypatch,
                                                                                loss_type):
    """Micro-batches grouped by length and trimmed to their own columns (no padding computed) give the loss,
    gradients and statistics of full-width micro-batches in row order, up to float summation order: on- and
    off-policy rows, lp_old from the no-grad pass (two passes) and from the first pass (one)."""
    from nested_reft.objective import group_advantages
    from nested_reft.rollout import generate
    from nested_reft.scoring import ScoredRollout
    from nested_reft.update import MicroBatch, UpdatePlan

    model, recipe = model_and_recipe
    rollout = generate(model, [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13], [14]], num_generations=4,
                       max_new_tokens=12, params=SamplingParams(1.0), eos_token_ids={1, 5, 9}, pad_token_id=0,
                       skip=(1,), seed=3)
    lengths = rollout.completion_mask.sum(1)
    assert lengths.min() < lengths.max() == rollout.completion_ids.shape[1], "rows must end at different steps"
    rewards = torch.tensor(REWARDS, dtype=torch.float32)
    batch = ScoredRollout(rollout, rewards, [r > 0 for r in REWARDS], [""] * 16, group_advantages(rewards, 4, "group"))

    def full_width(plan, rows, size):
        return [MicroBatch(chunk, left=0, width=plan.mask.shape[1]) for chunk in rows.split(size)]

    bucketed = UpdatePlan.micro_batches
    for passes in (1, 2):
        results = []
        for micro_batches in (bucketed, full_width):
            monkeypatch.setattr(UpdatePlan, "micro_batches", micro_batches)
            recorder = GradRecorder(model.parameters())
            stats = optimise(model, None, recorder, NoSchedule(), batch,
                             recipe("train.micro_batch_size=3", f"objective.loss_type={loss_type}",
                                    f"objective.num_iterations={passes}"), SamplingParams(1.0))
            results.append((stats, recorder.grads))
        (stats, grads), (expected_stats, expected_grads) = results
        for key in ("loss", "kl_mu_pi", "ess", "weight_mean", "clip_frac"):
            assert stats[key] == pytest.approx(expected_stats[key], rel=1e-5, abs=1e-7), key
        for grad, expected in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)

    plan = UpdatePlan.of(batch, 4, World(), skip_zero_advantage=True, beta=0.0)
    trimmed = bucketed(plan, plan.train_rows, 3)
    assert [len(b.rows) for b in trimmed] == [3, 3, 2]
    assert any(b.left > 0 for b in trimmed) and any(b.width < plan.mask.shape[1] for b in trimmed)
    totals = [plan.prompt_lengths[r] + plan.completion_lengths[r] for b in trimmed for r in b.rows.tolist()]
    assert totals == sorted(totals, reverse=True)  # longest first
