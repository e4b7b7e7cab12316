"""Tokens/sec of our rollout engine against `model.generate`, and of the engine with a quarter of layers skipped.

Fixed-length work (min_new_tokens = max_new_tokens) so every configuration generates the same number of
tokens. Runs are interleaved (one of each configuration per repeat) so that machine noise hits all of them
alike; the medians are printed. `--precision bf16` casts the model to bf16 (the LM head too, as `head_dtype:
auto` does) for both engines. Usage:

    python benchmarks/rollout_vs_generate.py [--device cpu] [--threads N] [--repeats 3] [--new-tokens 128]
        [--precision no|bf16] [--kv-cache dynamic|static]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nested_reft.data import generate_arithmetic
from nested_reft.models import load_model
from nested_reft.rollout import generate, left_pad
from nested_reft.sampling import SamplingParams
from nested_reft.skipping import SkipSampler



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (4 prompts)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ratio", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--precision", default="no", help="model.mixed_precision: no or bf16")
    parser.add_argument("--kv-cache", default="dynamic", help="our engine's cache: dynamic or static")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, device=args.device, mixed_precision=args.precision)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q in [e.question for e in generate_arithmetic("test", 4, seed=0, difficulty=3)]
    ]
    num_layers = model.config.num_hidden_layers
    skip = SkipSampler(num_layers, ratio=args.skip_ratio, keep_first=1, keep_last=1, seed=0).sample()[1]
    params = SamplingParams(temperature=1.0)
    common = dict(
        num_generations=args.generations, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        params=params, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
        kv_cache=args.kv_cache,
    )
    ids, mask = left_pad(prompts, args.generations, tokenizer.pad_token_id, next(model.parameters()).device)
    tokens = ids.shape[0] * args.new_tokens

    def ours(skip_set: tuple[int, ...], seed: int) -> float:
        start = time.perf_counter()
        rollout = generate(model, prompts, skip=skip_set, seed=seed, **common)
        seconds = _synced(start, ids.device)
        assert rollout.tokens_generated == tokens
        return tokens / seconds

    def hf_generate(seed: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        seconds = _synced(start, ids.device)
        assert out.shape[1] - ids.shape[1] == args.new_tokens
        return tokens / seconds

    load_before = os.getloadavg()[0]  # other processes on the machine skew every number below
    ours(skip, seed=0)  # warm-up (allocator, kernels), not timed
    results: dict[str, list[float]] = {"model.generate": [], "ours (full)": [], f"ours (skip {len(skip)})": []}
    for repeat in range(args.repeats):
        results["model.generate"].append(hf_generate(repeat))
        results["ours (full)"].append(ours((), repeat))
        results[f"ours (skip {len(skip)})"].append(ours(skip, repeat))

    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"load average (1 min) before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    print(f"model={args.model} device={args.device} precision={args.precision} kv_cache={args.kv_cache} "
          f"threads={torch.get_num_threads()} layers={num_layers} "
          f"batch={ids.shape[0]} prompt_width={ids.shape[1]} new_tokens={args.new_tokens} repeats={args.repeats}")
    print(f"skipped layers ({len(skip)}/{num_layers}): {list(skip)}")
    for name, values in results.items():
        print(f"{name:>20}: median {medians[name]:7.1f} tok/s   runs {', '.join(f'{v:.1f}' for v in values)}")
    full, skipped = medians["ours (full)"], medians[f"ours (skip {len(skip)})"]
    ideal = num_layers / (num_layers - len(skip))
    print(f"ours / model.generate: {full / medians['model.generate']:.3f}")
    print(f"skip speedup: {skipped / full:.3f}  ideal L/(L-k): {ideal:.3f}  efficiency: {skipped / full / ideal:.3f}")


def _synced(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
