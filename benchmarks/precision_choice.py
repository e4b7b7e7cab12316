"""bf16 weights (fp32 masters in the optimiser) against autocast over fp32 weights, measured side by side.

The question it answers (issue 9): rollouts and updates in bf16 can either cast the model's parameters to
bf16 in place and keep fp32 master copies for the optimiser, or keep fp32 parameters and run every forward
under `torch.autocast`, which casts each weight to bf16 when it is used. In one process, on the same prompts
and seed, it measures per configuration:

- decode: seconds per decode step of the rollout engine (fixed length), and the cost of one cast of every
  parameter fp32 -> bf16 (what autocast pays per forward once its cast cache is dropped, i.e. per decode
  step when the context is entered per model call);
- update: seconds of one forward + backward of the completion log-probs;
- fidelity: the sampler-vs-trainer mismatch (the KV-cached sampler's log-probs against a full forward of
  the same weights in the same precision: mean |lp_b - lp_old| and mean(lp_b - lp_old)), and the distance of
  the trainer's log-probs from float32's on the same tokens.

Usage (small by default: bf16 is emulated, ~25x slower than float32, on CPUs without AMX/avx512_bf16):

    OMP_NUM_THREADS=1 python benchmarks/precision_choice.py [--model smollm2-135m-instruct] [--rows 8]
        [--new-tokens 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time

import torch

from nested_reft.data import generate_arithmetic
from nested_reft.models import load_model
from nested_reft.objective import completion_log_probs
from nested_reft.precision import MasterWeights, cpu_native_bf16
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import DataConfig
from nested_reft.rollout import generate
from nested_reft.sampling import SamplingParams


def autocast_per_call(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """A copy of `model` whose every forward runs in its own bf16 autocast context (casts redone per call)."""
    wrapped = copy.deepcopy(model)
    wrapped.forward = functools.partial(torch.autocast(device_type, dtype=torch.bfloat16)(type(wrapped).forward),
                                        wrapped)
    wrapped.model.forward = functools.partial(
        torch.autocast(device_type, dtype=torch.bfloat16)(type(wrapped.model).forward), wrapped.model)
    return wrapped


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=8, help="sequences decoded together (2 per prompt)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--only", default="", help="semicolon-separated variant names to run (default: all)")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    data = DataConfig(chat_template=False, system_prompt=None)  # short prompts: bf16 may be emulated
    examples = generate_arithmetic("train", args.rows // 2, seed=0, difficulty=1)
    prompts = encode_prompts(tokenizer, [e.question for e in examples], data)
    params = SamplingParams(temperature=0.7)
    eos = eos_token_ids(tokenizer, model.generation_config)

    bf16_head = copy.deepcopy(model)
    MasterWeights(bf16_head, "bf16", fp32_head=False)  # every parameter cast in place (buffers stay fp32)
    bf16 = copy.deepcopy(model)
    MasterWeights(bf16, "bf16")  # the same, except the LM head (tied: with the embedding) stays float32
    variants = {
        "float32": (model, None),
        "bf16 weights, bf16 head": (bf16_head, None),
        "bf16 weights, fp32 head": (bf16, None),
        "autocast per call": (autocast_per_call(model, device.type), None),
        "autocast whole rollout": (model, torch.bfloat16),
    }
    _, cast_seconds = timed(lambda: [p.to(torch.bfloat16) for p in model.parameters()], device)

    report = {"device": str(device), "threads": torch.get_num_threads(), "cpu_native_bf16": cpu_native_bf16(),
              "rows": args.rows, "new_tokens": args.new_tokens,
              "cast_all_parameters_seconds": cast_seconds, "variants": {}}
    for name, (m, autocast_dtype) in variants.items():
        if args.only and name not in args.only.split(";"):
            continue
        def sample():
            ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                   else torch.autocast(device.type, enabled=False))
            with ctx:
                return generate(m, prompts, num_generations=2, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, params=params, eos_token_ids=eos,
                                pad_token_id=tokenizer.pad_token_id, seed=0)

        rollout = sample()
        ids, attention = rollout.sequences()
        width = rollout.prompt_ids.shape[1]
        mask = rollout.completion_mask

        def update():
            ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                   else torch.autocast(device.type, enabled=False))
            m.zero_grad(set_to_none=True)
            with ctx:
                lp = completion_log_probs(m, ids, attention, width, params)
            (lp * mask).sum().backward()
            return lp.detach()

        lp, update_seconds = timed(update, device)
        # Each variant samples its own tokens; the float32 reference is recomputed on them.
        with torch.no_grad():
            lp32 = completion_log_probs(model, ids, attention, width, params)
        diff = (rollout.behavior_log_probs - lp)[mask]
        report["variants"][name] = {
            "decode_seconds_per_step": rollout.decode_seconds / (args.new_tokens - 1),
            "prefill_seconds": rollout.prefill_seconds,
            "forward_backward_seconds": update_seconds,
            "sampler_lp_abs_diff": diff.abs().mean().item(),
            "sampler_lp_bias": diff.mean().item(),
            "sampler_lp_max_abs_diff": diff.abs().max().item(),
            "trainer_lp_vs_float32_abs": (lp - lp32)[mask].abs().mean().item(),
            "lp_dtype": str(lp.dtype),
        }
        print(name, json.dumps(report["variants"][name]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
