"""How much of the update's work is padding, and what bucketing or packing saves, on the quickstart's batches.

The update's rows are [left-padded prompt | right-padded completion], as wide as the batch's longest prompt plus
its longest completion. Three ways to run the same rows in micro-batches of `train.micro_batch_size`:

- full width: rows in their order, every micro-batch as wide as the batch (what the update did before);
- bucketed: rows sorted by length, each micro-batch trimmed to its own columns (`update.UpdatePlan`);
- packed: each micro-batch's rows concatenated without padding into one sequence, positions restarting per row,
  under a block-diagonal causal mask (attention then spans the whole packed length).

It samples quickstart batches (recipes/quickstart.yaml: 4 prompts x 4 completions of up to 96 tokens at
temperature 0.7, the recipe's prompt format, the recipe's precision) with the full model, reports the padded
fraction of the tokens each way computes, and times a forward + backward of the completion log-probs each way,
interleaved (ABBA) over repeats.

    python benchmarks/update_padding.py [--batches 3] [--repeats 2] [--model runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from nested_reft.data import generate_arithmetic
from nested_reft.models import load_model
from nested_reft.objective import completion_log_probs
from nested_reft.precision import MasterWeights, keeps_fp32_head, resolve_runtime
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import load_recipe
from nested_reft.rollout import generate
from nested_reft.rundir import resolve_model_path
from nested_reft.sampling import SamplingParams, log_probs
from nested_reft.scoring import ScoredRollout
from nested_reft.update import UpdatePlan
from nested_reft.distributed import World

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def packed_log_probs(model, plan: UpdatePlan, rows: list[int], params: SamplingParams) -> torch.Tensor:
    """Completion log-probs of `rows` run as one packed sequence (no padding; block-diagonal causal attention)."""
    pieces, positions, owner, targets_at = [], [], [], []
    start = 0
    for i, row in enumerate(rows):
        p, c = plan.prompt_lengths[row], plan.completion_lengths[row]
        tokens = plan.input_ids[row, plan.prompt_width - p : plan.prompt_width + c]
        pieces.append(tokens)
        positions.append(torch.arange(p + c))
        owner.append(torch.full((p + c,), i))
        targets_at.append(torch.arange(start + p - 1, start + p + c - 1))  # positions predicting the completion
        start += p + c
    ids, pos, own = torch.cat(pieces)[None], torch.cat(positions)[None], torch.cat(owner)
    causal = torch.ones(len(own), len(own), dtype=torch.bool).tril()
    mask = (causal & (own[:, None] == own[None, :]))[None, None]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[0]
    at = torch.cat(targets_at)
    logits = model.lm_head(hidden[at])
    return log_probs(logits, params).gather(-1, ids[0, at + 1, None]).squeeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="quickstart batches sampled (different prompts)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=None, help="sample with this model or run directory (e.g. a trained "
                        "quickstart run: its completions are shorter) instead of the recipe's")
    args = parser.parse_args()

    recipe, _ = resolve_runtime(load_recipe(RECIPE, ["model.device=cpu", "data.train=arithmetic"]))
    model, tokenizer = load_model(resolve_model_path(args.model or recipe.model.name_or_path), device="cpu")
    MasterWeights(model, recipe.model.mixed_precision, fp32_head=keeps_fp32_head(recipe.model))
    params = SamplingParams(recipe.rollout.temperature)
    group, mb = recipe.rollout.num_generations, recipe.train.micro_batch_size
    questions = [e.question for e in generate_arithmetic("train", 4 * args.batches, seed=0, difficulty=1)]
    plans = []
    for b in range(args.batches):
        prompts = encode_prompts(tokenizer, questions[4 * b : 4 * b + 4], recipe.data)
        rollout = generate(model, prompts, num_generations=group, max_new_tokens=recipe.rollout.max_completion_length,
                           params=params, eos_token_ids=eos_token_ids(tokenizer, model.generation_config),
                           pad_token_id=tokenizer.pad_token_id, seed=b)
        rewards = torch.ones(len(rollout.prompt_ids))
        scored = ScoredRollout(rollout, rewards, [True] * len(rewards), [""] * len(rewards), torch.ones_like(rewards))
        plans.append(UpdatePlan.of(scored, group, World(), skip_zero_advantage=False, beta=0.0))

    def computed_tokens(plan: UpdatePlan, way: str) -> int:
        rows = list(range(len(plan.prompt_lengths)))
        if way == "full width":
            return len(rows) * plan.input_ids.shape[1]
        if way == "packed":
            return sum(plan.prompt_lengths) + sum(plan.completion_lengths)
        return sum(len(b.rows) * (plan.prompt_width - b.left + b.width) for b in plan.micro_batches(plan.train_rows, mb))

    ways = ["full width", "bucketed", "packed"]
    real = sum(sum(p.prompt_lengths) + sum(p.completion_lengths) for p in plans)
    padded = {way: 1 - real / sum(computed_tokens(p, way) for p in plans) for way in ways}

    def forward_backward(plan: UpdatePlan, way: str) -> float:
        start = time.perf_counter()
        if way == "packed":
            rows = plan.train_rows.tolist()
            for i in range(0, len(rows), mb):
                packed_log_probs(model, plan, rows[i : i + mb], params).sum().backward()
        else:
            batches = plan.micro_batches(plan.train_rows, mb)
            if way == "full width":
                batches = [type(b)(b.rows, 0, plan.mask.shape[1]) for b in batches]
            for batch in batches:
                (plan.log_probs(lambda *a: completion_log_probs(model, *a), batch, params, 1024)
                 * plan.mask[batch.rows]).sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    load = os.getloadavg()[0]
    forward_backward(plans[0], "bucketed")  # warm-up
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for r in range(args.repeats):
        for way in ways[:: 1 if r % 2 == 0 else -1]:
            seconds[way].append(sum(forward_backward(plan, way) for plan in plans))
    report = {
        "precision": f"{recipe.model.mixed_precision}, head {recipe.model.head_dtype}", "threads": torch.get_num_threads(),
        "batches": args.batches, "rows_per_batch": len(plans[0].prompt_lengths), "micro_batch_size": mb,
        "real_tokens": real, "padded_fraction": padded,
        "completion_lengths": [p.completion_lengths for p in plans],
        "forward_backward_seconds": {way: statistics.median(v) for way, v in seconds.items()},
        "runs": seconds, "load_average_before_after": [load, os.getloadavg()[0]],
    }
    full = report["forward_backward_seconds"]["full width"]
    report["speedup_over_full_width"] = {way: full / s for way, s in report["forward_backward_seconds"].items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
