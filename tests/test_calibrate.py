"""The per-layer skip-cost probe on a tiny model, against KL computed from the two models' full logits."""

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

from nested_reft.calibrate import probe_layer_costs
from nested_reft.rollout import generate
from nested_reft.sampling import SamplingParams, log_probs
from nested_reft.skipping import skip_layers

from .conftest import NUM_LAYERS, PAD_ID, build_tiny


@pytest.mark.parametrize(
    "config_class, overrides",
    [(LlamaConfig, {}), (MistralConfig, dict(sliding_window=None)),
     # Per-layer masks and rotary embeddings: the probe must replay what each layer was called with.
     (Qwen2Config, dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
     (Gemma3TextConfig, dict(head_dim=16, sliding_window=4))],
    ids=["llama", "mistral", "qwen2-sliding", "gemma3"],
)
def test_probe_costs_equal_the_exact_kl_of_each_skipped_layer(config_class, overrides, tiny_prompts):
    model = build_tiny(config_class, **overrides)
    params = SamplingParams(0.7)
    rollout = generate(model, tiny_prompts, num_generations=2, max_new_tokens=5, params=params,
                       eos_token_ids={2}, pad_token_id=PAD_ID, seed=0)
    rows = [0, 2, 4, 6]  # one completion per prompt
    costs = probe_layer_costs(model, rollout, rows, list(range(1, NUM_LAYERS - 1)), params)
    assert sorted(costs.kl) == list(range(1, NUM_LAYERS - 1)) and costs.num_layers == NUM_LAYERS

    ids, attention = rollout.sequences()
    ids, attention, mask = ids[rows], attention[rows], rollout.completion_mask[rows]
    width = rollout.prompt_ids.shape[1]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)

    def completion_log_probs(model):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        return log_probs(logits[:, width - 1 : -1], params)[mask]  # [valid tokens, V]

    full = completion_log_probs(model)
    for layer, cost in costs.kl.items():
        with skip_layers(model, (layer,)):
            skipped = completion_log_probs(model)
        exact = (skipped.exp() * (skipped - full)).sum(-1).mean().item()  # KL(skipped || full) per token
        assert abs(cost - exact) <= 1e-4 * max(1.0, exact), (layer, cost, exact)
    assert len(set(costs.kl.values())) > 1  # layers differ in cost
