"""Mixed precision: how `auto` resolves, fp32 master weights (no lost updates), fp16 loss scaling, float32
log-probs from a bf16 model, and checkpoints of the masters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from nested_reft import precision
from nested_reft.errors import UserError
from nested_reft.objective import completion_log_probs
from nested_reft.precision import (
    MasterWeights,
    cast_for_inference,
    resolve_head_dtype,
    resolve_mixed_precision,
    resolve_runtime,
)
from nested_reft.recipe import load_recipe
from nested_reft.rollout import generate
from nested_reft.sampling import SamplingParams

from .conftest import PAD_ID, build_tiny

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# -- auto resolves as documented ----------------------------------------------------------------------------------


@pytest.fixture
def native_cpu(monkeypatch):
    """Set whether the CPU 'has' AMX/AVX512-BF16, through the probes `cpu_native_bf16` reads."""

    def set_native(native: bool, flags: set[str] = frozenset()):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
        monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: set(flags))

    return set_native


def test_cpu_probes_and_cpuinfo_flags(native_cpu):
    native_cpu(True)
    assert precision.cpu_native_bf16()
    native_cpu(False, {"avx2", "fma"})  # this machine's kind: AVX2 only
    assert not precision.cpu_native_bf16()
    native_cpu(False, {"avx2", "avx512_bf16"})  # torch's probes can miss it; /proc/cpuinfo is read too
    assert precision.cpu_native_bf16()
    native_cpu(False, {"amx_bf16", "amx_tile"})
    assert precision.cpu_native_bf16()


def test_auto_is_bf16_on_a_native_cpu_else_no_with_a_notice(native_cpu):
    native_cpu(True)
    assert resolve_mixed_precision("auto", CPU) == ("bf16", None)
    native_cpu(False)
    mode, notice = resolve_mixed_precision("auto", CPU)
    assert mode == "no" and "float32" in notice and "\n" not in notice


def test_auto_on_cuda_follows_the_device(monkeypatch):
    monkeypatch.setattr(precision, "cuda_bf16", lambda device: True)
    assert resolve_mixed_precision("auto", CUDA) == ("bf16", None)
    assert resolve_mixed_precision("fp16", CUDA) == ("fp16", None)
    monkeypatch.setattr(precision, "cuda_bf16", lambda device: False)
    mode, notice = resolve_mixed_precision("auto", CUDA)
    assert mode == "no" and "CUDA" in notice
    with pytest.raises(UserError, match="no native bf16"):
        resolve_mixed_precision("bf16", CUDA)


def test_explicit_choices_on_cpu(native_cpu):
    native_cpu(False)
    assert resolve_mixed_precision("no", CPU) == ("no", None)
    mode, notice = resolve_mixed_precision("bf16", CPU)  # runs, but says it is emulated
    assert mode == "bf16" and "emulated" in notice
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_mixed_precision("fp16", CPU)
    with pytest.raises(UserError, match="mixed_precision"):
        resolve_mixed_precision("fp8", CPU)


def test_recipe_resolution_writes_the_choice_and_start_up_lines(native_cpu):
    native_cpu(True)
    recipe = load_recipe(None, ["model.device=cpu", "model.mixed_precision=auto"])
    resolved, lines = resolve_runtime(recipe)
    assert resolved.model.mixed_precision == "bf16" and recipe.model.mixed_precision == "auto"  # a copy
    assert resolved.train.gradient_checkpointing is False  # auto: off on CPU
    assert lines == ["precision: bf16 compute (bf16 LM head), float32 master weights and optimiser states"]
    assert resolved.model.head_dtype == "compute" and "head_dtype: compute" in resolved.to_yaml()
    assert "mixed_precision: bf16" in resolved.to_yaml() and "gradient_checkpointing: false" in resolved.to_yaml()
    native_cpu(False)
    resolved, lines = resolve_runtime(recipe)
    assert resolved.model.mixed_precision == "no" and len(lines) == 2 and "auto" in lines[1]
    pure = load_recipe(None, ["model.device=cpu", "model.mixed_precision=no", "model.dtype=bfloat16"])
    assert "small updates are lost" in resolve_runtime(pure)[1][0]


def test_head_dtype_auto_is_the_compute_dtype_and_float32_without_mixed_precision():
    assert resolve_head_dtype("auto", "bf16") == "compute" and resolve_head_dtype("auto", "fp16") == "compute"
    assert resolve_head_dtype("float32", "bf16") == "float32" and resolve_head_dtype("compute", "bf16") == "compute"
    assert resolve_head_dtype("compute", "no") == "float32"  # nothing is cast without mixed precision
    kept = load_recipe(None, ["model.device=cpu", "model.mixed_precision=bf16", "model.head_dtype=float32"])
    assert resolve_runtime(kept)[1][0] == "precision: bf16 compute (float32 LM head), float32 master weights and " \
                                          "optimiser states"
    with pytest.raises(UserError, match=r"model.head_dtype \(from --set\): expected 'auto', 'float32' or 'compute'"):
        load_recipe(None, ["model.head_dtype=bf16"])


def test_compute_head_log_probs_are_within_bf16_rounding_of_a_float32_head():
    """The stated tolerance of `head_dtype: compute`. Both models share one bf16 decoder, so the head's input is
    the same; the compute head rounds its weights and its logits to bf16 (each <= 2^-9 relative), so a logit moves
    by at most 2^-8 * sum_k |h_k W_vk| and a log-prob (logit minus logsumexp) by twice the largest such move,
    divided by the temperature. Each token's difference must be within that bound, and on average far below it.
    Log-probs stay float32, and the bf16 head keeps a float32 master (the tied embedding's, here)."""
    params = SamplingParams(temperature=0.7)
    float32_head = build_tiny(LlamaConfig, tie_word_embeddings=True)
    compute_head = build_tiny(LlamaConfig, tie_word_embeddings=True)
    MasterWeights(float32_head, "bf16", fp32_head=True)
    masters = MasterWeights(compute_head, "bf16", fp32_head=False)
    assert compute_head.lm_head.weight.dtype == torch.bfloat16 and float32_head.lm_head.weight.dtype == torch.float32
    assert any(m.dtype == torch.float32 and m.shape == compute_head.lm_head.weight.shape for m in masters.params)
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    with torch.no_grad():
        lp_head32 = completion_log_probs(float32_head, ids, attention, 8, params, chunk_size=16)
        lp_compute = completion_log_probs(compute_head, ids, attention, 8, params, chunk_size=16)
        hidden = compute_head.model.norm(compute_head.model(ids).last_hidden_state)[:, 7:-1].float()
    assert lp_compute.dtype == torch.float32
    magnitude = hidden.abs() @ float32_head.lm_head.weight.abs().T  # sum_k |h_k W_vk| per token and vocabulary entry
    bound = 2 * 2**-8 * magnitude.amax(-1) / params.temperature
    diff = (lp_compute - lp_head32).abs()
    assert (diff <= bound).all() and diff.max() > 0
    assert diff.mean() < 0.1 * bound.mean()


# -- master weights ------------------------------------------------------------------------------------------------


def one_weight_model(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def adam_steps(model: torch.nn.Module, masters: MasterWeights, optimizer, n: int) -> None:
    """n AdamW steps on loss = sum(model(1)): the gradient is +1 for every step, so Adam moves each weight by
    ~lr per step (its normalised update), downwards."""
    for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        masters.backward(model(torch.ones(1, 1, dtype=next(model.parameters()).dtype)).sum())
        masters.clip_grad_norm_(1.0)
        masters.step(optimizer)


def test_small_updates_accumulate_in_the_masters_and_reach_the_bf16_weight():
    """lr 1e-6 on a weight of 0.05: bf16's spacing there is 2^-12 ~ 2.4e-4, so one step is 0.4% of it.

    The master moves every step; the bf16 weight is always the master rounded to nearest, so it stays put
    until the accumulated change passes half a spacing (~122 steps) and then moves by exactly one spacing."""
    model = one_weight_model(0.05)
    masters = MasterWeights(model, "bf16")
    optimizer = torch.optim.AdamW(masters.params, lr=1e-6, weight_decay=0.0)
    start_bf16 = model.weight.detach().clone()
    assert model.weight.dtype == torch.bfloat16 and masters.params[0].dtype == torch.float32

    adam_steps(model, masters, optimizer, 10)
    master = masters.params[0].item()
    assert master == pytest.approx(0.05 - 1e-5, abs=1e-7)  # every step counted, in float32
    assert torch.equal(model.weight, start_bf16)  # below bf16 resolution: the model weight has not moved yet

    adam_steps(model, masters, optimizer, 150)  # 160e-6 in all, more than half a spacing
    spacing = 2.0**-12
    assert model.weight.item() == pytest.approx(start_bf16.item() - spacing, abs=1e-9)
    assert torch.equal(model.weight, masters.params[0].detach().to(torch.bfloat16))


def test_without_masters_the_same_updates_are_lost():
    """The control for the test above: AdamW directly on a bf16 weight rounds every step away."""
    model = one_weight_model(0.05).to(torch.bfloat16)
    masters = MasterWeights(model, "bf16")  # already bf16: pass-through, the optimiser holds the bf16 weight
    assert not masters.active
    optimizer = torch.optim.AdamW(masters.params, lr=1e-6, weight_decay=0.0)
    start = model.weight.detach().clone()
    adam_steps(model, masters, optimizer, 160)
    assert torch.equal(model.weight, start)


def test_tiny_llama_weights_change_under_lr_1e_7_with_bf16():
    """Every weight of a tiny model that gets a gradient moves in the masters under lr 1e-7, and the bf16 model
    is always exactly the masters rounded; small weights (bf16 spacing < 2e-7) move in bf16 too."""
    model = build_tiny(LlamaConfig)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    masters = MasterWeights(model, "bf16")
    optimizer = torch.optim.AdamW(masters.params, lr=1e-7, weight_decay=0.0)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    model.train()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        lp = completion_log_probs(model, ids, attention, 4, SamplingParams())
        masters.backward(-lp.mean())
        masters.clip_grad_norm_(1.0)
        masters.step(optimizer)
    names = [name for name, _ in model.named_parameters()]
    changed_master, changed_bf16, total = 0, 0, 0
    for name, p, master in zip(names, model.parameters(), masters.params):
        if name == "lm_head.weight":
            assert p is master and p.dtype == torch.float32  # the float32 head is its own master
        else:
            assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
            assert torch.equal(p, master.detach().to(torch.bfloat16))
            changed_bf16 += int((p.float() != initial[name].to(torch.bfloat16).float()).sum())
        moved = master.detach() != initial[name]
        changed_master += int(moved.sum())
        total += p.numel()
    # Token embeddings of ids that never occur get no gradient; everything else moves.
    assert changed_master > 0.9 * total - 128 * 64
    assert changed_bf16 > 0


def test_gradients_accumulate_in_float32_across_backward_calls():
    """Three micro-batches with gradients 1, 2^-9, 2^-9: summed in bf16 (spacing 2^-7 at 1) the small ones
    round away; the masters' float32 accumulator holds 1 + 2^-8 exactly."""
    model = one_weight_model(0.5)
    masters = MasterWeights(model, "bf16")
    for x in (1.0, 2.0**-9, 2.0**-9):  # d(w * x)/dw = x
        masters.backward(model(torch.full((1, 1), x, dtype=torch.bfloat16)).sum())
        assert model.weight.grad is None  # moved to the master straight away
    assert masters.params[0].grad.dtype == torch.float32 and masters.params[0].grad.item() == 1 + 2.0**-8
    assert torch.tensor(1.0, dtype=torch.bfloat16) + 2.0**-9 + 2.0**-9 == 1.0  # what bf16 accumulation gives


def test_fp16_loss_scaling_skips_overflowing_steps_and_halves_the_scale():
    model = one_weight_model(0.5)
    masters = MasterWeights(model, "fp16")
    optimizer = torch.optim.SGD(masters.params, lr=0.1)
    masters.load_state_dict({**masters.state_dict(), "scale": 2.0**20})  # 2^20 x 2^0: overflows fp16 (max 65504)
    optimizer.zero_grad(set_to_none=True)
    masters.backward(model(torch.ones(1, 1, dtype=torch.float16)).sum())
    norm = masters.clip_grad_norm_(1.0)
    assert norm == float("inf") and masters.step(optimizer) is False
    assert masters.params[0].item() == 0.5 and masters.loss_scale == 2.0**19
    masters.load_state_dict({**masters.state_dict(), "scale": 2.0**8})
    optimizer.zero_grad(set_to_none=True)
    masters.backward(model(torch.ones(1, 1, dtype=torch.float16)).sum())
    assert masters.clip_grad_norm_(10.0) == pytest.approx(1.0)  # unscaled before clipping
    assert masters.step(optimizer) is True
    assert masters.params[0].item() == pytest.approx(0.4)
    assert model.weight.dtype == torch.float16 and model.weight.item() == pytest.approx(0.4, abs=1e-3)


def count_host_reads(monkeypatch) -> list[str]:
    """Record every way a tensor's value reaches the host (each one waits for the device on a GPU)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *args, _read=original, _name=name: (reads.append(_name), _read(self, *args))[1])
    return reads


@pytest.mark.parametrize("overflowing", [None, 5], ids=["clean", "one-tensor-overflows"])
def test_fp16_step_reads_one_overflow_flag_for_all_the_gradients(monkeypatch, overflowing):
    """`step` without `clip_grad_norm_` checks the tiny model's 57 gradients for overflow with a single host read;
    one overflowing tensor is enough to skip the step and halve the scale, and clean steps grow it every
    `growth_interval` steps."""
    model = build_tiny(LlamaConfig)
    masters = MasterWeights(model, "fp16")
    optimizer = torch.optim.SGD(masters.params, lr=0.1)
    masters.load_state_dict({**masters.state_dict(), "scale": 2.0**8, "growth_interval": 2})
    before = [m.detach().clone() for m in masters.params]
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        # Gradient 1 everywhere, 2^8 once scaled; 2^18 in one tensor: beyond fp16's 65504.
        masters.backward(sum(p.float().sum() * (2.0**10 if i == overflowing else 1.0)
                             for i, p in enumerate(model.parameters())))
        reads = count_host_reads(monkeypatch)
        stepped = masters.step(optimizer)
        monkeypatch.undo()
        assert len(reads) == 1
        assert stepped is (overflowing is None)
    assert len(masters.params) == 57
    if overflowing is None:  # unscaled gradients of 1: every weight moved by lr twice; the scale grew once
        assert all(torch.allclose(m, b - 0.2) for m, b in zip(masters.params, before))
        assert masters.loss_scale == 2.0**9
    else:
        assert all(torch.equal(m, b) for m, b in zip(masters.params, before))
        assert masters.loss_scale == 2.0**6


def test_no_mode_is_a_pass_through():
    model = build_tiny(LlamaConfig)
    masters = MasterWeights(model, "no")
    assert not masters.active and all(a is b for a, b in zip(masters.params, model.parameters()))
    assert not masters._hooks and masters.loss_scale == 1.0


def test_checkpoint_holds_the_float32_masters(tmp_path):
    model = build_tiny(LlamaConfig)
    masters = MasterWeights(model, "bf16")
    with torch.no_grad():
        for master in masters.params:
            master.add_(1e-6)  # a change bf16 cannot represent: only exact masters keep it
    masters.copy_to_model()
    masters.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    by_name = dict(zip([n for n, _ in model.named_parameters()], masters.params))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert all(torch.equal(saved[name], master.detach()) for name, master in by_name.items())
    assert next(model.model.parameters()).dtype == torch.bfloat16  # the model computes in bf16 again
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # default dtype: the config's, float32
    assert loaded.dtype == torch.float32
    assert all(torch.equal(p, by_name[name].detach()) for name, p in loaded.named_parameters())


# -- float32 log-probs from a bf16 model ----------------------------------------------------------------------------


def test_bf16_log_probs_are_float32_and_close_to_float32s(tiny_prompts):
    """Log-probs of the same tokens from a bf16 copy are float32 tensors within 0.1 nats per token on average and
    0.5 at worst of float32's. Why these bounds: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.002)
    in every activation, through 6 layers of width 64 whose weights are 10x the usual init (peaked, large
    logits); measured here: 0.043 mean, 0.19 max, so the bounds leave ~2x for other CPUs' kernels. The sampler's
    float32 log-probs match the bf16 trainer's on its own samples within 0.05 mean and 0.25 max (measured:
    0.014 and 0.058; float32 against float32: 2e-6 and 7e-6)."""
    model = build_tiny(LlamaConfig)
    bf16 = cast_for_inference(build_tiny(LlamaConfig), "bf16")
    params = SamplingParams(temperature=1.0)
    rollout = generate(model, tiny_prompts, num_generations=2, max_new_tokens=8, params=params, eos_token_ids=[2],
                       pad_token_id=PAD_ID, seed=0)
    ids, attention = rollout.sequences()
    width, mask = rollout.prompt_ids.shape[1], rollout.completion_mask
    with torch.no_grad():
        lp32 = completion_log_probs(model, ids, attention, width, params)
        lp16 = completion_log_probs(bf16, ids, attention, width, params)
    assert lp16.dtype == torch.float32
    diff = (lp16 - lp32)[mask].abs()
    assert diff.mean() < 0.1 and diff.max() < 0.5
    assert diff.max() > 0  # it really computed in bf16
    sampled = generate(bf16, tiny_prompts, num_generations=2, max_new_tokens=8, params=params, eos_token_ids=[2],
                       pad_token_id=PAD_ID, seed=0)
    assert sampled.behavior_log_probs.dtype == torch.float32
    s_ids, s_attention = sampled.sequences()
    with torch.no_grad():
        trainer = completion_log_probs(bf16, s_ids, s_attention, sampled.prompt_ids.shape[1], params)
    mismatch = (sampled.behavior_log_probs - trainer)[sampled.completion_mask].abs()
    assert mismatch.mean() < 0.05 and mismatch.max() < 0.25


def test_fp32_head_keeps_logits_float32_and_tied_embeddings_work():
    model = build_tiny(LlamaConfig, tie_word_embeddings=True)
    reference = build_tiny(LlamaConfig, tie_word_embeddings=True)
    cast_for_inference(model, "bf16")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=0.5, rtol=0.05)  # bf16 decoder, float32 head


# -- a tied LM head, trained -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dtype", ["float32", "compute"])
def test_tied_embeddings_train_in_bf16_with_float32_masters_and_stay_tied(tmp_path, monkeypatch, head_dtype):
    """SmolLM2 and Qwen2.5 tie the LM head to the input embedding. Trained through `train` in bf16 with float32
    masters, that one weight stays one parameter with one float32 master (with a float32 head, itself; with a
    compute head, a float32 copy of the bf16 weight), updated through both of its uses, while the decoder computes
    in bf16 and moves through its masters; the policy learns; and the tie survives the checkpoint
    (`from_pretrained` gives one tensor) and a resumed run."""
    from nested_reft import trainer
    from nested_reft.trainer import train

    from .test_trainer import starts_with_target, target_id, tiny_recipe
    from .tiny import write_examples, write_tiny_model

    untied = write_tiny_model(tmp_path / "untied")
    config = LlamaConfig.from_pretrained(untied, tie_word_embeddings=True)
    torch.manual_seed(0)
    model_dir = tmp_path / "tied"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((untied / name).read_bytes())
    data = write_examples(tmp_path / "train.jsonl", 24)

    masters_seen = []
    monkeypatch.setattr(trainer, "MasterWeights", lambda *a, **k: masters_seen.append(MasterWeights(*a, **k))
                        or masters_seen[-1])
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=40", "model.mixed_precision=bf16",
                         f"model.head_dtype={head_dtype}", "skipping.ratio=0.0", "objective.correction=none",
                         "train.save_every=1")
    rows = []

    def stop_when_learned(row):
        rows.append(row)
        if len(rows) >= 3 and sum(r["reward_mean"] for r in rows[-3:]) / 3 >= 0.8:
            raise StopIteration

    reward = starts_with_target(target_id(model_dir))
    with pytest.raises(StopIteration):
        train(recipe, reward_fn=reward, on_step=stop_when_learned)
    assert rows[0]["reward_mean"] < 0.4  # near chance (1/16) at first, learned within 40 steps

    masters = masters_seen[0]
    model = masters.model
    tied = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is tied
    if head_dtype == "float32":
        assert tied.dtype == torch.float32 and sum(p is tied for p in masters.params) == 1  # its own master
    else:
        assert tied.dtype == torch.bfloat16 and not any(p is tied for p in masters.params)
    assert sum(p.shape == tied.shape for p in masters.params) == 1  # one master: one AdamW state
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16 and masters.active

    start = load_file(model_dir / "model.safetensors")
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{rows[-1]['step']}"
    end = load_file(checkpoint / "model.safetensors")
    assert "lm_head.weight" not in end  # saved once, as the embedding
    assert all(t.dtype == torch.float32 for t in end.values()) and end.keys() == start.keys()
    assert all(not torch.equal(end[k], start[k]) for k in start), "every weight moved, the tied one included"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, end["model.embed_tokens.weight"])

    resumed = train(tiny_recipe(model_dir, data, tmp_path / "run", f"train.steps={len(rows) + 1}",
                                "model.mixed_precision=bf16", f"model.head_dtype={head_dtype}", "skipping.ratio=0.0",
                                "objective.correction=none", "train.save_every=1"), resume=True, reward_fn=reward)
    assert [r["step"] for r in resumed.read_metrics()] == list(range(1, len(rows) + 2))
    model = masters_seen[-1].model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert resumed.read_metrics()[-1]["reward_mean"] >= 0.5
