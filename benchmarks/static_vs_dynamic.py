"""Tokens/sec of the rollout engine with the static KV cache against the dynamic one, side by side in one process.

Fixed-length work (min_new_tokens = max_new_tokens), the same prompts and seed for both caches (so the same
tokens: the script checks it). Runs are interleaved A/B/B/A within each repeat so that machine noise hits both
alike; each repeat gives a static/dynamic ratio, and the median ratio is printed with the medians of
tokens/sec. Two clocks: wall time, and this process's CPU time, which other processes on a shared machine
disturb far less (with one thread it is the compute time). With --skip-ratio > 0 the same is done with that
fraction of layers skipped. Usage:

    python benchmarks/static_vs_dynamic.py [--device cpu] [--threads 1] [--repeats 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nested_reft.data import generate_arithmetic
from nested_reft.models import load_model
from nested_reft.rollout import generate
from nested_reft.sampling import SamplingParams
from nested_reft.skipping import SkipSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ratio", type=float, default=0.0, help="also compare with this fraction skipped")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    questions = [e.question for e in generate_arithmetic("test", args.prompts, seed=0, difficulty=3)]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        for q in questions
    ]
    num_layers = model.config.num_hidden_layers
    skips = [()]
    if args.skip_ratio > 0:
        skips.append(SkipSampler(num_layers, ratio=args.skip_ratio, seed=0).sample()[1])
    common = dict(
        num_generations=args.generations, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        params=SamplingParams(temperature=1.0), eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )

    def run(kv_cache: str, skip: tuple[int, ...], seed: int):
        start, cpu_start = time.perf_counter(), time.process_time()
        rollout = generate(model, prompts, skip=skip, seed=seed, kv_cache=kv_cache, cuda_graphs="off", **common)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        tokens = rollout.tokens_generated
        return rollout, (tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu_start))

    load_before = os.getloadavg()[0]
    for skip in skips:  # warm-up (allocator, the static engine's buffers), not timed
        run("static", skip, 0)
        run("dynamic", skip, 0)
    clocks = ("wall", "cpu")
    speeds: dict[tuple, list[float]] = {}  # (clock, kv_cache, skip) -> tokens/s of each run
    ratios: dict[tuple, list[float]] = {}  # (clock, skip) -> static/dynamic of each repeat
    identical = True
    for repeat in range(args.repeats):
        for skip in skips:
            order = ("dynamic", "static", "static", "dynamic")  # ABBA: drifts in load cancel
            got: dict[tuple, list[float]] = {}
            outputs = {}
            for kv_cache in order:
                rollout, measured = run(kv_cache, skip, seed=repeat)
                for clock, speed in zip(clocks, measured):
                    got.setdefault((clock, kv_cache), []).append(speed)
                outputs[kv_cache] = rollout
            identical &= torch.equal(outputs["static"].completion_ids, outputs["dynamic"].completion_ids)
            for (clock, kv_cache), values in got.items():
                speeds.setdefault((clock, kv_cache, skip), []).extend(values)
            for clock in clocks:
                ratio = statistics.mean(got[(clock, "static")]) / statistics.mean(got[(clock, "dynamic")])
                ratios.setdefault((clock, skip), []).append(ratio)

    batch = len(prompts) * args.generations
    print(f"load average (1 min) before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    print(f"model={args.model} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"batch={batch} new_tokens={args.new_tokens} repeats={args.repeats} (ABBA pairs)")
    print(f"static and dynamic sampled identical tokens: {identical}")
    for skip in skips:
        label = f"skip {len(skip)}/{num_layers}" if skip else "full model"
        for clock in clocks:
            for kv_cache in ("dynamic", "static"):
                values = speeds[(clock, kv_cache, skip)]
                print(f"{label:>14} {clock:>4} {kv_cache:>8}: median {statistics.median(values):7.1f} tok/s   "
                      f"runs {', '.join(f'{v:.1f}' for v in values)}")
            values = ratios[(clock, skip)]
            print(f"{label:>14} {clock:>4} static/dynamic: median ratio {statistics.median(values):.3f}   "
                  f"per repeat {', '.join(f'{r:.3f}' for r in values)}")


if __name__ == "__main__":
    main()
