"""`nested-reft bench --compare baseline`: the same work with and without layer skipping, side by side.

Fairness rules: one process, one model, the same prompts and seed for every mode, a fixed completion length
(EOS is suppressed until `max_completion_length`, so every mode generates exactly the same number of tokens),
one untimed warm-up, and runs interleaved (baseline, r1, r2, then r2, r1, baseline, ...) so that drift in
machine speed hits every mode alike. Figures are medians over repeats. Each ratio's skip set is drawn once (seeded)
and reused across repeats.

speedup = nested tokens/sec / baseline tokens/sec (the median of the per-repeat ratios); the ideal is L / (L - k) (only decoder layers are skipped:
embedding, LM head and sampling cost the same in both modes, so efficiency = speedup / ideal < 1 is expected).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nested_reft.data import load_examples
from nested_reft.models import load_model, peak_memory_mb, reset_peak_memory
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import Recipe
from nested_reft.rollout import generate
from nested_reft.rundir import resolve_model_path
from nested_reft.sampling import SamplingParams
from nested_reft.skipping import SkipSampler, decoder_layers
from nested_reft.trainer import math_reward_fn, optimise, score

Progress = Callable[[str], None]


def bench(recipe: Recipe, skip_ratios: list[float], *, repeats: int = 3, what: str = "rollout",
          progress: Progress = lambda _: None) -> dict[str, Any]:
    """Time rollouts (`what="rollout"`) or whole training steps (`what="train"`) for the full model and each
    skip ratio; returns the report (see module docstring)."""
    source = resolve_model_path(recipe.model.name_or_path)
    model, tokenizer = load_model(source, dtype=recipe.model.dtype, device=recipe.model.device)
    device = next(model.parameters()).device
    num_layers = len(decoder_layers(model))
    examples = load_examples(recipe.data.train, split=recipe.data.train_split, limit=recipe.train.prompts_per_step,
                             seed=recipe.run.seed)[: recipe.train.prompts_per_step]
    prompts = encode_prompts(tokenizer, [e.question for e in examples], recipe.data)
    params = SamplingParams(recipe.rollout.temperature, recipe.rollout.top_k, recipe.rollout.top_p)
    length = recipe.rollout.max_completion_length
    eos = eos_token_ids(tokenizer, model.generation_config)

    modes: list[tuple[str, float, tuple[int, ...]]] = [("baseline", 0.0, ())]
    for ratio in skip_ratios:
        sampler = SkipSampler(num_layers, ratio=ratio, keep_first=recipe.skipping.keep_first,
                              keep_last=recipe.skipping.keep_last, seed=recipe.run.seed)
        modes.append(("nested", ratio, sampler.sample()[1]))

    initial = copy.deepcopy(model.state_dict()) if what == "train" else None
    reward_fn = math_reward_fn(recipe)

    def run_once(skip: tuple[int, ...], max_new_tokens: int) -> dict[str, float]:
        if initial is not None:
            model.load_state_dict(initial)  # every mode samples and trains from the same weights
        reset_peak_memory(device)
        start = time.perf_counter()
        rollout = generate(model, prompts, num_generations=recipe.rollout.num_generations,
                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, params=params,
                           eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, skip=skip, seed=recipe.run.seed,
                           kv_cache=recipe.rollout.kv_cache, cuda_graphs=recipe.rollout.cuda_graphs)
        sample = {"tokens_per_sec": rollout.tokens_per_second, "prefill_seconds": rollout.prefill_seconds,
                  "decode_seconds": rollout.decode_seconds, "tokens": rollout.tokens_generated}
        if what == "train":
            generated = time.perf_counter()
            batch = score(rollout, examples, tokenizer, reward_fn, recipe.rollout.num_generations,
                          recipe.objective.scale_rewards)
            scored = time.perf_counter()
            optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.optimizer.lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            optimise(model, None, optimizer, scheduler, batch, recipe, params)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done = time.perf_counter()
            sample |= {"generate_seconds": generated - start, "score_seconds": scored - generated,
                       "train_seconds": done - scored, "step_seconds": done - start}
        sample["peak_memory_mb"] = peak_memory_mb(device)
        return sample

    progress("warm-up")
    run_once((), min(8, length))
    samples: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(modes))}
    for r in range(repeats):
        # ABBA order: every other repeat runs the modes backwards, so a drift in machine speed during a
        # repeat does not always favour the modes that run first.
        order = list(range(len(modes)))[:: 1 if r % 2 == 0 else -1]
        for i in order:
            mode, ratio, skip = modes[i]
            progress(f"repeat {r + 1}/{repeats}: {mode} {ratio:.2f}")
            samples[i].append(run_once(skip, length))

    results = []
    for i, (mode, ratio, skip) in enumerate(modes):
        medians = {key: statistics.median(s[key] for s in samples[i]) for key in samples[i][0] if key != "tokens"}
        results.append({"mode": mode, "skip_ratio": ratio, "skipped_layers": list(skip), **medians,
                        "tokens_per_sec_repeats": [s["tokens_per_sec"] for s in samples[i]]})
    base = results[0]
    comparisons = []
    for i, result in enumerate(results[1:], start=1):
        ideal = num_layers / (num_layers - len(result["skipped_layers"]))
        # The median of per-repeat ratios: each pair ran back to back, so slow phases of the machine cancel.
        speedup = statistics.median(n["tokens_per_sec"] / b["tokens_per_sec"] for n, b in zip(samples[i], samples[0]))
        entry = {"skip_ratio": result["skip_ratio"], "num_skipped": len(result["skipped_layers"]),
                 "speedup": speedup, "ideal_speedup": ideal, "efficiency": speedup / ideal}
        if what == "train":
            entry["step_speedup"] = statistics.median(b["step_seconds"] / n["step_seconds"]
                                                      for n, b in zip(samples[i], samples[0]))
        comparisons.append(entry)
    return {"model": source, "device": describe_device(device), "num_layers": num_layers, "what": what,
            "settings": {"sequences": len(prompts) * recipe.rollout.num_generations, "completion_length": length,
                         "repeats": repeats, "temperature": params.temperature, "dtype": recipe.model.dtype,
                         "seed": recipe.run.seed},
            "results": results, "comparisons": comparisons}


def describe_device(device: torch.device) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: N threads'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} threads"


def plot(report: dict[str, Any], path: Path) -> None:
    """PNG of tokens/sec against skip ratio, measured and ideal (baseline x L / (L - k))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    base = results[0]["tokens_per_sec"]
    L = report["num_layers"]
    ratios = [r["skip_ratio"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ratios, [r["tokens_per_sec"] for r in results], "o-", label="measured")
    ax.plot(ratios, [base * L / (L - len(r["skipped_layers"])) for r in results], "--", label="ideal L/(L-k)")
    ax.set_xlabel("skip ratio")
    ax.set_ylabel("rollout tokens/sec")
    ax.set_title(f"{Path(report['model']).name} on {report['device']} ({report['what']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
