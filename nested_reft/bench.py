"""`nested-reft bench --compare baseline`: the same work with and without layer skipping, side by side.

Fairness rules: one process, one model, the same prompts and seed for every mode, a fixed completion length
(EOS is suppressed until `max_completion_length`, so every mode generates exactly the same number of tokens),
one untimed warm-up, and runs interleaved (baseline, r1, r2, then r2, r1, baseline, ...) so that drift in
machine speed hits every mode alike. Figures are medians over repeats. Each ratio's skip set is drawn once (seeded),
the way the recipe's `skipping.strategy` draws it, and reused across repeats.

speedup = nested tokens/sec / baseline tokens/sec (the median of the per-repeat ratios); the ideal is L / (L - k)
(only decoder layers are skipped: embedding, LM head and sampling cost the same in both modes, so efficiency =
speedup / ideal < 1 is expected). The FLOP ideal counts them: the baseline's decode model FLOPs over the nested
mode's (the LM head included), so flop_efficiency = speedup / flop ideal is 1 when skipping saves all it can.

The step split: each part's tokens per second (prefill: prompt tokens, each prompt once; decode: generated tokens;
update: every row's prompt and completion tokens) and the fraction of this machine's peak its model FLOPs reach
(`throughput`: the peak is the best of a large matmul in the compute dtype, probed before the first run and
after every repeat).

Precision is the recipe's resolved `model.mixed_precision` (training steps keep `model.dtype` master weights).
Peak memory is measured per run: on CUDA the allocator's peak, on Linux CPUs the process's peak RSS (VmHWM),
reset through /proc/self/clear_refs before the rollout and again before the update, so each row shows its
own peaks (`peak_memory_mb` for the step, `train_peak_memory_mb` for the update alone). RSS counts
everything the process holds (model, the bench's copy of the initial weights, AdamW states, allocator caches),
so compare rows with each other rather than reading them as the step's own footprint. `--gradient-checkpointing
both` runs every mode with and without checkpointing, interleaved like the rest.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from nested_reft.calibrate import probe_layer_costs
from nested_reft.data import load_examples
from nested_reft.errors import UserError
from nested_reft.memory import set_gradient_checkpointing
from nested_reft.models import load_model, peak_memory_mb, reset_peak_memory
from nested_reft.precision import COMPUTE_DTYPES, MasterWeights, keeps_fp32_head, resolve_runtime
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import Recipe
from nested_reft.rollout import generate
from nested_reft.rundir import resolve_model_path
from nested_reft.sampling import SamplingParams
from nested_reft.scoring import reward_scorer, score
from nested_reft.skipping import SkipSampler, decoder_layers
from nested_reft.throughput import ModelFlops, matmul_peak, step_flops
from nested_reft.update import optimise

Progress = Callable[[str], None]
GRADIENT_CHECKPOINTING = ("recipe", "on", "off", "both")


@dataclass
class _Workload:
    """What every mode runs on, loaded once: the model (with float32 masters for training steps), the prompts of
    one training step, and the training step's optimiser and reward."""

    recipe: Recipe
    what: str
    model: torch.nn.Module
    tokenizer: Any
    masters: MasterWeights | None
    examples: list
    prompts: Any
    params: SamplingParams
    eos: list[int]
    flops: ModelFlops
    scorer: Any
    initial: list[torch.Tensor] | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None

    @classmethod
    def load(cls, recipe: Recipe, what: str) -> "_Workload":
        # Training steps need the storage-dtype weights as masters; rollouts only need the compute dtype.
        model, tokenizer = load_model(resolve_model_path(recipe.model.name_or_path), dtype=recipe.model.dtype,
                                      device=recipe.model.device, head_dtype=recipe.model.head_dtype,
                                      mixed_precision="no" if what == "train" else recipe.model.mixed_precision)
        masters = MasterWeights(model, recipe.model.mixed_precision, fp32_head=keeps_fp32_head(recipe.model)) \
            if what == "train" else None
        per_step = recipe.train.prompts_per_step
        examples = load_examples(recipe.data.train, split=recipe.data.train_split, limit=per_step,
                                 seed=recipe.run.seed)[:per_step]
        work = cls(recipe, what, model, tokenizer, masters, examples,
                   encode_prompts(tokenizer, [e.question for e in examples], recipe.data),
                   SamplingParams(recipe.rollout.temperature, recipe.rollout.top_k, recipe.rollout.top_p),
                   eos_token_ids(tokenizer, model.generation_config), ModelFlops.of(model), reward_scorer(recipe))
        if masters is not None:
            work.initial = [p.detach().clone() for p in masters.params]
            # One optimiser for every run, its states zeroed before each (so every update is a fresh AdamW's first
            # step): the states stay allocated, as in training, instead of being created inside each update's window.
            work.optimizer = torch.optim.AdamW(masters.params, lr=recipe.optimizer.lr)
            work.scheduler = torch.optim.lr_scheduler.LambdaLR(work.optimizer, lambda _: 1.0)
        return work

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def skip_sets(self, skip_ratios: list[float], progress: Progress) -> list[tuple[str, float, tuple[int, ...]]]:
        """(mode, ratio, skipped layers): the baseline, then each ratio's set drawn the way the recipe's strategy
        draws it in training (a `fixed` set is the one nested mode). The cost-aware strategies measure per-layer
        costs first when no calibration file is given."""
        sampler = SkipSampler.from_config(self.recipe.skipping, self.num_layers, self.recipe.run.seed)
        if sampler.needs_costs:
            progress("measuring per-layer skip costs")
            reference = generate(self.model, self.prompts, max_new_tokens=self.recipe.rollout.max_completion_length,
                                 params=self.params, eos_token_ids=self.eos, pad_token_id=self.tokenizer.pad_token_id,
                                 seed=self.recipe.run.seed)
            sampler.set_costs(probe_layer_costs(self.model, reference, list(range(len(self.prompts))),
                                                sampler.eligible, self.params))
        if self.recipe.skipping.strategy == "fixed":
            return [("baseline", 0.0, ()), ("nested", *sampler.sample())]
        return [("baseline", 0.0, ()), *(("nested", ratio, sampler.sample(ratio)[1]) for ratio in skip_ratios)]

    def run(self, skip: tuple[int, ...], max_new_tokens: int, gc: bool) -> dict[str, float]:
        """One timed rollout (and, for training steps, its scoring and update) from the initial weights."""
        recipe, device = self.recipe, self.device
        if self.masters is not None:  # every mode samples and trains from the same weights
            with torch.no_grad():
                for p, value in zip(self.masters.params, self.initial):
                    p.copy_(value)
            self.masters.copy_to_model()
            set_gradient_checkpointing(self.model, gc)
            for state in self.optimizer.state.values():
                for value in state.values():
                    value.zero_()
        resettable = reset_peak_memory(device)
        start = time.perf_counter()
        rollout = generate(self.model, self.prompts, num_generations=recipe.rollout.num_generations,
                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, params=self.params,
                           eos_token_ids=self.eos, pad_token_id=self.tokenizer.pad_token_id, skip=skip,
                           seed=recipe.run.seed, kv_cache=recipe.rollout.kv_cache,
                           cuda_graphs=recipe.rollout.cuda_graphs, compile_layers=recipe.rollout.compile == "on")
        prompt_lengths, completion_lengths = torch.stack([rollout.prompt_mask.sum(1),
                                                          rollout.completion_mask.sum(1)]).tolist()
        flops = step_flops(self.flops, prompt_lengths, completion_lengths, recipe.rollout.num_generations,
                           self.num_layers - len(skip))
        prompt_tokens = sum(prompt_lengths[:: recipe.rollout.num_generations])  # each prompt is prefilled once
        sample = {"tokens_per_sec": rollout.tokens_per_second, "prefill_seconds": rollout.prefill_seconds,
                  "decode_seconds": rollout.decode_seconds, "tokens": rollout.tokens_generated,
                  "compile_seconds": rollout.compile_seconds, "peak_memory_mb": peak_memory_mb(device),
                  "prefill_tokens_per_sec": prompt_tokens / rollout.prefill_seconds,
                  "decode_tokens_per_sec": rollout.tokens_generated / rollout.decode_seconds,
                  "decode_flops": flops["decode"],
                  "prefill_flops_per_sec": flops["prefill"] / rollout.prefill_seconds,
                  "decode_flops_per_sec": flops["decode"] / rollout.decode_seconds}
        if self.what != "train":
            return sample
        generated = time.perf_counter()
        batch = score(rollout, self.examples, self.tokenizer, self.scorer, recipe.rollout.num_generations,
                      recipe.objective.scale_rewards)
        scored = time.perf_counter()
        if resettable:  # the update's own peak (activations, gradients, optimiser states), rollout excluded
            reset_peak_memory(device)
        optimise(self.model, None, self.optimizer, self.scheduler, batch, recipe, self.params, self.masters,
                 skip_zero_advantage=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done = time.perf_counter()
        train_peak = peak_memory_mb(device)
        return sample | {"generate_seconds": generated - start, "score_seconds": scored - generated,
                         "train_seconds": done - scored, "step_seconds": done - start,
                         "train_peak_memory_mb": train_peak,
                         "peak_memory_mb": max(sample["peak_memory_mb"], train_peak),
                         "train_tokens_per_sec": (sum(prompt_lengths) + sum(completion_lengths)) / (done - scored),
                         "train_flops_per_sec": flops["update"] / (done - scored),
                         "step_flops_per_sec": sum(flops.values()) / (done - start)}


def bench(recipe: Recipe, skip_ratios: list[float], *, repeats: int = 3, what: str = "rollout",
          gradient_checkpointing: str = "recipe", progress: Progress = lambda _: None) -> dict[str, Any]:
    """Time rollouts (`what="rollout"`) or whole training steps (`what="train"`) for the full model and each
    skip ratio; returns the report (see module docstring).

    Precision is the recipe's (`model.mixed_precision`, resolved). For training steps, `gradient_checkpointing`
    is "recipe" (the recipe's resolved `train.gradient_checkpointing`), "on", "off", or "both": every mode then
    runs with and without it, and the report's `gradient_checkpointing` entry compares the baseline's peaks.
    """
    if gradient_checkpointing not in GRADIENT_CHECKPOINTING:
        raise UserError(f"--gradient-checkpointing: expected one of {', '.join(GRADIENT_CHECKPOINTING)}, "
                        f"found {gradient_checkpointing!r}")
    if what != "train" and gradient_checkpointing != "recipe":
        raise UserError("--gradient-checkpointing applies to --what train only (rollouts never checkpoint)")
    recipe, _ = resolve_runtime(recipe)
    work = _Workload.load(recipe, what)
    checkpointing = {"recipe": [bool(recipe.train.gradient_checkpointing)], "on": [True], "off": [False],
                     "both": [False, True]}[gradient_checkpointing] if what == "train" else [False]
    modes = [(mode, ratio, skip, gc) for gc in checkpointing for mode, ratio, skip in work.skip_sets(skip_ratios,
                                                                                                     progress)]
    progress("probing the matmul peak")
    peak_dtype = COMPUTE_DTYPES[recipe.model.mixed_precision] or torch.float32
    peaks = [matmul_peak(work.device, peak_dtype)]  # probed again after every repeat: the best is the least disturbed
    progress("warm-up")
    warm_up = work.run((), min(8, recipe.rollout.max_completion_length), checkpointing[0])
    samples: list[list[dict[str, float]]] = [[] for _ in modes]
    for r in range(repeats):
        # ABBA order: every other repeat runs the modes backwards, so a drift in machine speed during a
        # repeat does not always favour the modes that run first.
        for i in list(range(len(modes)))[:: 1 if r % 2 == 0 else -1]:
            mode, ratio, skip, gc = modes[i]
            progress(f"repeat {r + 1}/{repeats}: {mode} {ratio:.2f}" + (f" gc {'on' if gc else 'off'}"
                                                                       if len(checkpointing) > 1 else ""))
            samples[i].append(work.run(skip, recipe.rollout.max_completion_length, gc))
        peaks.append(matmul_peak(work.device, peak_dtype))

    results, comparisons = _summarise(modes, samples, max(peaks), work.num_layers, what)
    report = {"model": resolve_model_path(recipe.model.name_or_path), "device": describe_device(work.device),
              "num_layers": work.num_layers, "what": what,
              "settings": {"sequences": len(work.prompts) * recipe.rollout.num_generations,
                           "completion_length": recipe.rollout.max_completion_length, "repeats": repeats,
                           "temperature": recipe.rollout.temperature, "dtype": recipe.model.dtype,
                           "mixed_precision": recipe.model.mixed_precision, "head_dtype": recipe.model.head_dtype,
                           "strategy": recipe.skipping.strategy, "seed": recipe.run.seed,
                           "compile": recipe.rollout.compile, "warm_up_compile_seconds": warm_up["compile_seconds"],
                           "matmul_peak_gflops": max(peaks) / 1e9,
                           "peak_dtype": str(peak_dtype).removeprefix("torch."),
                           "peak_memory": peak_memory_method(work.device)},
              "results": results, "comparisons": comparisons}
    if len(checkpointing) > 1:
        off, on = (results[modes.index(("baseline", 0.0, (), gc))] for gc in (False, True))
        report["gradient_checkpointing"] = {
            key: {"off": off[key], "on": on[key], "on_over_off": on[key] / off[key]}
            for key in ("train_peak_memory_mb", "peak_memory_mb", "train_seconds")}
    return report


def _summarise(modes: list[tuple], samples: list[list[dict[str, float]]], peak: float, num_layers: int,
               what: str) -> tuple[list[dict], list[dict]]:
    """Each mode's medians over repeats (with its FLOP rates as fractions of `peak`), and each nested mode's speed-up
    over the baseline with the same checkpointing."""
    results = []
    for (mode, ratio, skip, gc), runs in zip(modes, samples):
        for s in runs:
            s |= {key.replace("flops_per_sec", "peak_fraction"): value / peak
                  for key, value in s.items() if key.endswith("flops_per_sec")}
        medians = {key: statistics.median(s[key] for s in runs) for key in runs[0] if key != "tokens"}
        results.append({"mode": mode, "skip_ratio": ratio, "skipped_layers": list(skip), **medians,
                        "tokens_per_sec_repeats": [s["tokens_per_sec"] for s in runs],
                        **({"gradient_checkpointing": gc} if what == "train" else {})})
    comparisons = []
    for (mode, ratio, skip, gc), runs in zip(modes, samples):
        if mode == "baseline":
            continue
        base = samples[modes.index(("baseline", 0.0, (), gc))]
        ideal = num_layers / (num_layers - len(skip))
        # The median of per-repeat ratios: each pair ran back to back, so slow phases of the machine cancel.
        speedup = statistics.median(n["tokens_per_sec"] / b["tokens_per_sec"] for n, b in zip(runs, base))
        # L / (L - k) counts decoder layers only; the LM head, the embedding and sampling run in both modes. The
        # FLOP ideal is the ratio of the decode's model FLOPs (head included), the most skipping can save.
        flop_ideal = statistics.median(b["decode_flops"] / n["decode_flops"] for n, b in zip(runs, base))
        entry = {"skip_ratio": ratio, "num_skipped": len(skip), "speedup": speedup, "ideal_speedup": ideal,
                 "efficiency": speedup / ideal, "flop_ideal_speedup": flop_ideal,
                 "flop_efficiency": speedup / flop_ideal}
        if what == "train":
            entry["step_speedup"] = statistics.median(b["step_seconds"] / n["step_seconds"] for n, b in zip(runs, base))
            entry["gradient_checkpointing"] = gc
        comparisons.append(entry)
    return results, comparisons


def peak_memory_method(device: torch.device) -> str:
    """How `peak_memory_mb` was measured on this device, for the report."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each rollout and each update"
    if reset_peak_memory(device):
        return "process peak RSS (VmHWM), reset via /proc/self/clear_refs before each rollout and each update"
    return "process peak RSS since start (not resettable here): every row shows the largest so far"


def describe_device(device: torch.device) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: N threads'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} threads"
