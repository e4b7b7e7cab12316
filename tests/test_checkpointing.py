"""Checkpoints: a GPU-written trainer state resumes on any device, CUDA RNG states round-trip, and a step abandoned
on a stop request leaves the last finished step checkpointed, from which a resume is bit-identical."""

import contextlib
import signal

import pytest
import torch

from nested_reft import decoding, update
from nested_reft.checkpointing import TRAINER_STATE, load_trainer_state, rng_state, set_rng_state
from nested_reft.stopping import GracefulStop, TrainingStopped
from nested_reft.trainer import train

from .test_trainer import assert_same_run, starts_with_target, target_id, tiny_recipe


@contextlib.contextmanager
def storages_tagged_cuda():
    """torch.save tags every CPU storage as living on cuda:0, as a checkpoint written on a GPU is."""
    registry = torch.serialization._package_registry
    entry = (-1000, lambda obj: "cuda:0" if obj.device.type == "cpu" else None, lambda obj, location: None)
    registry.append(entry)
    registry.sort(key=lambda e: e[0])
    try:
        yield
    finally:
        registry.remove(entry)


def test_a_checkpoint_written_on_a_gpu_resumes_on_this_machine(tiny_run_inputs, tmp_path):
    """Every tensor of trainer_state.pt is loaded to the CPU first: without it, torch.load would put a GPU-written
    optimiser state back on cuda:0 (for every rank, on one GPU), and on a machine without that GPU it fails."""
    model_dir, data = tiny_run_inputs
    common = ["train.steps=3", "train.save_every=1", "skipping.ratio=0.25"]
    reward = starts_with_target(target_id(model_dir))
    full = train(tiny_recipe(model_dir, data, tmp_path / "full", *common), reward_fn=reward)
    recipe = tiny_recipe(model_dir, data, tmp_path / "gpu", *common, "train.steps=2")
    partial = train(recipe, reward_fn=reward)
    state_file = partial.checkpoints_dir / "step-2" / TRAINER_STATE
    state = torch.load(state_file, weights_only=False)
    with storages_tagged_cuda():
        torch.save(state, state_file)
    if not torch.cuda.is_available():  # the file really is a GPU checkpoint: a plain load cannot place it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(state_file, weights_only=False)
    assert all(t.device.type == "cpu" for t in load_trainer_state(partial.checkpoints_dir / "step-2")["optimizer"]
               ["state"][0].values() if isinstance(t, torch.Tensor))
    resumed = train(tiny_recipe(model_dir, data, tmp_path / "gpu", *common), resume=True, reward_fn=reward)
    assert_same_run(full, resumed)


def test_cuda_rng_state_is_saved_and_restored(monkeypatch):
    """On a CUDA device the rank's CUDA generator is checkpointed with the CPU one, and restored on resume (dropout
    and any sampling on the GPU draw from it). Simulated: no GPU here."""
    cuda_state = {"now": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: cuda_state.update(now=state.clone()))
    gpu = torch.device("cuda", 0)
    saved = rng_state(gpu)
    assert torch.equal(saved["cuda"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    expected_cpu = torch.rand(4)
    cuda_state["now"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the generators move on...
    set_rng_state(saved, gpu)  # ...and are put back
    assert torch.equal(cuda_state["now"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert torch.equal(torch.rand(4), expected_cpu)
    assert rng_state(torch.device("cpu"))["cuda"] is None


@pytest.mark.parametrize("when", ["rollout", "scoring", "update"])
def test_a_step_abandoned_on_a_stop_request_keeps_the_last_finished_one(tiny_run_inputs, tmp_path, monkeypatch, when):
    """A stop requested during step 3 (in its rollout, its scoring or between its micro-batches) abandons it:
    nothing of it is logged or saved, step 2 is checkpointed (save_every would not have), and the resumed run is
    bit-identical to an uninterrupted one."""
    model_dir, data = tiny_run_inputs
    common = ["train.steps=4", "train.save_every=100", "skipping.ratio=0.25", "train.micro_batch_size=4",
              "rollout.max_completion_length=6"]
    target = starts_with_target(target_id(model_dir))
    full = train(tiny_recipe(model_dir, data, tmp_path / "full", *common), reward_fn=target)

    stop, steps_done = GracefulStop(), []

    def stop_in_step_3(where):
        if where == when and len(steps_done) == 2:
            stop.request(signal.SIGTERM)

    def reward(text, ids, example):
        stop_in_step_3("scoring")
        return target(text, ids, example)

    sample_tokens, policy_loss = decoding.sample_tokens, update.policy_loss
    monkeypatch.setattr(decoding, "sample_tokens", lambda *a, **k: (stop_in_step_3("rollout"), sample_tokens(*a, **k))[1])
    monkeypatch.setattr(update, "policy_loss", lambda *a, **k: (stop_in_step_3("update"), policy_loss(*a, **k))[1])
    recipe = tiny_recipe(model_dir, data, tmp_path / "stopped", *common)
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, reward_fn=reward, on_step=steps_done.append, stop=stop)
    assert (stopped.value.step, stopped.value.abandoned, stopped.value.exit_code) == (2, 3, 143)
    run_dir = tmp_path / "stopped"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert stopped.value.checkpoint == run_dir / "checkpoints" / "step-2"
    assert [r["step"] for r in full.read_metrics()][:2] == [1, 2] == [r["step"] for r in steps_done]

    monkeypatch.undo()
    resumed = train(recipe, resume=True, reward_fn=target)
    assert_same_run(full, resumed)

