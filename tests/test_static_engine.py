"""The static KV cache engine: the same rollouts as the dynamic cache, its buffers, its reuse, and CUDA graphs."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from nested_reft import rollout as rollout_module
from nested_reft import static_engine
from nested_reft.decode_graphs import DecodeGraphs
from nested_reft.errors import UserError
from nested_reft.static_cache import AttentionMasks, StaticKVCache, prefill_mask
from nested_reft.static_engine import StaticEngine, batch_buckets, engine_for

from .conftest import NUM_LAYERS, VOCAB_SIZE, build_tiny
from .test_rollout import GREEDY, SAMPLED, frequent_tokens, lengths, rescore, run

FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "behavior_log_probs")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine has none")


def staggered_eos(model, prompts, *, count=4, **kwargs) -> list[int]:
    """EOS ids that rows emit at different steps: frequent later tokens that no row emits first."""
    probe = run(model, prompts, eos=[VOCAB_SIZE], max_new_tokens=8, **kwargs).completion_ids  # VOCAB_SIZE: no EOS
    first = set(probe[:, 0].tolist())
    later = Counter(token for token in probe[:, 1:].flatten().tolist() if token not in first)
    return [token for token, _ in later.most_common(count)]


def both(model, prompts, eos, **kwargs):
    return (run(model, prompts, eos, kv_cache="dynamic", **kwargs),
            run(model, prompts, eos, kv_cache="static", **kwargs))


@pytest.mark.parametrize("params", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
@pytest.mark.parametrize("skip", [(), (0, 2, NUM_LAYERS - 1)], ids=["full", "skip3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_and_dynamic_give_identical_rollouts(family, skip, params, tiny_prompts):
    """Bit for bit on CPU: same tokens, same behavior log-probs, rows finishing at different steps."""
    model = build_tiny(FAMILIES[family])
    eos = staggered_eos(model, tiny_prompts, params=params, skip=skip, seed=4)
    dynamic, static = both(model, tiny_prompts, eos, params=params, skip=skip, seed=4, max_new_tokens=16)
    assert len(set(lengths(dynamic))) > 1 and min(lengths(dynamic)) < 16, "rows must end at different steps"
    for name in ROLLOUT_FIELDS:
        assert torch.equal(getattr(dynamic, name), getattr(static, name)), name


@pytest.mark.parametrize("precision", ["bf16-weights", "bf16-autocast"])
def test_static_and_dynamic_agree_in_bfloat16(precision, tiny_prompts):
    """Under autocast keys (float32 after RoPE) and values (bf16) differ in dtype; the cache follows each."""
    model = build_tiny(Qwen2Config)
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        eos = staggered_eos(model, tiny_prompts, skip=(1, 3), seed=2)
        dynamic, static = both(model, tiny_prompts, eos, skip=(1, 3), seed=2, max_new_tokens=16)
    assert len(set(lengths(dynamic))) > 1
    for name in ROLLOUT_FIELDS:
        assert torch.equal(getattr(dynamic, name), getattr(static, name)), name


def test_static_matches_dynamic_when_nothing_is_padded(tiny_llama):
    """Equal-length prompts take the no-mask path (sdpa's is_causal), as transformers does. The prefill's causal
    attention reads the static cache's keys as a strided view of the preallocated buffer, which sdpa may sum in
    another order than the dynamic cache's contiguous keys: the prefill's token log-probs agree to float32
    rounding (measured 7e-7), every later one exactly."""
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    eos = frequent_tokens(tiny_llama, prompts, count=6, seed=1)
    dynamic, static = both(tiny_llama, prompts, eos, seed=1, max_new_tokens=12)
    assert len(set(lengths(dynamic))) > 1
    for name in ROLLOUT_FIELDS[:-1]:
        assert torch.equal(getattr(dynamic, name), getattr(static, name)), name
    torch.testing.assert_close(dynamic.behavior_log_probs[:, 0], static.behavior_log_probs[:, 0], atol=1e-5, rtol=0)
    assert torch.equal(dynamic.behavior_log_probs[:, 1:], static.behavior_log_probs[:, 1:])


def test_bucketed_steps_match_dynamic(monkeypatch, tiny_prompts):
    """The exact calls CUDA graphs capture (batch buckets with idle rows, whole-length masked reads), run eagerly.

    Reads over the whole preallocated length sum in a different order, so log-probs agree to float rounding.
    """
    model = build_tiny(LlamaConfig)
    # 12 rows in a bucket of 16, cache of 64 slots (the rollouts need at most 9 + 16).
    monkeypatch.setattr(rollout_module, "engine_for",
                        lambda model, *args, **kwargs: StaticEngine(model, 16, 64, graphs=False, bucketed=True))
    widths = []
    compact = StaticEngine.compact
    monkeypatch.setattr(StaticEngine, "compact",
                        lambda self, keep, width: (widths.append(width), compact(self, keep, width)))
    eos = frequent_tokens(model, tiny_prompts, seed=0)
    for skip in [(), (1, 4), (0, 2, 3, 5)]:
        dynamic, static = both(model, tiny_prompts, eos, skip=skip, seed=0, max_new_tokens=16)
        assert len(set(lengths(dynamic))) > 2
        assert torch.equal(dynamic.completion_ids, static.completion_ids)
        assert torch.equal(dynamic.completion_mask, static.completion_mask)
        torch.testing.assert_close(dynamic.behavior_log_probs, static.behavior_log_probs, atol=1e-4, rtol=0)
    assert set(widths) & {8, 4, 2, 1}, "rows finishing must shrink the batch to smaller buckets"
    assert set(widths) <= {8, 4, 2, 1}


@pytest.mark.parametrize("bucketed", [True, False], ids=["bucketed", "exact"])
def test_compiled_decode_gives_the_tokens_and_log_probs_of_eager_decode(monkeypatch, tiny_prompts, bucketed):
    """torch.compile of the layer unit (with `compiled_decode.decode_attention`): for greedy and sampled decoding
    with the same seeds and several skip sets, the tokens of the eager engine and behavior log-probs within float
    rounding (the compiled kernels and the grouped attention sum in another order). One compilation serves every
    layer (their weights are graph inputs) and batch width (symbolic); the rollout that compiled reports it, and
    the next ones compile nothing."""
    torch._dynamo.reset()
    model = build_tiny(Qwen2Config)
    engines = {compiled: StaticEngine(model, 16, 64, graphs=False, bucketed=bucketed, compile_layers=compiled)
               for compiled in (False, True)}
    monkeypatch.setattr(rollout_module, "engine_for", lambda *a, compile_layers, **k: engines[compile_layers])
    torch._dynamo.utils.counters.clear()
    compile_seconds = []
    for params in (SAMPLED, GREEDY):
        eos = staggered_eos(model, tiny_prompts, params=params, seed=3)
        for skip in [(), (1, 4), (0, 2, 3, 5)]:
            eager, compiled = (run(model, tiny_prompts, eos, params=params, skip=skip, seed=3, max_new_tokens=16,
                                   kv_cache="static", compile_layers=c) for c in (False, True))
            assert len(set(lengths(eager))) > 1
            assert torch.equal(eager.completion_ids, compiled.completion_ids), (params, skip)
            torch.testing.assert_close(eager.behavior_log_probs, compiled.behavior_log_probs, atol=1e-4, rtol=0)
            compile_seconds.append(compiled.compile_seconds)
    assert compile_seconds[0] > 0 and eager.compile_seconds == 0
    # Every width shares one graph but width 1 (dynamo specialises sizes 0 and 1); exact reads add the mask-less
    # variant (no row padded).
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2 + (not bucketed) * 2
    assert engines[True].compiled.graphs == torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert sum(compile_seconds) == pytest.approx(engines[True].compile_seconds)


def test_compiled_artefacts_are_cached_between_runs(tmp_path):
    """Two processes compile the same decode unit with $NESTED_REFT_CACHE set: the first writes inductor's
    artefacts under $NESTED_REFT_CACHE/compiled, the second loads them (FX graph cache hits, no misses)."""
    script = (
        "import json, torch\n"
        "from transformers import LlamaConfig\n"
        "from tests.conftest import build_tiny\n"
        "from nested_reft.rollout import generate\n"
        "from nested_reft.sampling import SamplingParams\n"
        "r = generate(build_tiny(LlamaConfig), [[5, 6, 7], [8, 9]], max_new_tokens=4, params=SamplingParams(0.0),"
        " eos_token_ids=[2], pad_token_id=0, kv_cache='static', compile_layers=True)\n"
        "c = torch._dynamo.utils.counters['inductor']\n"
        "print(json.dumps([c['fxgraph_cache_hit'], c['fxgraph_cache_miss'], r.compile_seconds]))\n"
    )
    env = {**os.environ, "NESTED_REFT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                                      text=True, cwd=Path(__file__).parents[1]).stdout.splitlines()[-1])
            for _ in range(2)]
    (_, cold_misses, _), (warm_hits, warm_misses, _) = runs
    assert cold_misses > 0 and warm_hits > 0 and warm_misses == 0
    assert any((tmp_path / "compiled").rglob("*.py"))


@pytest.mark.parametrize("window", [3, 6])
def test_sliding_window_log_probs_equal_a_fresh_forward_pass(window, tiny_prompts):
    """Mistral with a window shorter than the sequences: the static masks hide slots `window` back."""
    model = build_tiny(MistralConfig, sliding_window=window)
    eos = frequent_tokens(model, tiny_prompts, seed=0)
    rollout = run(model, tiny_prompts, eos, seed=0, max_new_tokens=12, kv_cache="static", skip=(2,))
    assert max(lengths(rollout)) + min(map(len, tiny_prompts)) > window
    expected = rescore(model, rollout, SAMPLED)
    real = rollout.completion_mask
    torch.testing.assert_close(rollout.behavior_log_probs[real], expected[real], atol=1e-4, rtol=0)


def test_eager_attention_implementation(tiny_prompts):
    model = build_tiny(LlamaConfig, attn_implementation="eager")
    eos = frequent_tokens(model, tiny_prompts, seed=0)
    dynamic, static = both(model, tiny_prompts, eos, seed=0, skip=(3,))
    assert torch.equal(dynamic.completion_ids, static.completion_ids)
    torch.testing.assert_close(dynamic.behavior_log_probs, static.behavior_log_probs, atol=1e-5, rtol=0)


def test_engine_is_reused_across_skip_sets_and_smaller_batches(tiny_llama, tiny_prompts):
    run(tiny_llama, tiny_prompts, eos=[2], seed=0, kv_cache="static")
    engine = static_engine._ENGINES[tiny_llama][False, False]
    assert engine.graphs is None, "no CUDA graphs on CPU"
    for skip in [(1,), (0, 4), (2, 3, 5)]:
        run(tiny_llama, tiny_prompts[:2], eos=[2], seed=0, skip=skip, kv_cache="static")
        assert static_engine._ENGINES[tiny_llama][False, False] is engine
    run(tiny_llama, tiny_prompts, eos=[2], seed=0, kv_cache="static", max_new_tokens=200)  # longer: rebuilt
    bigger = static_engine._ENGINES[tiny_llama][False, False]
    assert bigger is not engine and bigger.length >= max(map(len, tiny_prompts)) + 200
    tiny_llama.double()  # new parameter tensors: the engine (and any graph) must not keep the old ones
    run(tiny_llama, tiny_prompts, eos=[2], seed=0, kv_cache="static")
    assert static_engine._ENGINES[tiny_llama][False, False] is not bigger
    assert static_engine._ENGINES[tiny_llama][False, False].cache.dtype == torch.float64


def test_engine_does_not_keep_the_model_alive(tiny_prompts):
    """Engines are cached per model in a weak dictionary: nothing in them may refer back to the model."""
    model = build_tiny(LlamaConfig)
    run(model, tiny_prompts, eos=[2], seed=0, kv_cache="static")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_unsupported_family_is_refused(tiny_prompts):
    model = build_tiny(GemmaConfig, head_dim=16)
    with pytest.raises(UserError, match="kv_cache: dynamic"):
        run(model, tiny_prompts, eos=[2], kv_cache="static")


def test_invalid_skip_set_is_refused(tiny_llama, tiny_prompts):
    with pytest.raises(UserError):
        run(tiny_llama, tiny_prompts, eos=[2], kv_cache="static", skip=(NUM_LAYERS,))


# --- the buffers ---------------------------------------------------------------------------------------------


def test_cache_view_writes_slots_and_returns_the_read_length():
    cache = StaticKVCache(num_layers=2, batch=3, length=8, kv_heads=2, head_dim=4, dtype=torch.float32,
                          device=torch.device("cpu"))
    view = cache.view(1, 2, torch.tensor([5]), read_length=6)
    keys, values = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    got_keys, got_values = view.update(keys, values, 1, {})
    assert got_keys.shape == (2, 2, 6, 4) and view.updates == 1
    assert torch.equal(cache.keys[1][:2, :, 5:6], keys) and torch.equal(cache.values[1][:2, :, 5:6], values)
    assert cache.keys[1][2].abs().sum() == 0 and cache.keys[0].abs().sum() == 0, "other rows and layers untouched"
    with pytest.raises(RuntimeError, match="bfloat16"):
        view.update(keys.bfloat16(), values.bfloat16())
    cache.select_rows([1], torch.tensor([1]), filled=6)
    assert torch.equal(cache.keys[1][0, :, 5:6], keys[1])


def test_masks_open_slots_and_apply_windows():
    masks = AttentionMasks(batch=2, length=8, windows={None, 3}, device=torch.device("cpu"))
    masks.start(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    for slot in (3, 4, 5):
        masks.open(torch.tensor([slot]), width=2)
    assert masks.get(None, 2, 8)[:, 0, 0].int().tolist() == [[0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert masks.get(3, 2, None)[:, 0, 0].int().tolist() == [[0, 0, 0, 1, 1, 1, 0, 0]] * 2
    assert masks.get(None, 1, 4).shape == (1, 1, 1, 4)


def test_prefill_mask_is_causal_hides_padding_and_lets_padding_see_itself():
    mask = prefill_mask(torch.tensor([[0, 1, 1]]), window=None)[0, 0].int().tolist()
    assert mask == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    windowed = prefill_mask(torch.ones(1, 4, dtype=torch.long), window=2)[0, 0].int().tolist()
    assert windowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_batch_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]


# --- CUDA graphs (need a GPU) ------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_for_several_skip_sets(monkeypatch, tiny_prompts, dtype):
    """Graphs replay the very kernels the bucketed eager run launches: bit-identical rollouts, and no
    graph is captured after the first rollout, whatever the skip set."""
    model = build_tiny(Qwen2Config).to(device="cuda", dtype=dtype)
    eos = frequent_tokens(model, tiny_prompts, seed=0)
    eager = StaticEngine(model, 16, 64, graphs=False, bucketed=True)
    graphed = StaticEngine(model, 16, 64, graphs=True)
    counts = []
    for skip in [(), (1, 4), (0, 2, 3, 5), (5,)]:
        results = []
        for engine in (eager, graphed):
            monkeypatch.setattr(rollout_module, "engine_for", lambda *a, **k: engine)
            results.append(run(model, tiny_prompts, eos, skip=skip, seed=0, max_new_tokens=16, kv_cache="static"))
        assert len(set(lengths(results[0]))) > 1
        for name in ROLLOUT_FIELDS:
            assert torch.equal(getattr(results[0], name), getattr(results[1], name)), (skip, name)
        counts.append(len(graphed.graphs))
    assert len(set(counts)) == 1, "a new skip set must not capture new graphs"
    assert counts[0] == (NUM_LAYERS + 2) * len(batch_buckets(16))
    stats = graphed.graph_stats()
    assert stats["capture_seconds"] > 0 and stats["capture_memory_mb"] >= 0


@CUDA
def test_cuda_graphs_auto_matches_dynamic_on_gpu(tiny_prompts):
    model = build_tiny(LlamaConfig).cuda()
    eos = frequent_tokens(model, tiny_prompts, seed=0)
    dynamic = run(model, tiny_prompts, eos, seed=0, skip=(1, 3), max_new_tokens=16)
    static = run(model, tiny_prompts, eos, seed=0, skip=(1, 3), max_new_tokens=16, kv_cache="static")
    assert engine_for(model, 12, 32, graphs=True).graphs is not None
    assert torch.equal(dynamic.completion_ids, static.completion_ids)
    torch.testing.assert_close(dynamic.behavior_log_probs, static.behavior_log_probs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_generate_replays_graphs_on_cuda_only(monkeypatch, tiny_prompts, device):
    """`generate(kv_cache="static", cuda_graphs="auto")`, as the trainer calls it: on a GPU every decode step
    replays captured graphs (one per decoder layer at least); on CPU it runs eagerly and never captures one."""
    calls = Counter()
    for name in ("capture", "replay"):
        real = getattr(DecodeGraphs, name)
        monkeypatch.setattr(DecodeGraphs, name,
                            lambda self, *args, _real=real, _name=name: calls.update([_name]) or _real(self, *args))
    model = build_tiny(LlamaConfig).to(device)
    rollout = run(model, tiny_prompts, eos=[VOCAB_SIZE], seed=0, max_new_tokens=8, kv_cache="static",
                  cuda_graphs="auto")  # VOCAB_SIZE: no EOS, so 7 decode steps after the prefill's token
    assert rollout.completion_mask.all()
    if device == "cuda":
        assert calls["capture"] > 0 and calls["replay"] >= 7 * NUM_LAYERS
    else:
        assert not calls


def test_recipe_fields_select_the_engine(tmp_path):
    from nested_reft.precision import resolve_runtime
    from nested_reft.recipe import load_recipe

    default = load_recipe(None).rollout
    assert (default.kv_cache, default.cuda_graphs) == ("dynamic", "auto")
    chosen = load_recipe(None, ["rollout.kv_cache=static", "rollout.cuda_graphs=off"]).rollout
    assert (chosen.kv_cache, chosen.cuda_graphs) == ("static", "off")
    assert load_recipe(None, ["rollout.cuda_graphs=on"]).rollout.cuda_graphs == "auto"  # YAML's `on` is true
    with pytest.raises(UserError, match="rollout.kv_cache"):
        load_recipe(None, ["rollout.kv_cache=paged"])
    on_cpu = ["model.device=cpu"]
    assert default.compile == "auto" and resolve_runtime(load_recipe(None, on_cpu))[0].rollout.compile == "off"
    compiled = load_recipe(None, [*on_cpu, "rollout.kv_cache=static", "rollout.compile=on"])  # YAML's `on`, a word
    assert compiled.rollout.compile == resolve_runtime(compiled)[0].rollout.compile == "on"
    with pytest.raises(UserError, match=r"^<defaults>: rollout: compile: on needs kv_cache: static"):
        load_recipe(None, ["rollout.compile=on"])


def test_an_eager_engine_survives_new_parameter_storage_but_not_a_new_dtype(tiny_llama):
    """FSDP gathers the kept layers into new storage for every rollout: an eager engine, which calls the modules,
    is reused across that (it used to be rebuilt every step), while a graph engine, which replays fixed addresses,
    is bound to the tensors themselves. A cast to another dtype changes the cache's dtype: a new engine."""
    engine = engine_for(tiny_llama, 4, 32, graphs=False)
    graph_signature = static_engine._signature(tiny_llama, graphs=True)
    for p in tiny_llama.parameters():
        p.data = p.data.clone()  # what FSDP's unshard does: same modules, new storage
    assert engine_for(tiny_llama, 4, 32, graphs=False) is engine
    assert static_engine._signature(tiny_llama, graphs=True) != graph_signature
    tiny_llama.to(torch.bfloat16)
    assert engine_for(tiny_llama, 4, 32, graphs=False) is not engine


def test_an_engine_sizes_its_buffers_without_calling_a_skipped_layer(tiny_llama, monkeypatch):
    """Under FSDP a skipped layer stays sharded: calling it would all-gather (a collective one rank alone would
    make). The engine's probe runs the first layer it keeps."""
    called = []
    for index, layer in enumerate(tiny_llama.model.layers):
        layer.register_forward_pre_hook(lambda *_args, index=index: called.append(index))
    StaticEngine(tiny_llama, 4, 32, graphs=False, skip=(0, 1))
    assert called == [2]
