"""Model FLOPs of a step's parts and the matmul peak they are compared with."""

import pytest
import torch
from transformers import LlamaConfig

from nested_reft.throughput import ModelFlops, matmul_peak, step_flops

from .conftest import NUM_LAYERS, VOCAB_SIZE, build_tiny


def test_model_flops_count_every_linear_weight_twice_per_token():
    model = build_tiny(LlamaConfig)  # hidden 64, 4 heads of 16 (2 key/value heads), MLP 128
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # q, o; k, v; gate, up, down
    flops = ModelFlops.of(model)
    assert flops == ModelFlops(layer=2 * per_layer, attention=4 * 64, head=2 * VOCAB_SIZE * 64, num_layers=NUM_LAYERS)
    assert flops.forward(tokens=3, context=10, layers=2, head_tokens=1) == 3 * 2 * (2 * per_layer + 4 * 64 * 10) + \
        2 * VOCAB_SIZE * 64


def test_step_flops_prefill_each_prompt_once_decode_through_kept_layers_update_three_forwards():
    flops = ModelFlops(layer=100.0, attention=1.0, head=1000.0, num_layers=4)
    prompts, completions = [6, 6, 2, 2], [3, 1, 2, 2]  # two prompts, two completions each
    parts = step_flops(flops, prompts, completions, group_size=2, kept_layers=3)
    assert parts["prefill"] == flops.forward(6, 3, 3, 1) + flops.forward(2, 1, 3, 1)
    assert parts["decode"] == sum(flops.forward(c, p + c / 2, 3, c) for p, c in zip(prompts, completions))
    assert parts["update"] == 3 * sum(flops.forward(p + c, (p + c) / 2, 4, c) for p, c in zip(prompts, completions))
    assert step_flops(flops, prompts, completions, 2, kept_layers=4)["decode"] > parts["decode"]


def test_matmul_peak_is_a_rate_in_flops_per_second():
    peak = matmul_peak(torch.device("cpu"), torch.float32, size=128, repeats=2)
    assert 1e6 < peak < 1e15
