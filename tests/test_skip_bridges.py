"""Skip bridges: an untrained bridge is the plain skip, a trained one runs where its layer was, the same in the
dynamic and the static cache, and a layer that is kept never runs its bridge."""

import pytest
import torch

from nested_reft.objective import completion_hidden_states
from nested_reft.skip_bridges import SkipBridges
from nested_reft.skipping import skip_layers

from .conftest import NUM_LAYERS, VOCAB_SIZE
from .test_rollout import SAMPLED, run


def trained_bridges(model, seed=0):
    bridges = SkipBridges(model.config.hidden_size, range(1, NUM_LAYERS - 1), rank=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bridges.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)  # as if trained
    return bridges


def hidden(model, ids, skip=(), bridges=None):
    with torch.no_grad(), skip_layers(model, skip, bridges):
        return completion_hidden_states(model, ids, torch.ones_like(ids), 2)


def test_an_untrained_bridge_is_the_plain_skip(tiny_llama):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    bridges = SkipBridges(tiny_llama.config.hidden_size, range(1, NUM_LAYERS - 1), rank=4)
    assert torch.equal(hidden(tiny_llama, ids, (1, 3), bridges), hidden(tiny_llama, ids, (1, 3)))


def test_a_bridge_runs_where_its_layer_was(tiny_llama):
    """Skipping layers 2 and 3 with bridges is the decoder [0, 1, bridge 2, bridge 3, 4, 5]; skipping the last
    layers puts their bridges before the final norm. Checked against the layers and bridges called by hand."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    bridges = trained_bridges(tiny_llama)
    layers = tiny_llama.model.layers
    for skip in [(2, 3), (4,), (1, 4)]:
        calls = []
        handles = [layer.register_forward_pre_hook(lambda *_a, i=i: calls.append(("layer", i)))
                   for i, layer in enumerate(layers)]
        handles += [bridges[i].register_forward_pre_hook(lambda *_a, i=i: calls.append(("bridge", i)))
                    for i in range(1, NUM_LAYERS - 1)]
        try:
            out = hidden(tiny_llama, ids, skip, bridges)
        finally:
            for h in handles:
                h.remove()
        assert calls == bridges.plan(skip, NUM_LAYERS) == [
            ("bridge", i) if i in skip else ("layer", i) for i in range(NUM_LAYERS)]
        assert not torch.equal(out, hidden(tiny_llama, ids, skip))  # the bridges did something
    assert hidden(tiny_llama, ids, (), bridges).equal(hidden(tiny_llama, ids))  # nothing skipped: no bridge runs


@pytest.mark.parametrize("skip", [(1, 2), (3, 4)], ids=["middle", "before-the-last"])
def test_dynamic_and_static_caches_run_the_same_bridges(tiny_llama, tiny_prompts, skip):
    bridges = trained_bridges(tiny_llama, seed=1)
    common = dict(eos=[VOCAB_SIZE], params=SAMPLED, skip=skip, seed=3, max_new_tokens=10)
    dynamic = run(tiny_llama, tiny_prompts, kv_cache="dynamic", bridges=bridges, **common)
    static = run(tiny_llama, tiny_prompts, kv_cache="static", bridges=bridges, **common)
    plain = run(tiny_llama, tiny_prompts, kv_cache="dynamic", **common)
    assert torch.equal(dynamic.completion_ids, static.completion_ids)
    torch.testing.assert_close(dynamic.behavior_log_probs, static.behavior_log_probs, atol=1e-5, rtol=0)
    assert not torch.equal(dynamic.behavior_log_probs, plain.behavior_log_probs)
