"""Bridges or shared weights: which route teaches the layer-skipped view to track the policy (issue 18's choice).

The embedded SmolLM2-135M skips a fixed set S (by default its 8 cheapest layers, {3,4,5,6,7,9,12,17}). Each step
samples `--completions` completions at temperature 0.7 from the full model, on training prompts it has not seen
before, and takes one AdamW step on KL(pi.detach() || mu_S) over their completion tokens, by one of two routes:

  bridges   rank-`--rank` skip bridges, trained by the run's own term (`robustness.Robustness.step`); the policy
            never runs them, so it does not move
  shared    the model's own weights, under `skip_layers(S)`; the teacher is detached but made of the same weights,
            so it moves with the student

Every `--every` steps, on `--heldout` test prompts with one full-model completion each (sampled once, at step 0):
the exact KL(mu_S || pi) per completion token over the vocabulary, teacher-forced, and how far the full model has
drifted from where it started, KL(pi_new || pi_0) per token. Both routes start from the same weights and see the
same prompts. float32 throughout; a CPU run of the defaults takes about 10 minutes on 2 cores.

    python benchmarks/bridges_vs_shared.py [--steps 18] [--every 6] [--out benchmarks/results/bridges_vs_shared.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from nested_reft.data import generate_arithmetic
from nested_reft.distributed import World
from nested_reft.models import load_model
from nested_reft.objective import completion_hidden_states
from nested_reft.parallel import no_parallel
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import DataConfig
from nested_reft.robustness import Robustness, token_kls
from nested_reft.rollout import Rollout, generate
from nested_reft.rundir import resolve_model_path
from nested_reft.sampling import SamplingParams, log_probs
from nested_reft.scoring import ScoredRollout
from nested_reft.skipping import skip_layers

PARAMS = SamplingParams(temperature=0.7)
CHUNK = 256  # rows of the LM head at a time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--skip", type=int, nargs="+", default=[3, 4, 5, 6, 7, 9, 12, 17])
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--completions", type=int, default=8, help="training completions per step (1 per prompt)")
    parser.add_argument("--heldout", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--bridge-lr", type=float, default=1e-3)
    parser.add_argument("--shared-lr", type=float, default=1e-5)
    parser.add_argument("--out", default="benchmarks/results/bridges_vs_shared.json")
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = load_model(resolve_model_path(args.model), device="cpu")
    questions = [e.question for e in generate_arithmetic("train", args.steps * args.completions, seed=0, difficulty=1)]
    train_prompts = encode_prompts(tokenizer, questions, DataConfig())
    heldout_prompts = encode_prompts(tokenizer, [e.question for e in generate_arithmetic(
        "test", args.heldout, seed=0, difficulty=1)], DataConfig())
    sample = dict(max_new_tokens=args.max_new_tokens, params=PARAMS, pad_token_id=tokenizer.pad_token_id,
                  eos_token_ids=eos_token_ids(tokenizer, model.generation_config))
    skip = tuple(args.skip)

    heldout = generate(model, heldout_prompts, seed=0, **sample)
    with torch.no_grad():
        initial = _full_log_probs(model, heldout)  # pi_0 over the vocabulary, [N, V]

    routes = {"bridges": _BridgeRoute(copy.deepcopy(model), skip, args.rank, args.bridge_lr),
              "shared": _SharedRoute(copy.deepcopy(model), skip, args.shared_lr)}
    del model
    report = {"model": args.model, "skip": list(skip), "args": vars(args), "heldout_tokens": int(
        heldout.completion_mask.sum()), "routes": {name: [] for name in routes}}
    for name, route in routes.items():
        for step in range(args.steps + 1):
            if step % args.every == 0:
                row = {"step": step, **route.evaluate(heldout, initial)}
                report["routes"][name].append(row)
                print(f"{name:8s} step {step:3d}  KL(mu_S||pi) {row['kl_mu_pi']:.3f}  drift {row['drift']:.4f}",
                      flush=True)
            if step < args.steps:
                prompts = train_prompts[step * args.completions : (step + 1) * args.completions]
                route.train(generate(route.model, prompts, seed=1000 + step, **sample))
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['seconds']} s)")


class _Route:
    """A copy of the model, the layers its skipped view bypasses, and how that view is taught."""

    bridges = None

    def __init__(self, model: torch.nn.Module, skip: tuple[int, ...]):
        self.model, self.skip = model, skip

    def evaluate(self, heldout: Rollout, initial: torch.Tensor) -> dict[str, float]:
        """Per completion token of `heldout`: KL(mu_S || pi) now, and KL(pi || pi_0) against `initial`."""
        ids, attention = heldout.sequences()
        mask = heldout.completion_mask.reshape(-1)
        width = heldout.prompt_ids.shape[1]
        with torch.no_grad():
            teacher = completion_hidden_states(self.model, ids, attention, width)[mask]
            with skip_layers(self.model, self.skip, self.bridges):
                student = completion_hidden_states(self.model, ids, attention, width)[mask]
            tokens = heldout.completion_ids.reshape(-1)[mask]
            _, kl_mu_pi, _ = token_kls(self.model.lm_head, teacher, student, PARAMS, CHUNK, tokens)
            drift = 0.0  # KL(pi || pi_0), the head applied a chunk at a time
            for hidden, then in zip(teacher.split(CHUNK), initial.split(CHUNK)):
                now = log_probs(self.model.lm_head(hidden), PARAMS)
                drift += float((now.exp() * (now - then)).sum())
        count = float(mask.sum())
        return {"kl_mu_pi": kl_mu_pi / count, "drift": drift / count}


class _BridgeRoute(_Route):
    def __init__(self, model, skip, rank: int, lr: float):
        super().__init__(model, skip)
        settings = SimpleNamespace(robustness_weight=1.0, robustness_rows=10**6, robustness_every=1,
                                   robustness_rank=rank, robustness_lr=lr)
        self.term = Robustness(model, settings, list(range(model.config.num_hidden_layers)), World())
        self.bridges = self.term.bridges

    def train(self, rollout: Rollout) -> None:
        rows = rollout.completion_ids.shape[0]
        batch = ScoredRollout(rollout, torch.zeros(rows), [False] * rows, [""] * rows, torch.zeros(rows))
        self.term.step(self.model, batch, self.skip, PARAMS, no_parallel(self.model), CHUNK)


class _SharedRoute(_Route):
    def __init__(self, model, skip, lr: float):
        super().__init__(model, skip)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def train(self, rollout: Rollout) -> None:
        ids, attention = rollout.sequences()
        mask = rollout.completion_mask.reshape(-1)
        width = rollout.prompt_ids.shape[1]
        with torch.no_grad():
            teacher = completion_hidden_states(self.model, ids, attention, width)[mask]
        with skip_layers(self.model, self.skip):
            student = completion_hidden_states(self.model, ids, attention, width)[mask]
            forward_kl, _, _ = token_kls(self.model.lm_head, teacher, student, PARAMS, CHUNK,
                                         rollout.completion_ids.reshape(-1)[mask])
        (forward_kl / max(float(mask.sum()), 1.0)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _full_log_probs(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """The full model's sampling log-probs over the vocabulary at every completion token of `rollout`, [N, V]."""
    ids, attention = rollout.sequences()
    hidden = completion_hidden_states(model, ids, attention, rollout.prompt_ids.shape[1])
    hidden = hidden[rollout.completion_mask.reshape(-1)]
    return torch.cat([log_probs(model.lm_head(h), PARAMS) for h in hidden.split(CHUNK)])


if __name__ == "__main__":
    main()
