"""skip_layers must turn the model into exactly the physically truncated model, copy nothing, and restore it."""

from __future__ import annotations

import copy
import json
import random
from types import SimpleNamespace

import pytest
import torch
from .conftest import NUM_LAYERS, PAD_ID, VOCAB_SIZE, build_tiny
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from nested_reft.errors import UserError
from nested_reft.rollout import generate, left_pad
from nested_reft.sampling import SamplingParams
from nested_reft.skip_control import LayerCosts
from nested_reft.skipping import SkipSampler, decoder_layers, skip_layers

ATOL = 1e-5
SKIP_SETS = [(0,), (NUM_LAYERS - 1,), (0, NUM_LAYERS - 1), (1, 2, 4), (0, 2, 3, NUM_LAYERS - 1)]
SKIP_SETS += [tuple(sorted(random.Random(seed).sample(range(NUM_LAYERS), 3))) for seed in range(3)]


def truncated_copy(model, skip):
    """The reference: a deep copy with the skipped layers deleted and every per-layer index renumbered."""
    clone = copy.deepcopy(model)
    kept = [index for index in range(len(clone.model.layers)) if index not in skip]
    clone.model.layers = torch.nn.ModuleList(clone.model.layers[index] for index in kept)
    for new_index, layer in enumerate(clone.model.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    if getattr(clone.config, "layer_types", None) is not None:
        clone.config.layer_types = [clone.config.layer_types[index] for index in kept]
    clone.config.num_hidden_layers = len(kept)
    return clone


def batch(prompts):
    ids, mask = left_pad(prompts, 1, PAD_ID, torch.device("cpu"))
    return ids, mask, (mask.cumsum(1) - 1).clamp_min(0)


def cached_logits(model, ids, mask, positions, steps=4):
    """Logits of a prefill then `steps` greedy decode steps through a DynamicCache made by the caller's context."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    collected = [out.logits[:, -1]]
    next_position = positions[:, -1:] + 1
    for _ in range(steps):
        token = collected[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, position_ids=next_position, past_key_values=cache,
                    use_cache=True)
        collected.append(out.logits[:, -1])
        next_position = next_position + 1
    return torch.stack(collected, dim=1)


@pytest.mark.parametrize("skip", SKIP_SETS)
def test_view_matches_truncated_model_full_forward_and_cached(tiny_model, tiny_prompts, skip):
    reference = truncated_copy(tiny_model, skip)
    ids, mask, positions = batch(tiny_prompts)
    with torch.no_grad():
        expected_full = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        expected_cached = cached_logits(reference, ids, mask, positions)
        with skip_layers(tiny_model, skip):
            full = tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            cached = cached_logits(tiny_model, ids, mask, positions)
        baseline = tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(full[real], expected_full[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(cached, expected_cached, atol=ATOL, rtol=0)
    assert not torch.allclose(baseline[real], full[real], atol=1e-3), "skipping layers must change the output"


@pytest.mark.parametrize("skip", [(0,), (NUM_LAYERS - 1,), (1, 3, 4), (0, 2, NUM_LAYERS - 1)])
def test_greedy_generation_in_view_matches_truncated_model(tiny_model, tiny_prompts, skip):
    reference = truncated_copy(tiny_model, skip)
    ids, mask, _ = batch(tiny_prompts)
    settings = dict(do_sample=False, max_new_tokens=10, pad_token_id=PAD_ID, eos_token_id=2)
    expected = reference.generate(input_ids=ids, attention_mask=mask, **settings)
    with skip_layers(tiny_model, skip):
        inside = tiny_model.generate(input_ids=ids, attention_mask=mask, **settings)
    ours = generate(
        tiny_model, tiny_prompts, max_new_tokens=10, params=SamplingParams(temperature=0.0),
        eos_token_ids=[2], pad_token_id=PAD_ID, skip=skip,
    )
    assert torch.equal(inside, expected)
    assert torch.equal(ours.completion_ids, expected[:, ids.shape[1] :])


@pytest.mark.parametrize(
    "config_class, overrides",
    [
        (MistralConfig, dict(sliding_window=None)),
        (Qwen3Config, dict(head_dim=16)),
        (GemmaConfig, dict(head_dim=16)),
        (Gemma2Config, dict(head_dim=16, sliding_window=4)),
        (Gemma3TextConfig, dict(head_dim=16, sliding_window=4)),
        # Hybrid: layers 2.. use a 4-token sliding window, so layer_types must follow the kept layers.
        (Qwen2Config, dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    ],
    ids=["mistral", "qwen3", "gemma", "gemma2", "gemma3", "qwen2-sliding"],
)
def test_every_supported_family_matches_truncated_model(config_class, overrides, tiny_prompts):
    model = build_tiny(config_class, **overrides)
    ids, mask, positions = batch(tiny_prompts)
    for skip in [(0, 3), (1, 2, NUM_LAYERS - 1), (4,)]:
        reference = truncated_copy(model, skip)
        with torch.no_grad():
            expected = cached_logits(reference, ids, mask, positions, steps=6)
            with skip_layers(model, skip):
                got = cached_logits(model, ids, mask, positions, steps=6)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_empty_skip_set_is_exactly_the_full_model(tiny_model, tiny_prompts):
    ids, mask, positions = batch(tiny_prompts)
    with torch.no_grad():
        expected = cached_logits(tiny_model, ids, mask, positions)
        with skip_layers(tiny_model, []) as view:
            assert view is tiny_model and len(decoder_layers(tiny_model)) == NUM_LAYERS
            got = cached_logits(tiny_model, ids, mask, positions)
    assert torch.equal(got, expected)


def test_view_shares_parameters_and_copies_nothing(tiny_model):
    layers = decoder_layers(tiny_model)
    pointers = {name: p.data_ptr() for name, p in tiny_model.named_parameters()}
    count = sum(p.numel() for p in tiny_model.parameters())
    skip = (0, 2, NUM_LAYERS - 1)
    kept = [index for index in range(NUM_LAYERS) if index not in skip]
    with skip_layers(tiny_model, skip):
        inside = decoder_layers(tiny_model)
        assert len(inside) == len(kept)
        assert all(inside[new] is layers[old] for new, old in enumerate(kept))
        inside_pointers = {p.data_ptr() for p in tiny_model.parameters()}
        assert inside_pointers <= set(pointers.values())
        # Every parameter still exists (held by the untouched full layer list), with the same storage.
        assert {p.data_ptr() for p in layers.parameters()} <= set(pointers.values())
    assert {name: p.data_ptr() for name, p in tiny_model.named_parameters()} == pointers
    assert sum(p.numel() for p in tiny_model.parameters()) == count


def _state(model):
    return (
        decoder_layers(model),
        list(decoder_layers(model)),
        [layer.self_attn.layer_idx for layer in decoder_layers(model)],
        model.config.num_hidden_layers,
        list(getattr(model.config, "layer_types", None) or []),
    )


def test_state_restored_after_context_and_after_exception(tiny_model, tiny_prompts):
    ids, mask, positions = batch(tiny_prompts)
    before = _state(tiny_model)
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    with skip_layers(tiny_model, (1, 4)):
        assert tiny_model.config.num_hidden_layers == NUM_LAYERS - 2
        assert [layer.self_attn.layer_idx for layer in decoder_layers(tiny_model)] == list(range(NUM_LAYERS - 2))
    assert _state(tiny_model) == before
    with pytest.raises(KeyError, match="boom"), skip_layers(tiny_model, (0, 5)):
        raise KeyError("boom")
    after = _state(tiny_model)
    assert after[0] is before[0] and after == before
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits, expected)


def test_layer_types_subset_inside_view():
    model = build_tiny(Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    full_types = list(model.config.layer_types)
    assert full_types == ["full_attention"] * 2 + ["sliding_attention"] * (NUM_LAYERS - 2)
    with skip_layers(model, (0, 3)):
        assert model.config.layer_types == [full_types[i] for i in (1, 2, 4, 5)]
    assert model.config.layer_types == full_types


def test_nesting_is_refused(tiny_llama):
    with skip_layers(tiny_llama, (1,)):
        with pytest.raises(RuntimeError, match="re-entrant"), skip_layers(tiny_llama, (2,)):
            pass
        with skip_layers(tiny_llama, ()):  # an empty set stays a no-op, even inside a view
            assert len(decoder_layers(tiny_llama)) == NUM_LAYERS - 1
    assert len(decoder_layers(tiny_llama)) == NUM_LAYERS


@pytest.mark.parametrize("skip", [(NUM_LAYERS,), (-1,), (1, 1), tuple(range(NUM_LAYERS)), (1.0,)])
def test_invalid_skip_sets(tiny_llama, skip):
    with pytest.raises(UserError, match="skip set"), skip_layers(tiny_llama, skip):
        pass
    assert len(decoder_layers(tiny_llama)) == NUM_LAYERS


def test_unsupported_architecture_is_a_user_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB_SIZE))
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        decoder_layers(model)
    with pytest.raises(UserError, match="GPT2LMHeadModel"), skip_layers(model, (0,)):
        pass


# ----------------------------------------------------------------------------------------------- SkipSampler


def draws(sampler, n=200):
    return [sampler.sample() for _ in range(n)]


def test_sampler_is_reproducible_with_a_seed():
    make = lambda seed: SkipSampler(30, ratio=[0.1, 0.25, 0.4], seed=seed)  # noqa: E731
    assert draws(make(7)) == draws(make(7))
    assert draws(make(7)) != draws(make(8))


def test_sampler_does_not_touch_global_rng():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    draws(SkipSampler(12, ratio=0.5, seed=1), 20)
    assert random.random() == expected


@pytest.mark.parametrize("strategy", ["random", "contiguous"])
def test_keep_first_and_keep_last_are_never_skipped(strategy):
    sampler = SkipSampler(12, strategy=strategy, ratio=0.5, keep_first=2, keep_last=3, seed=0)
    seen = set()
    for ratio, skipped in draws(sampler):
        assert ratio == 0.5 and len(skipped) == 6 and len(set(skipped)) == 6 and list(skipped) == sorted(skipped)
        assert all(2 <= layer <= 8 for layer in skipped)
        seen |= set(skipped)
    assert seen == set(range(2, 9))


def test_contiguous_draws_blocks_at_varying_places():
    sampler = SkipSampler(20, strategy="contiguous", ratio=0.25, seed=3)
    starts = set()
    for _, skipped in draws(sampler):
        assert list(skipped) == list(range(skipped[0], skipped[0] + 5))
        assert skipped[0] >= 1 and skipped[-1] <= 18
        starts.add(skipped[0])
    assert starts == set(range(1, 15))


def test_fixed_returns_exactly_the_layers():
    sampler = SkipSampler(10, strategy="fixed", layers=[7, 0, 3], ratio=0.9, seed=0)
    assert draws(sampler, 5) == [(0.3, (0, 3, 7))] * 5
    with pytest.raises(UserError, match="skip.layers"):
        SkipSampler(10, strategy="fixed")
    with pytest.raises(UserError, match="skip set"):
        SkipSampler(10, strategy="fixed", layers=[3, 10])


def test_ratio_list_draws_each_value():
    sampler = SkipSampler(20, ratio=[0.1, 0.3], seed=0)
    ratios = {ratio: len(skipped) for ratio, skipped in draws(sampler)}
    assert ratios == {0.1: 2, 0.3: 6}


def test_ratio_range_is_uniform_within_bounds():
    sampler = SkipSampler(40, ratio_range=(0.1, 0.3), seed=0)
    samples = draws(sampler, 500)
    assert all(0.1 <= ratio <= 0.3 and len(skipped) == int(ratio * 40 + 0.5) for ratio, skipped in samples)
    assert min(r for r, _ in samples) < 0.12 and max(r for r, _ in samples) > 0.28


@pytest.mark.parametrize(
    "num_layers, ratio, keep, expected_k",
    [(30, 0.25, 1, 8), (10, 0.25, 1, 3), (10, 0.24, 1, 2), (6, 0.9, 1, 4), (4, 0.9, 0, 3), (30, 0.0, 1, 0)],
)
def test_k_is_rounded_half_up_and_clipped(num_layers, ratio, keep, expected_k):
    sampler = SkipSampler(num_layers, ratio=ratio, keep_first=keep, keep_last=keep, seed=0)
    assert len(sampler.sample()[1]) == expected_k


def test_state_dict_round_trip_continues_the_sequence():
    sampler = SkipSampler(30, ratio_range=(0.1, 0.5), seed=11)
    draws(sampler, 7)
    state = json.loads(json.dumps(sampler.state_dict()))  # resumable from a JSON checkpoint too
    expected = draws(sampler, 10)
    resumed = SkipSampler(30, ratio_range=(0.1, 0.5), seed=999)
    resumed.load_state_dict(state)
    assert draws(resumed, 10) == expected


def test_ratio_override_for_adaptive_schemes():
    sampler = SkipSampler(20, ratio=0.1, seed=0)
    ratio, skipped = sampler.sample(ratio=0.5)
    assert ratio == 0.5 and len(skipped) == 10
    with pytest.raises(ValueError):
        sampler.sample(ratio=1.0)


def write_profile(path, costs: dict[int, float], num_layers: int = 10):
    path.write_text(json.dumps({"num_layers": num_layers, "layers": [{"layer": i, "kl": c} for i, c in costs.items()]}))
    return path


# A profile shaped like SmolLM2's: a few cheap layers, most 3-10x dearer, one that breaks the model.
PROFILE = {1: 3.3, 2: 0.6, 3: 0.15, 4: 0.11, 5: 0.14, 6: 0.5, 7: 0.9, 8: 0.7, 9: 0.16, 10: 1.6, 11: 0.4, 12: 0.45,
           13: 0.8, 14: 0.35, 15: 0.5, 16: 0.6, 17: 0.3, 18: 1.1}


def test_calibrated_draws_concentrate_on_the_cheapest_layers(tmp_path):
    path = write_profile(tmp_path / "calibration.json", PROFILE, num_layers=20)
    sampler = SkipSampler(20, strategy="calibrated", ratio=0.15, calibration_file=path, seed=0)  # k = 3
    cheapest = sum(sorted(PROFILE.values())[:3])
    picks = [skipped for _, skipped in draws(sampler, 500)]
    assert all(len(p) == 3 and set(p) <= {4, 5, 3, 9, 17} for p in picks)  # the cheapest ceil(1.5 k) = 5 layers
    assert len(set(picks)) > 5  # the set is still redrawn per batch (dynamic skipping)
    mean_cost = sum(sum(PROFILE[i] for i in p) for p in picks) / len(picks)
    assert cheapest <= mean_cost <= 1.35 * cheapest


def test_calibrated_never_draws_layers_the_profile_leaves_out(tmp_path):
    path = write_profile(tmp_path / "calibration.json", {2: 1.0, 5: 0.1, 0: 0.01}, num_layers=10)
    sampler = SkipSampler(10, strategy="calibrated", ratio=0.4, calibration_file=path, seed=0)
    assert {skipped for _, skipped in draws(sampler, 20)} == {(2, 5)}  # layer 0 is kept (keep_first), k clipped to 2


def test_cost_aware_strategies_wait_for_costs_then_use_them(tmp_path):
    for strategy in ("calibrated", "adaptive"):
        sampler = SkipSampler(20, strategy=strategy, ratio=0.15 if strategy == "calibrated" else 0.0, target_kl=0.2,
                              seed=0)
        assert sampler.needs_costs and sampler.sample() == (0.0, ())  # the batch the run measures costs on
        sampler.set_costs(LayerCosts.read(write_profile(tmp_path / "p.json", PROFILE, 20), 20))
        assert not sampler.needs_costs and len(sampler.sample()[1]) > 0


def test_adaptive_sampler_skips_the_cheapest_and_follows_its_controller(tmp_path):
    path = write_profile(tmp_path / "p.json", PROFILE, num_layers=20)
    sampler = SkipSampler(20, strategy="adaptive", target_kl=0.5, calibration_file=path, seed=0)
    ratio, skipped = sampler.sample()
    assert skipped == (3, 4, 5) and ratio == 3 / 20  # 0.11 + 0.14 + 0.15 <= 0.5 < + 0.16
    decision = sampler.observe(skipped, kl_mu_pi=1.2)  # measured far above the prediction: back off
    assert decision["skip_decision"] == "lower" and decision["target_kl"] == 0.5
    assert len(sampler.sample()[1]) == decision["next_num_skipped"] < 3
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = SkipSampler(20, strategy="adaptive", target_kl=0.5, calibration_file=path, seed=0)
    resumed.load_state_dict(state)
    assert resumed.sample() == sampler.sample()
    bounded = SkipSampler(20, strategy="adaptive", target_kl=0.5, ratio_range=(0.0, 0.1), calibration_file=path)
    assert len(bounded.sample()[1]) == 2  # ratio_range caps the count at round(0.1 * 20)


@pytest.mark.parametrize(
    "content",
    [None, "not json", json.dumps({"weights": {}}), json.dumps({"layers": [{"layer": 3, "kl": -1}]}),
     json.dumps({"layers": [{"layer": 12, "kl": 1}]}), json.dumps({"layers": [{"layer": "x", "kl": 1}]}),
     json.dumps({"num_layers": 8, "layers": [{"layer": 3, "kl": 1}]})],
    ids=["missing", "invalid", "no-key", "negative", "out-of-range", "bad-index", "wrong-num-layers"],
)
def test_calibration_file_errors_name_the_file(tmp_path, content):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match="cal.json"):
        SkipSampler(10, strategy="calibrated", ratio=0.2, calibration_file=path)


@pytest.mark.parametrize(
    "kwargs",
    [dict(strategy="middle"), dict(ratio=1.0), dict(ratio=[]), dict(ratio=-0.1),
     dict(ratio=0.2, ratio_range=(0.1, 0.3)), dict(ratio_range=(0.3, 0.1)), dict(keep_first=6, keep_last=6),
     dict(strategy="adaptive", target_kl=0.0)],
)
def test_invalid_sampler_settings(kwargs):
    with pytest.raises(UserError):
        SkipSampler(10, **kwargs)


def test_from_config_reads_attributes():
    cfg = SimpleNamespace(strategy="contiguous", ratio=0.3, ratio_range=None, layers=None, keep_first=2,
                          keep_last=1, calibration_file=None, target_kl=0.3)
    sampler = SkipSampler.from_config(cfg, num_layers=10, seed=4)
    assert draws(sampler, 20) == draws(SkipSampler(10, strategy="contiguous", ratio=0.3, keep_first=2, seed=4), 20)
