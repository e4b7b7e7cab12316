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
