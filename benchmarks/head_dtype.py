"""The LM head in float32 or in the compute dtype (`model.head_dtype`), measured side by side under bf16 compute.

The question (issue 19): with bf16 compute, should the LM head's matmul stay float32 (float32 weights, upcast
hidden states, float32 logits) or run in bf16 like the rest (bf16 weights with a float32 master, bf16 logits
upcast before the float32 log-softmax)? One process, one bf16 model and a copy that differs only in its head, the
same prompts and seeds, repeats interleaved ABBA. Per variant:

- speed: prefill seconds, decode seconds per step (fixed-length rollout), and one forward + backward of the
  completion log-probs (the update's work) on the rollout's tokens;
- fidelity, on a rollout with natural lengths (EOS allowed, so the recorded log-probs are of the unmodified
  distribution): the sampler-vs-trainer mismatch |lp_b - lp_old| and its mean (the KV-cached sampler against the
  trainer's full forward, same weights), and the trainer's distance from float32 log-probs on the same tokens
  (of the whole float32 model, and of the bf16 model with a float32 head: the head's own part).

    python benchmarks/head_dtype.py [--prompts 4] [--generations 4] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache", default="static")
    args = parser.parse_args()

    float32, tokenizer = load_model(args.model, device="cpu")
    heads = {"float32": copy.deepcopy(float32), "compute": copy.deepcopy(float32)}
    MasterWeights(heads["float32"], "bf16", fp32_head=True)
    MasterWeights(heads["compute"], "bf16", fp32_head=False)
    prompts = encode_prompts(tokenizer, [e.question for e in generate_arithmetic("train", args.prompts, seed=0,
                                                                                 difficulty=1)], DataConfig())
    params = SamplingParams(temperature=0.7)
    common = dict(num_generations=args.generations, params=params, pad_token_id=tokenizer.pad_token_id,
                  eos_token_ids=eos_token_ids(tokenizer, float32.generation_config), kv_cache=args.kv_cache)

    def timed(model) -> dict[str, float]:
        n = args.new_tokens
        rollout = generate(model, prompts, max_new_tokens=n, min_new_tokens=n, seed=0, **common)
        ids, attention = rollout.sequences()
        start = time.perf_counter()
        lp = completion_log_probs(model, ids, attention, rollout.prompt_ids.shape[1], params)
        (lp * rollout.completion_mask).sum().backward()
        model.zero_grad(set_to_none=True)
        return {"prefill_seconds": rollout.prefill_seconds, "decode_seconds_per_step": rollout.decode_seconds / (n - 1),
                "forward_backward_seconds": time.perf_counter() - start}

    load = os.getloadavg()[0]
    for model in heads.values():
        timed(model)  # warm-up: allocator, engine, kernels
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in heads}
    for r in range(args.repeats):
        for name in list(heads)[:: 1 if r % 2 == 0 else -1]:
            samples[name].append(timed(heads[name]))

    report = {"cpu_native_bf16": cpu_native_bf16(), "threads": torch.get_num_threads(), "rows": len(prompts) *
              args.generations, "new_tokens": args.new_tokens, "load_average_before": load, "variants": {}}
    for name, model in heads.items():
        rollout = generate(model, prompts, max_new_tokens=2 * args.new_tokens, seed=1, **common)
        ids, attention = rollout.sequences()
        width, mask = rollout.prompt_ids.shape[1], rollout.completion_mask
        with torch.no_grad():
            lp_old = completion_log_probs(model, ids, attention, width, params)
            lp32 = completion_log_probs(float32, ids, attention, width, params)
            lp_head32 = completion_log_probs(heads["float32"], ids, attention, width, params)
        diff = (rollout.behavior_log_probs - lp_old)[mask]
        medians = {key: statistics.median(s[key] for s in samples[name]) for key in samples[name][0]}
        report["variants"][name] = medians | {
            "tokens_scored": int(mask.sum()),
            "sampler_lp_abs_diff": diff.abs().mean().item(), "sampler_lp_bias": diff.mean().item(),
            "sampler_lp_max_abs_diff": diff.abs().max().item(),
            "trainer_lp_vs_float32_abs": (lp_old - lp32)[mask].abs().mean().item(),
            "trainer_lp_vs_float32_max": (lp_old - lp32)[mask].abs().max().item(),
            "trainer_lp_vs_float32_head_abs": (lp_old - lp_head32)[mask].abs().mean().item(),  # the head's own part
        }
    ratios = {key: report["variants"]["float32"][key] / report["variants"]["compute"][key]
              for key in ("prefill_seconds", "decode_seconds_per_step", "forward_backward_seconds")}
    report["compute_head_speedup"] = ratios
    report["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
