"""Gradient checkpointing: the same gradients as without it (with skipping, chunked log-probs and bf16), really
recomputing in backward, and the KV-cache sampler unaffected when the model is left in train mode."""

from __future__ import annotations

import pytest
import torch

from nested_reft.memory import (
    gradient_checkpointing_enabled,
    resolve_gradient_checkpointing,
    set_gradient_checkpointing,
)
from nested_reft.objective import completion_log_probs
from nested_reft.precision import MasterWeights
from nested_reft.rollout import generate
from nested_reft.sampling import SamplingParams
from nested_reft.skipping import skip_layers

from .conftest import PAD_ID


def test_auto_is_on_with_cuda_and_off_on_cpu():
    assert resolve_gradient_checkpointing("auto", torch.device("cuda", 0)) is True
    assert resolve_gradient_checkpointing("auto", torch.device("cpu")) is False
    assert resolve_gradient_checkpointing(True, torch.device("cpu")) is True
    assert resolve_gradient_checkpointing(False, torch.device("cuda", 0)) is False


def gradients(model, ids, attention, skip, checkpointing: bool, mode: str) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of the mean completion log-prob (LM head in chunks of 7 rows), and how many tensor elements
    autograd saved for backward during the forward (what checkpointing exists to cut)."""
    masters = MasterWeights(model, mode)
    set_gradient_checkpointing(model, checkpointing)
    assert gradient_checkpointing_enabled(model) is checkpointing
    saved = [0]

    def count(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel()
        return tensor

    model.train()
    try:
        with skip_layers(model, skip), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            lp = completion_log_probs(model, ids, attention, 6, SamplingParams(temperature=0.8), chunk_size=7)
        masters.backward(lp.mean())
    finally:
        model.eval()
    names = [name for name, _ in model.named_parameters()]
    return {n: p.grad.clone() for n, p in zip(names, masters.params) if p.grad is not None}, saved[0]


@pytest.mark.parametrize("mode", ["no", "bf16"])
@pytest.mark.parametrize("skip", [(), (2, 4)], ids=["full", "skip-2-4"])
def test_checkpointing_gives_the_same_gradients(tiny_model, mode, skip):
    """Recomputation replays the same float operations on the same inputs, so gradients agree to float32
    rounding of the backward's different accumulation order (rtol 1e-5; measured: equal) in float32 and in bf16."""
    import copy

    ids = torch.randint(3, 128, (3, 14), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # a left-padded row
    plain, plain_saved = gradients(copy.deepcopy(tiny_model), ids, attention, skip, False, mode)
    checkpointed, ckpt_saved = gradients(copy.deepcopy(tiny_model), ids, attention, skip, True, mode)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)
    assert ckpt_saved < plain_saved / 3  # measured ~1/20-1/25: layer inputs only, activations recomputed
    skipped = [f"model.layers.{i}." for i in skip]
    assert not any(name.startswith(tuple(skipped)) for name in plain)  # skipped layers get no gradient


def test_sampler_keeps_its_kv_cache_with_checkpointing_in_train_mode(tiny_model, tiny_prompts):
    """The trainer leaves the model in train mode with checkpointing on; sampling must still use its KV cache
    (transformers drops it for checkpointed layers in train mode): the rollout is identical to eval mode's, and
    the model's mode is restored."""
    params = SamplingParams(temperature=1.0)

    def sample():
        return generate(tiny_model, tiny_prompts, num_generations=2, max_new_tokens=6, params=params,
                        eos_token_ids=[2], pad_token_id=PAD_ID, seed=3)

    reference = sample()
    set_gradient_checkpointing(tiny_model, True)
    tiny_model.train()
    got = sample()
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    assert torch.equal(got.completion_ids, reference.completion_ids)
    assert torch.equal(got.behavior_log_probs, reference.behavior_log_probs)
