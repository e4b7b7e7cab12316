"""The per-layer skip-cost probe on a tiny model, against KL computed from the two models' full logits; block
influence against the full model's forward, without its logits."""

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

from nested_reft.calibrate import block_influence, probe_layer_costs
from nested_reft.rollout import generate
from nested_reft.sampling import SamplingParams, log_probs
from nested_reft.skipping import decoder_layers, skip_layers

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


def test_block_influence_is_the_full_forwards_and_never_computes_logits(tiny_model, tiny_prompts):
    """The same 1 - cos(h_in, h_out) per layer as hooks on the whole model's forward give, while the LM head (whose
    output would be [B, T, V]) is never called."""
    rollout = generate(tiny_model, tiny_prompts, num_generations=2, max_new_tokens=5, params=SamplingParams(1.0),
                       eos_token_ids={2}, pad_token_id=PAD_ID, seed=0)
    ids, attention = rollout.sequences()
    positions = torch.zeros_like(attention, dtype=torch.bool)
    positions[:, rollout.prompt_ids.shape[1] - 1 : -1] = rollout.completion_mask
    expected = []

    def record(_module, args, kwargs, output):
        h_in, h_out = args[0] if args else kwargs["hidden_states"], output[0] if isinstance(output, tuple) else output
        cos = torch.nn.functional.cosine_similarity(h_in[positions], h_out[positions], dim=-1)
        expected.append((1 - cos).mean().item())

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in decoder_layers(tiny_model)]
    with torch.no_grad():
        tiny_model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0))
    for handle in handles:
        handle.remove()

    head_calls = []
    tiny_model.lm_head.register_forward_hook(lambda _module, args, _output: head_calls.append(args[0].shape))
    assert block_influence(tiny_model, rollout) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert len(expected) == NUM_LAYERS and head_calls == []
