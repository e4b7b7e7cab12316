"""The rollout engine: exact behavior log-probs, greedy parity with transformers, determinism, padding."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from .conftest import NUM_LAYERS, PAD_ID, VOCAB_SIZE

from nested_reft import decoding
from nested_reft.rollout import Rollout, generate
from nested_reft.sampling import SamplingParams, log_probs, sample_tokens
from nested_reft.skipping import skip_layers

SAMPLED = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
GREEDY = SamplingParams(temperature=0.0)


def run(model, prompts, eos, *, params=SAMPLED, generations=3, max_new_tokens=16, **kwargs) -> Rollout:
    return generate(
        model, prompts, num_generations=generations, max_new_tokens=max_new_tokens, params=params,
        eos_token_ids=eos, pad_token_id=PAD_ID, **kwargs,
    )


def frequent_tokens(model, prompts, *, params=SAMPLED, skip=(), count=4, **kwargs) -> list[int]:
    """Tokens the model emits often, early: used as EOS so that rows finish at different steps."""
    probe = run(model, prompts, eos=[VOCAB_SIZE], params=params, skip=skip, max_new_tokens=6, **kwargs)  # no EOS
    tally = Counter(probe.completion_ids[:, 1:].flatten().tolist())
    return [token for token, _ in tally.most_common(count)]


def rescore(model, rollout: Rollout, params: SamplingParams) -> torch.Tensor:
    """log-probs of the completion tokens from one fresh forward pass over prompt + completion, [B, T]."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], dim=1)
    with torch.no_grad(), skip_layers(model, rollout.skipped_layers):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
    width = rollout.prompt_ids.shape[1]
    predicting = logits[:, width - 1 : -1]  # the logits at position i predict token i + 1
    return log_probs(predicting, params).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


def lengths(rollout: Rollout) -> list[int]:
    return rollout.completion_mask.sum(1).tolist()


@pytest.fixture(params=[1, 3], ids=["status-every-step", "status-every-3"])
def status_interval(request, monkeypatch):
    """Run a test with finished rows read every step (CPU) and every 3 steps (as on GPU: rows idle meanwhile)."""
    monkeypatch.setattr(decoding, "status_interval", lambda device: request.param)
    return request.param


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("skip", [(), (0, 2, NUM_LAYERS - 1)])
def test_behavior_log_probs_equal_a_fresh_forward_pass(tiny_model, tiny_prompts, skip, kv_cache, status_interval):
    eos = frequent_tokens(tiny_model, tiny_prompts, skip=skip, seed=0)
    rollout = run(tiny_model, tiny_prompts, eos, skip=skip, seed=0, kv_cache=kv_cache)
    assert rollout.skipped_layers == skip
    assert len(set(lengths(rollout))) > 2, "rows must finish at different steps for this test to mean anything"
    assert min(lengths(rollout)) < rollout.completion_ids.shape[1]
    expected = rescore(tiny_model, rollout, SAMPLED)
    real = rollout.completion_mask
    torch.testing.assert_close(rollout.behavior_log_probs[real], expected[real], atol=1e-4, rtol=0)
    assert (rollout.behavior_log_probs[~real] == 0).all()
    assert (rollout.behavior_log_probs[real] < 0).any() and (rollout.behavior_log_probs[real] > -20).all()


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_greedy_matches_transformers_generate(tiny_model, tiny_prompts, kv_cache, status_interval):
    eos = frequent_tokens(tiny_model, tiny_prompts, params=GREEDY, count=6)
    ours = run(tiny_model, tiny_prompts, eos, params=GREEDY, generations=1, max_new_tokens=12, kv_cache=kv_cache)
    assert len(set(lengths(ours))) > 1
    expected = tiny_model.generate(
        input_ids=ours.prompt_ids, attention_mask=ours.prompt_mask, do_sample=False, max_new_tokens=12,
        eos_token_id=eos, pad_token_id=PAD_ID,
    )
    assert torch.equal(ours.completion_ids, expected[:, ours.prompt_ids.shape[1] :])
    torch.testing.assert_close(ours.behavior_log_probs, rescore(tiny_model, ours, GREEDY) * ours.completion_mask,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_same_seed_same_rollout_different_seed_different(tiny_llama, tiny_prompts, kv_cache):
    eos = frequent_tokens(tiny_llama, tiny_prompts, seed=0)
    first, second = (run(tiny_llama, tiny_prompts, eos, seed=5, skip=(1, 3), kv_cache=kv_cache) for _ in range(2))
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "behavior_log_probs"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    other = run(tiny_llama, tiny_prompts, eos, seed=6, skip=(1, 3), kv_cache=kv_cache)
    assert not torch.equal(first.completion_ids[:, :3], other.completion_ids[:, :3])


def test_prompts_are_left_padded_in_contiguous_groups(tiny_llama, tiny_prompts):
    rollout = run(tiny_llama, tiny_prompts, eos=[2], generations=3, max_new_tokens=2, seed=0)
    width = max(map(len, tiny_prompts))
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape == (len(tiny_prompts) * 3, width)
    for row in range(rollout.prompt_ids.shape[0]):
        prompt = tiny_prompts[row // 3]
        assert rollout.prompt_ids[row, width - len(prompt) :].tolist() == prompt
        assert rollout.prompt_mask[row].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)
        assert (rollout.prompt_ids[row, : width - len(prompt)] == PAD_ID).all()


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_completion_mask_and_padding_after_eos(tiny_qwen2, tiny_prompts, kv_cache, status_interval):
    eos = frequent_tokens(tiny_qwen2, tiny_prompts, seed=1)
    rollout = run(tiny_qwen2, tiny_prompts, eos, seed=1, max_new_tokens=20, kv_cache=kv_cache)
    ids, mask = rollout.completion_ids, rollout.completion_mask
    assert mask.dtype == torch.bool and ids.shape == mask.shape == rollout.behavior_log_probs.shape
    assert ids.shape[1] == max(lengths(rollout))
    assert rollout.tokens_generated == int(mask.sum()) and rollout.tokens_per_second > 0
    for row, length in enumerate(lengths(rollout)):
        assert mask[row].tolist() == [True] * length + [False] * (ids.shape[1] - length)
        tokens = ids[row, :length].tolist()
        assert not set(tokens[:-1]) & set(eos), "a row must stop at its first EOS"
        if length < 20:
            assert tokens[-1] in eos, "a row shorter than max_new_tokens must end with EOS"
        assert (ids[row, length:] == PAD_ID).all()


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_min_new_tokens_masks_eos(tiny_llama, tiny_prompts, kv_cache):
    eos = frequent_tokens(tiny_llama, tiny_prompts, count=8, seed=2)
    free = run(tiny_llama, tiny_prompts, eos, seed=2, max_new_tokens=12, kv_cache=kv_cache)
    assert min(lengths(free)) < 6
    forced = run(tiny_llama, tiny_prompts, eos, seed=2, max_new_tokens=12, min_new_tokens=6, kv_cache=kv_cache)
    assert min(lengths(forced)) >= 7  # EOS is first allowed at position 6, so a row holds at least 7 tokens
    assert not set(forced.completion_ids[:, :6].flatten().tolist()) & set(eos)  # positions 0..5: the first 6 tokens
    fixed = run(tiny_llama, tiny_prompts, eos, seed=2, max_new_tokens=12, min_new_tokens=12, kv_cache=kv_cache)
    assert lengths(fixed) == [12] * len(lengths(fixed))


def test_max_new_tokens_caps_every_row(tiny_llama, tiny_prompts):
    rollout = run(tiny_llama, tiny_prompts, eos=[VOCAB_SIZE], seed=0, max_new_tokens=1, generations=2)
    assert rollout.completion_ids.shape == (8, 1) and rollout.completion_mask.all()


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_new_tokens=0), dict(generations=0), dict(min_new_tokens=20), dict(eos=[]), dict(kv_cache="paged"),
     dict(cuda_graphs="on")],
)
def test_invalid_arguments(tiny_llama, tiny_prompts, kwargs):
    arguments = dict(eos=[2], max_new_tokens=8) | kwargs
    with pytest.raises(ValueError):
        run(tiny_llama, tiny_prompts, **arguments)


@pytest.mark.parametrize("prompts", [[], [[5, 6], []]])
def test_empty_prompts_are_refused(tiny_llama, prompts):
    with pytest.raises(ValueError):
        run(tiny_llama, prompts, eos=[2])


def test_sampler_draws_from_the_processed_distribution():
    """Empirical token frequencies match exp(log_probs); tokens cut by top-k / top-p are never drawn."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, 3.0]]).expand(40_000, -1)
    settings = (SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=3), SamplingParams(top_p=0.8))
    for params in settings:
        uniform = torch.rand(len(logits), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        tokens, token_log_probs = sample_tokens(logits, params, uniform)
        expected = log_probs(logits[0], params).exp()
        frequencies = torch.bincount(tokens, minlength=6).float() / len(tokens)
        torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
        assert (frequencies[expected < 1e-6] == 0).all()
        assert torch.equal(token_log_probs, log_probs(logits[0], params)[tokens])


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_generates_in_eval_mode_and_restores_modes(tiny_llama, tiny_prompts, kv_cache):
    """Gradient checkpointing in train mode makes transformers drop the KV cache; generate must not be affected."""
    expected = run(tiny_llama, tiny_prompts, eos=[2], params=GREEDY, generations=1, max_new_tokens=8)
    tiny_llama.activation_checkpointing_enable()
    tiny_llama.train()
    tiny_llama.model.norm.eval()  # a module in its own mode must get it back
    got = run(tiny_llama, tiny_prompts, eos=[2], params=GREEDY, generations=1, max_new_tokens=8, kv_cache=kv_cache)
    assert torch.equal(got.completion_ids, expected.completion_ids)
    assert tiny_llama.training and tiny_llama.model.layers[0].training and not tiny_llama.model.norm.training


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_generation_emits_no_warnings(tiny_llama, tiny_prompts, kv_cache):
    """Every run used to print transformers' FutureWarning for the deprecated `past_key_values` keyword."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tiny_llama, tiny_prompts, eos=[2], max_new_tokens=4, seed=0, skip=(1,), kv_cache=kv_cache)
    assert [str(w.message) for w in caught] == []


def test_per_prompt_seeds_make_a_prompts_completions_independent_of_the_batch(tiny_llama, tiny_prompts):
    """Data-parallel ranks sample disjoint blocks of a step's prompts: with one seed per prompt, a prompt's
    completions (tokens and behavior log-probs) are those it gets in the whole batch, whatever shares its batch.
    Log-probs are compared within 1e-5: a smaller batch pads prompts differently, which changes only float
    rounding in attention (ids must match exactly)."""
    seeds = [11, 22, 33, 44]
    params = SamplingParams(temperature=1.0)
    kwargs = dict(num_generations=3, max_new_tokens=10, params=params, eos_token_ids=[2], pad_token_id=PAD_ID)
    whole = generate(tiny_llama, tiny_prompts, seeds=seeds, **kwargs)
    for block in ([0, 1], [2, 3], [3]):
        part = generate(tiny_llama, [tiny_prompts[i] for i in block], seeds=[seeds[i] for i in block], **kwargs)
        rows = [i * 3 + g for i in block for g in range(3)]
        width = part.completion_ids.shape[1]
        assert torch.equal(part.completion_ids, whole.completion_ids[rows, :width])
        assert torch.equal(part.completion_mask, whole.completion_mask[rows, :width])
        assert not whole.completion_mask[rows, width:].any()
        torch.testing.assert_close(part.behavior_log_probs, whole.behavior_log_probs[rows, :width], atol=1e-5, rtol=0)
    other = generate(tiny_llama, tiny_prompts, seeds=[11, 22, 33, 45], **kwargs)  # only prompt 3's seed differs
    assert other.completions()[:9] == whole.completions()[:9]
    assert other.completions()[9:] != whole.completions()[9:]


def test_should_stop_ends_decoding_at_the_next_host_read(tiny_llama, tiny_prompts):
    """A stop request cuts a rollout short: the loop reads it where it reads the finished rows (every step on CPU)."""
    common = dict(num_generations=2, max_new_tokens=12, params=SAMPLED, eos_token_ids=[VOCAB_SIZE], pad_token_id=PAD_ID,
                  seed=0)
    for kv_cache in ("dynamic", "static"):
        asked = []
        stopped = generate(tiny_llama, tiny_prompts, kv_cache=kv_cache, should_stop=lambda: asked.append(1) or len(asked) >= 3,
                           **common)
        assert stopped.completion_ids.shape[1] == 3 and len(asked) == 3
        full = generate(tiny_llama, tiny_prompts, kv_cache=kv_cache, should_stop=lambda: False, **common)
        assert full.completion_ids.shape[1] == 12
        assert torch.equal(full.completion_ids[:, :3], stopped.completion_ids)


def test_inverse_cdf_in_blocks_matches_one_scan_and_never_draws_a_zero():
    """The two-pass draw picks the token a single float64 scan picks (away from rounding windows), across block
    boundaries and a padded last block, and never a token of probability 0, even at u just below 1."""
    from nested_reft.sampling import CDF_BLOCK, inverse_cdf

    generator = torch.Generator().manual_seed(0)
    vocab = 3 * CDF_BLOCK + 77
    probs = torch.rand((64, vocab), generator=generator) ** 8  # peaked, with mass spread across blocks
    probs[:, ::3] = 0.0  # a third of the tokens cut, as top-k / top-p do
    probs[:8, CDF_BLOCK:] = 0.0  # rows whose whole mass sits in the first block
    uniform = torch.rand(64, generator=generator, dtype=torch.float64)
    cumulative = probs.double().cumsum(-1)
    expected = torch.searchsorted(cumulative, uniform[:, None] * cumulative[:, -1:], right=True).squeeze(1)
    assert torch.equal(inverse_cdf(probs, uniform), expected)
    edge = inverse_cdf(probs, torch.full((64,), 1 - 2**-53, dtype=torch.float64))
    assert (probs.gather(1, edge[:, None]) > 0).all()
    assert (edge[:8] < CDF_BLOCK).all()


@pytest.mark.parametrize("params", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_a_shared_prefill_gives_the_completions_of_a_per_row_prefill(tiny_model, tiny_prompts, kv_cache, params,
                                                                        monkeypatch):
    """Each prompt is prefilled once and its KV cache copied to its G rows: the same tokens as prefilling every row
    (the default, group_size 1, of `decoding.decode`), and log-probs equal up to the float rounding of a smaller
    matmul; the prefill's forward runs on one row per prompt."""
    from nested_reft import rollout as rollout_module

    embedded = []
    tiny_model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: embedded.append(args[0].shape))
    eos = frequent_tokens(tiny_model, tiny_prompts, params=params, seed=5)
    embedded.clear()
    shared = run(tiny_model, tiny_prompts, eos, params=params, generations=3, seed=5, skip=(1, 4), kv_cache=kv_cache)
    prefills = [shape for shape in embedded if shape[1] > 1]  # decode steps embed one token per row
    assert prefills == [(len(tiny_prompts), max(map(len, tiny_prompts)))]
    decode = rollout_module.decode
    monkeypatch.setattr(rollout_module, "decode", lambda *a, **k: decode(*a, **(k | {"group_size": 1})))
    per_row = run(tiny_model, tiny_prompts, eos, params=params, generations=3, seed=5, skip=(1, 4), kv_cache=kv_cache)
    assert len(set(lengths(shared))) > 1
    assert torch.equal(shared.completion_ids, per_row.completion_ids)
    assert torch.equal(shared.completion_mask, per_row.completion_mask)
    torch.testing.assert_close(shared.behavior_log_probs, per_row.behavior_log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_packed_bf16_weights_give_the_same_rollout_and_are_unpacked_after(tiny_qwen2, tiny_prompts, kv_cache,
                                                                         monkeypatch):
    """bf16 rollouts on CPU multiply with oneDNN-packed weights (Qwen2: biased projections too): bit for bit the
    rollout of the plain weights, the packed matmul really used for every kept layer's linears and the head, and
    every module's own forward back once the rollout ends."""
    from nested_reft import packed_weights

    model = tiny_qwen2.to(torch.bfloat16)
    calls = Counter()
    packed_linear = packed_weights._packed_linear
    monkeypatch.setattr(packed_weights, "_packed_linear",
                        lambda packed, bias, x: calls.update([packed.shape]) or packed_linear(packed, bias, x))
    eos = frequent_tokens(model, tiny_prompts, seed=2)
    calls.clear()
    packed = run(model, tiny_prompts, eos, seed=2, skip=(2,), kv_cache=kv_cache)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not any("forward" in vars(m) for m in linears)
    assert calls[model.lm_head.weight.shape] > 0 and sum(calls.values()) > (NUM_LAYERS - 1) * 7
    monkeypatch.setattr(packed_weights, "packable", lambda linear: False)
    plain = run(model, tiny_prompts, eos, seed=2, skip=(2,), kv_cache=kv_cache)
    assert len(set(lengths(plain))) > 1
    for name in ("completion_ids", "completion_mask", "behavior_log_probs"):
        assert torch.equal(getattr(packed, name), getattr(plain, name)), name
