"""Accuracy of a model on a data set: pass@1, pass@k and maj@k, with the full model and the rollout engine, beside
the mean of each of the recipe's reward functions.

A completion is correct by the `math` reward function when the recipe has it, else when its total reward reaches
`reward.correct_threshold`; maj@k (a vote among final answers) needs `math`. Reward functions are called on each
decoded batch as in training, with `step` 0. `evaluate_examples` is the library entry point (train calls it every
`eval_every` steps); `evaluate` adds what the `evaluate` command needs around it: resolving the model and data, and
writing the report files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nested_reft.data import Example, load_examples
from nested_reft.errors import UserError
from nested_reft.devices import resolve_device
from nested_reft.models import load_model
from nested_reft.compiled_decode import resolve_compile
from nested_reft.precision import resolve_head_dtype, resolve_mixed_precision
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import DataConfig, RewardConfig
from nested_reft.rewards import answers_match, extract_answer
from nested_reft.rewards.functions import Completions, RewardFunctions
from nested_reft.rollout import generate
from nested_reft.rundir import atomic_write_json, atomic_write_text, resolve_model_path
from nested_reft.sampling import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids the huge binomials of the closed form.
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(predicted: list[str | None], correct: list[bool], timeout_s: float) -> bool:
    """Whether the most frequent answer (equivalent answers counted together, ties to the earliest) is correct."""
    clusters: list[list[int]] = []  # indices of equivalent predictions, in order of first appearance
    for i, answer in enumerate(predicted):
        if answer is None:
            continue
        for cluster in clusters:
            if answers_match(answer, predicted[cluster[0]], timeout_s=timeout_s):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    if not clusters:
        return False
    best = max(clusters, key=len)  # max keeps the first of equal-sized clusters
    return correct[best[0]]


@dataclass
class EvalReport:
    """Metrics, settings and per-example records of one evaluation."""

    metrics: dict[str, float | None]  # None: a reward function that applied to no completion
    settings: dict[str, Any]
    n: int
    seconds: float
    tokens_per_sec: float
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)

    def to_dict(self, *, model: str, data: Any) -> dict[str, Any]:
        """The report's JSON; `data` is the data set as the recipe names it (a string, or a `recipe.DataSource`)."""
        return {"model": model, "data": data if isinstance(data, str) else data.model_dump(), "settings": self.settings,
                "metrics": self.metrics, "n": self.n, "seconds": self.seconds, "tokens_per_sec": self.tokens_per_sec}


def check_sampling(samples: int, temperature: float) -> None:
    """UserError for settings whose metrics would mean nothing: K > 1 greedy samples are K copies of one
    completion, so pass@k and maj@k would silently equal pass@1."""
    if samples < 1 or temperature < 0:
        raise UserError(f"--samples must be >= 1 and --temperature >= 0, found {samples} and {temperature}")
    if samples > 1 and temperature == 0:
        raise UserError(f"--samples {samples} at temperature 0 draws {samples} identical greedy completions "
                        "(pass@k = maj@k = pass@1); pass --temperature > 0, e.g. --temperature 0.7")


def evaluate_examples(model, tokenizer, examples: list[Example], data_cfg: DataConfig, *, samples: int = 1,
                      temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256,
                      reward_cfg: RewardConfig = RewardConfig(), seed: int = 0, batch_size: int = 64,
                      on_batch=None, kv_cache: str = "dynamic", cuda_graphs: str = "auto",
                      compile_layers: bool = False) -> EvalReport:
    """Sample `samples` completions per example with the full model and score them.

    pass@1 is the mean accuracy over all samples (greedy when samples == 1 and temperature == 0); with
    samples > 1 the report adds pass@k and, with the `math` function, maj@k for k = samples; then each reward
    function's mean, `rewards/<name>/mean`, over the completions it applies to. The reward functions default
    their length limits to `max_new_tokens`. `batch_size` completions are decoded together:
    finished rows leave the batch, so a large batch costs little where most answers are short (64 against 16
    decodes 1.5x the tokens per CPU second on SmolLM2, 2 cores).
    """
    rewards = RewardFunctions.from_config(reward_cfg, max_new_tokens)
    params = SamplingParams(temperature=temperature, top_p=top_p)
    eos = eos_token_ids(tokenizer, model.generation_config)
    prompts_per_batch = max(1, batch_size // samples)
    records, tokens, gen_seconds, start = [], 0, 0.0, time.perf_counter()
    for b in range(0, len(examples), prompts_per_batch):
        chunk = examples[b : b + prompts_per_batch]
        rollout = generate(model, encode_prompts(tokenizer, [e.question for e in chunk], data_cfg),
                           num_generations=samples, max_new_tokens=max_new_tokens, params=params,
                           eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, seed=seed + b,
                           kv_cache=kv_cache, cuda_graphs=cuda_graphs, compile_layers=compile_layers)
        tokens += rollout.tokens_generated
        gen_seconds += rollout.prefill_seconds + rollout.decode_seconds
        ids = rollout.completions()
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        scores = rewards(Completions(texts, ids, [ex for ex in chunk for _ in range(samples)], 0, "evaluation"))
        for j, ex in enumerate(chunk):
            rows = slice(j * samples, (j + 1) * samples)
            records.append({"id": ex.id, "question": ex.question, "gold": ex.answer, "completions": texts[rows],
                            "predicted": [extract_answer(t, last_number_fallback=reward_cfg.last_number_fallback)
                                          for t in texts[rows]],
                            "correct": scores.correct[rows], "reward": scores.total[rows],
                            "rewards": {name: values[rows] for name, values in scores.values.items()},
                            "columns": ex.columns})
        if on_batch:
            on_batch(len(chunk))

    n = len(records)
    correct = [sum(r["correct"]) for r in records]
    metrics: dict[str, float | None] = {"pass@1": sum(c / samples for c in correct) / n if n else 0.0}
    if samples > 1:
        metrics["pass@k"] = sum(pass_at_k(samples, c, samples) for c in correct) / n if n else 0.0
        if rewards.has_math:
            metrics["maj@k"] = sum(majority_correct(r["predicted"], r["correct"], reward_cfg.timeout_s)
                                   for r in records) / n if n else 0.0
    for name in rewards.names:
        applicable = [v for r in records for v in r["rewards"][name] if v is not None]
        metrics[f"rewards/{name}/mean"] = sum(applicable) / len(applicable) if applicable else None
    settings = {"samples": samples, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "seed": seed}
    return EvalReport(metrics, settings, n, time.perf_counter() - start,
                      tokens / gen_seconds if gen_seconds else 0.0, records)


def evaluate(model_spec: str, data_spec: Any, *, split: str, limit: int | None, samples: int, temperature: float,
             max_new_tokens: int, data_cfg: DataConfig, reward_cfg: RewardConfig, dtype: str, device: str,
             seed: int, report_path: Path, mixed_precision: str = "no", on_batch=None, kv_cache: str = "dynamic",
             cuda_graphs: str = "auto", batch_size: int = 64, head_dtype: str = "auto",
             compile: str = "off") -> dict[str, Any]:
    """Evaluate a model (path, alias or run directory) on a data set; writes the JSON report and, beside it, the
    per-example JSONL. Returns the report. `mixed_precision` (auto | no | bf16 | fp16) is the compute dtype, and
    `head_dtype` (auto | float32 | compute) the LM head's under it; `compile` (auto | on | off) is the recipe's
    `rollout.compile`. Bad arguments are UserErrors raised before the model loads."""
    check_sampling(samples, temperature)
    path = resolve_model_path(model_spec)
    precision, _ = resolve_mixed_precision(mixed_precision, resolve_device(device))  # fails before any loading
    compile_layers = resolve_compile(compile, resolve_device(device)) == "on"
    examples = load_examples(data_spec, split=split, limit=limit, seed=seed)
    model, tokenizer = load_model(path, dtype=dtype, device=device, mixed_precision=precision, head_dtype=head_dtype)
    result = evaluate_examples(model, tokenizer, examples, data_cfg, samples=samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, reward_cfg=reward_cfg, seed=seed, on_batch=on_batch,
                               kv_cache=kv_cache, cuda_graphs=cuda_graphs, batch_size=batch_size,
                               compile_layers=compile_layers)
    report = result.to_dict(model=path, data=data_spec)
    report["settings"] |= {"dtype": dtype, "mixed_precision": precision,
                           "head_dtype": resolve_head_dtype(head_dtype, precision)}
    atomic_write_json(report_path, report)
    atomic_write_text(report_path.with_suffix(".examples.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records))
    return report
