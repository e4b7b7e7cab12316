"""The training loop: GRPO whose rollouts come from a layer-skipped view of the policy (Nested-ReFT).

One step, top to bottom (see `train`):

    prompts  -> draw a skip set S -> sample G completions per prompt from mu_S (rollout engine)
             -> score them (math reward) -> group advantages
             -> num_iterations passes of micro-batched PPO-clipped updates over the rows with signal, each
                token weighted by an importance-correction weight w(lp_old, lp_b) that accounts for sampling
                from mu_S, not pi_theta
             -> the skip controller reads the measured KL(mu || pi) (strategy `adaptive`)
             -> metrics row (with a one-line warning when the run cannot learn), rollouts, checkpoint, eval

The empty skip set is baseline ReFT: the same loop, with rho = 1 exactly. Everything a resumed run needs to
continue bit for bit (weights, optimiser, scheduler, data cursor, skip sampler and controller, RNG) is in the
checkpoint, and per-layer skip costs a run measured for itself are in its reports/; sampling seeds are
derived from (seed, step, prompt group), so they need no state.

Under torchrun (`distributed`, `parallel`) every rank runs this same loop on its own contiguous block of the
step's prompt groups: the data stream, skip sampler and controller are replicated (same seeds, same global
inputs, so the same decisions), each group samples from its own seed (so N ranks sample what one process
samples), advantages come from the whole batch's rewards, the loss divides by the whole batch's counts and
gradients are summed over ranks, so an update equals the single-process one up to float summation order.
Statistics cover the whole batch; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nested_reft import distributed, lora
from nested_reft.calibrate import probe_layer_costs
from nested_reft.data import Example, load_examples
from nested_reft.distributed import World
from nested_reft.errors import UserError
from nested_reft.evaluate import evaluate_examples
from nested_reft.health import TrainingHealth
from nested_reft.models import base_model_path, load_model, peak_memory_mb
from nested_reft.objective import (
    CorrectionConfig,
    LossConfig,
    completion_log_probs,
    correction_stats,
    correction_weights,
    group_advantages,
    policy_loss,
)
from nested_reft.parallel import Parallel, no_parallel, trainable_parameters
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import Recipe
from nested_reft.rewards import math_reward
from nested_reft.rollout import Rollout, generate
from nested_reft.rundir import RunDir, atomic_write_text, resolve_model_path
from nested_reft.sampling import SamplingParams
from nested_reft.skip_control import LayerCosts
from nested_reft.skipping import SkipSampler, decoder_layers

TRAINER_STATE = "trainer_state.pt"
LAYER_COSTS = "layer_costs.json"  # in reports/: the per-layer skip costs a run measured for itself
PROBE_ROWS = 4  # completions (one per prompt) the per-layer cost probe runs on: ~1 forward per eligible layer

# reward_fn(completion_text, completion_token_ids, example) -> (reward, correct). The default is the math reward;
# tests plug in synthetic tasks a tiny random model can learn.
RewardFn = Callable[[str, list[int], Example], tuple[float, bool]]
# reference() -> a context in which the yielded model is the frozen KL reference (objective.beta > 0).
Reference = Callable[[], AbstractContextManager]


def sampling_seed(seed: int, step: int, group: int) -> int:
    """The seed of prompt group `group` (its index in the step's whole batch) at `step`: a function of neither the
    rank nor the batch around it, so any number of ranks samples the same completions."""
    return ((seed * 1_000_003 + step) * 1_000_003 + group) % 2**63


class PromptStream:
    """Endless, seeded stream of training examples, reshuffled each epoch.

    The order of epoch e is a pure function of (seed, e), so the cursor (epoch, index) is the whole state and a
    run resumed at any step, an epoch boundary included, sees exactly the prompts an uninterrupted run would.
    """

    def __init__(self, examples: list[Example], seed: int):
        if not examples:
            raise UserError("data.train: no training examples")
        self.examples, self.seed = examples, seed
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[Example]:
        batch = []
        order = self._order(self.epoch)
        while len(batch) < n:
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            batch.append(self.examples[order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimiser step s: linear warmup, then constant or cosine to 0."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class ScoredRollout:
    """A rollout with its rewards: what the update consumes."""

    rollout: Rollout
    rewards: torch.Tensor  # [B]
    correct: list[bool]
    texts: list[str]
    advantages: torch.Tensor  # [B]


def math_reward_fn(recipe: Recipe) -> RewardFn:
    cfg = recipe.reward

    def reward(text: str, _ids: list[int], example: Example) -> tuple[float, bool]:
        result = math_reward(
            text, example.answer, last_number_fallback=cfg.last_number_fallback,
            format_weight=cfg.format_weight, timeout_s=cfg.timeout_s,
        )
        return result.reward, result.reason == "correct"

    return reward


def score(rollout: Rollout, examples: list[Example], tokenizer, reward_fn: RewardFn, group_size: int,
          scale_rewards: str, world: World = World()) -> ScoredRollout:
    """Decode and score every completion; row i belongs to prompt i // group_size. Advantages are computed on
    the whole batch's rewards (gathered from every rank: `batch` scaling needs them all), then sliced."""
    ids = rollout.completions()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    scored = [reward_fn(text, row, examples[i // group_size]) for i, (text, row) in enumerate(zip(texts, ids))]
    rewards = torch.tensor([r for r, _ in scored], dtype=torch.float32)
    first = world.rank * len(rewards)
    advantages = group_advantages(world.gather_rows(rewards), group_size, scale_rewards)
    return ScoredRollout(rollout, rewards, [c for _, c in scored], texts, advantages[first : first + len(rewards)])


def optimise(model, reference: Reference | None, optimizer, scheduler, batch: ScoredRollout, recipe: Recipe,
             params: SamplingParams, *, skip_zero_advantage: bool = True, policy: Parallel | None = None
             ) -> dict[str, Any]:
    """`num_iterations` passes of clipped, importance-corrected policy-gradient updates over one batch.

    No update without signal: with beta = 0 every term of a row's loss is multiplied by its advantage, so a
    row with advantage 0 (every row of a group whose rewards are all equal) adds exactly 0 to the loss and
    the gradient. Those rows get no forward and backward pass; the loss still divides by the whole batch's
    sequence and token counts, so it equals computing everything (up to float summation order). A batch
    without any such row changes no weight (`update_skipped`): `optimizer.step()` skips parameters whose
    gradient is None, and runs only to keep the LR schedule on the step count. Rows sampled off-policy still
    need lp_old for the KL and weight statistics (the adaptive skip controller reads `kl_mu_pi`, which must
    stay measurable exactly when a far behavior model earns no reward), so one completion of each silent group
    gets a no-grad forward, about a third of the cost of its forward + backward.

    lp_old (full model, no grad, before the update) of a trained row equals the detached lp of the first pass
    (nothing has been updated yet), which saves a forward unless there are several passes. With the empty
    skip set the behavior policy *is* pi_old, so lp_b is taken to be lp_old: the sampler's KV-cached log-probs
    differ from a full forward only by float rounding (~1e-7), and baseline ReFT must be exactly on-policy
    (rho = 1) rather than carry that noise into every correction.

    Data-parallel (`policy` spans several ranks; `batch` is this rank's part): the loss divides by the global
    counts, gradients are summed over ranks, and the update is skipped only when no rank has a row with signal.
    The passes without gradients run inside `policy.gathered()` (no collectives: ranks may run different
    numbers of them); the gradient passes are padded to the same count on every rank when sharded.
    """
    policy = policy or no_parallel(model)
    world = policy.world
    obj, mb = recipe.objective, recipe.train.micro_batch_size
    r = batch.rollout
    device = r.completion_ids.device
    input_ids, attention = r.sequences()
    mask = r.completion_mask
    n_seq, n_tok = (int(n) for n in world.sum(input_ids.shape[0], int(mask.sum())))  # the whole batch's
    width = r.prompt_ids.shape[1]
    correction = CorrectionConfig(kind=obj.correction, threshold=obj.is_threshold, mask_low=obj.mask_low,
                                  mask_high=obj.mask_high, retrace_lambda=obj.retrace_lambda)
    loss_cfg = LossConfig(loss_type=obj.loss_type, epsilon=obj.epsilon, epsilon_high=obj.epsilon_high,
                          beta=obj.beta, max_completion_length=recipe.rollout.max_completion_length)
    advantages = batch.advantages.to(device)
    off_policy = bool(r.skipped_layers)
    trained = advantages != 0 if skip_zero_advantage and obj.beta == 0 else torch.ones_like(advantages, dtype=torch.bool)
    train_rows = trained.nonzero().squeeze(1)
    # Off-policy, lp_old is also measured on the first completion of each silent group: enough rows for the KL
    # and weight statistics when few groups carry signal, at a fraction of the cost of measuring them all.
    silent = ~trained & (torch.arange(len(trained), device=device) % recipe.rollout.num_generations == 0)
    measure_rows = silent.nonzero().squeeze(1) if off_policy else train_rows[:0]

    def micro_batches(rows: torch.Tensor) -> list[torch.Tensor]:
        return list(rows.split(mb)) if len(rows) else []

    def log_probs(m, rows: torch.Tensor) -> torch.Tensor:  # no grad, inside policy.gathered()
        return completion_log_probs(m, input_ids[rows], attention[rows], width, params, obj.logprob_chunk_size)

    lp_old = torch.zeros(mask.shape, dtype=torch.float32, device=device)  # filled for every row that is used
    with torch.no_grad(), policy.gathered():
        for rows in micro_batches(measure_rows if obj.num_iterations == 1 else torch.cat([measure_rows, train_rows])):
            lp_old[rows] = log_probs(model, rows)
        lp_ref = None
        if reference is not None:
            lp_ref = torch.zeros_like(lp_old)
            with reference() as ref_model:
                for rows in micro_batches(train_rows):
                    lp_ref[rows] = log_probs(ref_model, rows)

    trainable = trainable_parameters(model)
    signal = world.sum(len(train_rows))[0] > 0  # some rank has a row with signal: every rank updates
    model.train()
    loss_sum, clip_sum, kl_sum, grad_norm = 0.0, 0.0, 0.0, 0.0
    for iteration in range(obj.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, clip_sum, kl_sum = 0.0, 0.0, 0.0
        for rows in policy.pad(micro_batches(train_rows)):
            if rows is None:  # sharded, with fewer micro-batches than another rank: join its collectives, add 0
                lp = policy.log_probs(input_ids[:1], attention[:1], width, params, obj.logprob_chunk_size)
                lp.sum().mul(0.0).backward()
                continue
            lp = policy.log_probs(input_ids[rows], attention[rows], width, params, obj.logprob_chunk_size)
            if obj.num_iterations == 1:
                lp_old[rows] = lp.detach()
            old = lp_old[rows]
            w = correction_weights(old, r.behavior_log_probs[rows] if off_policy else old, mask[rows], correction)
            loss, info = policy_loss(lp, old, advantages[rows], w, mask[rows], loss_cfg,
                                     lp_ref=None if lp_ref is None else lp_ref[rows],
                                     num_sequences=n_seq, num_tokens=n_tok)
            loss.backward()
            loss_sum += loss.item()
            clip_sum += info["clip_frac"] * int(mask[rows].sum())
            kl_sum += info.get("kl", 0.0) * int(mask[rows].sum())
        if signal:
            policy.sync_gradients(trainable)
            grad_norm = policy.clip_grad_norm_(trainable, recipe.optimizer.max_grad_norm)
        optimizer.step()
        scheduler.step()
    model.eval()

    # Statistics describe the batch as sampled: on-policy every row has weight 1 and KL 0 exactly; off-policy
    # they cover the rows whose lp_old was computed.
    lp_b = r.behavior_log_probs if off_policy else lp_old
    known = mask & (trained | silent)[:, None] if off_policy else mask
    w = correction_weights(lp_old, lp_b, known, correction)
    if world.distributed:  # every rank's known tokens, in the order of a single process's rows
        w, lp_old, lp_b = (world.gather_rows(t[known]) for t in (w, lp_old, lp_b))
        known = torch.ones_like(w, dtype=torch.bool)
    stats = correction_stats(w, lp_old, lp_b, known)
    loss_sum, clip_sum, kl_sum, trained_sequences = world.sum(loss_sum, clip_sum, kl_sum, len(train_rows))
    stats.update(loss=loss_sum, grad_norm=grad_norm, clip_frac=clip_sum / max(1, n_tok),
                 trained_sequences=int(trained_sequences), update_skipped=not signal)
    if reference is not None:
        stats["kl_ref"] = kl_sum / max(1, n_tok)  # mean k3 KL to the frozen reference
    return stats


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, reward_fn: RewardFn | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> RunDir:
    """Run (or resume) the recipe's training; returns its run directory. `on_step` receives each metrics row.

    Under torchrun every rank calls this with the same arguments and receives the same (global) rows. A rank
    that fails leaves the process group on its way out, so its peers stop too (`distributed.PeerFailure`).
    """
    # The world size is checked before anything else, so that a bad split is the same error on every rank.
    distributed.check_world(recipe.train.prompts_per_step, distributed.env_world_size())
    world = distributed.init(recipe.model.device, recipe.train.distributed_timeout_s)
    try:
        return _train(recipe, world, resume=resume, overwrite=overwrite, reward_fn=reward_fn, on_step=on_step)
    except UserError as exc:
        if world.distributed and not isinstance(exc, distributed.PeerFailure):
            raise UserError(f"rank {world.rank}/{world.size}: {exc}") from None
        raise
    except Exception as exc:
        if world.distributed and distributed.is_peer_failure(exc):
            raise distributed.peer_failure(world, exc) from None
        raise
    finally:
        distributed.teardown(world)


def _train(recipe: Recipe, world: World, *, resume: bool, overwrite: bool, reward_fn: RewardFn | None,
           on_step: Callable[[dict[str, Any]], None] | None) -> RunDir:
    # Data first: bad data fails in a second, before a model is loaded or a run directory is touched.
    data = recipe.data
    stream = PromptStream(load_examples(data.train, split=data.train_split, limit=data.train_limit,
                                        seed=recipe.run.seed), recipe.run.seed)
    eval_examples = (load_examples(data.eval, split=data.eval_split, limit=data.eval_limit, seed=recipe.run.seed)
                     if data.eval and recipe.train.eval_every else [])
    # Rank 0 alone touches the run directory (every rank sees it: resuming reads its checkpoint).
    run = world.on_main(lambda: RunDir.open(Path(recipe.run.output_dir), recipe.to_yaml(), resume=resume,
                                            overwrite=overwrite))
    checkpoint = run.latest_checkpoint() if resume else None
    torch.manual_seed(recipe.run.seed)

    source = resolve_model_path(recipe.model.name_or_path)
    where = str(world.device) if world.distributed else recipe.model.device
    adapter_cfg = recipe.model.lora  # LoRA: the base loads from the source; a checkpoint holds only adapters
    model, tokenizer = load_model(str(source if adapter_cfg else checkpoint or source), dtype=recipe.model.dtype,
                                  device=where)
    adapters = lora.attach(model, adapter_cfg, base_model_path(source), checkpoint) if adapter_cfg else None
    reference: Reference | None = None
    if recipe.objective.beta > 0:  # the frozen starting policy: the base without adapters, or a loaded copy
        if adapters is not None:
            reference = adapters.reference
        else:
            ref_model, _ = load_model(source, dtype=recipe.model.dtype, device=where)
            ref_model.requires_grad_(False)
            reference = lambda: nullcontext(ref_model)  # noqa: E731
    policy = Parallel(model, world, recipe.train.parallel)
    device = next(model.parameters()).device

    sampler = SkipSampler.from_config(recipe.skipping, len(decoder_layers(model)), recipe.run.seed)
    costs_path = run.reports_dir / LAYER_COSTS
    if resume and sampler.needs_costs and costs_path.is_file():  # measured by this run before it stopped
        sampler.set_costs(LayerCosts.read(costs_path, sampler.num_layers))
    health = TrainingHealth(recipe)
    reward_fn = reward_fn or math_reward_fn(recipe)
    opt = recipe.optimizer
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=opt.lr, betas=opt.betas,
                                  weight_decay=opt.weight_decay)
    total_updates = recipe.train.steps * recipe.objective.num_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt.warmup_steps, total_updates, opt.schedule))
    params = SamplingParams(recipe.rollout.temperature, recipe.rollout.top_k, recipe.rollout.top_p)
    eos = eos_token_ids(tokenizer, model.generation_config)
    group_size = recipe.rollout.num_generations

    start, elapsed_before = 0, 0.0
    if checkpoint is not None:
        state = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
        policy.load_optimizer_state_dict(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(_own_rng_state(state["torch_rng"], world))
        start = state["step"]

        def truncate() -> float:
            run.truncate_metrics(after_step=start)
            return max((row.get("time_elapsed", 0.0) for row in run.read_metrics()), default=0.0)

        elapsed_before = world.on_main(truncate)

    def save(step: int) -> None:
        # Gathered on every rank (collectives when sharded), written by rank 0.
        model_state, optimizer_state = policy.model_state_dict(), policy.optimizer_state_dict(optimizer)
        rng = world.gather_objects(torch.get_rng_state()) if world.distributed else torch.get_rng_state()

        def write(folder: Path) -> None:
            if adapters is not None:
                adapters.save(folder, model_state)
            else:
                model.save_pretrained(folder, state_dict=model_state, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "data": stream.state_dict(), "sampler": sampler.state_dict(),
                        "torch_rng": rng}, folder / TRAINER_STATE)

        if world.is_main:
            run.save_checkpoint(step, write, keep_last=recipe.train.keep_last)

    clock = time.perf_counter() - elapsed_before
    for step in range(start + 1, recipe.train.steps + 1):
        first_group, examples = world.shard(stream.next(recipe.train.prompts_per_step))  # this rank's groups
        ratio, skip = sampler.sample()
        t0 = time.perf_counter()
        with policy.gathered(skip):  # sharded: the kept layers are gathered once for the whole rollout
            rollout = generate(
                model, encode_prompts(tokenizer, [e.question for e in examples], data),
                num_generations=group_size, max_new_tokens=recipe.rollout.max_completion_length,
                params=params, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, skip=skip,
                seeds=[sampling_seed(recipe.run.seed, step, first_group + g) for g in range(len(examples))],
            )
            t1 = time.perf_counter()
            if sampler.needs_costs:  # once per run: per-layer skip costs, measured on this full-model batch
                costs = measure_layer_costs(model, rollout, world, first_group, group_size, sampler.eligible, params)
                if world.is_main:
                    costs.write(costs_path)
                sampler.set_costs(costs)
        t2 = time.perf_counter()
        batch = score(rollout, examples, tokenizer, reward_fn, group_size, recipe.objective.scale_rewards, world)
        t3 = time.perf_counter()
        stats = optimise(model, reference, optimizer, scheduler, batch, recipe, params, policy=policy)
        control = sampler.observe(skip, stats["kl_mu_pi"])  # the global KL: every rank's controller agrees
        t4 = time.perf_counter()

        # The slowest rank sets the pace; tokens/sec is the whole batch's tokens over that time.
        times = world.max(t1 - t0, t2 - t1, t3 - t2, t4 - t3, rollout.prefill_seconds + rollout.decode_seconds,
                          peak_memory_mb(device))
        tokens = world.sum(rollout.tokens_generated)[0]
        row: dict[str, Any] = {
            "step": step,
            **batch_metrics(batch, group_size, world),
            "skip_ratio": ratio,
            "skipped_layers": list(skip),
            **stats,
            **control,
            "lr": scheduler.get_last_lr()[0],
            "time_generate": times[0],
            "time_probe": times[1],
            "time_score": times[2],
            "time_train": times[3],
            "rollout_tokens_per_sec": tokens / times[4] if times[4] > 0 else 0.0,
            "peak_memory_mb": times[5],
        }
        if eval_examples and recipe.train.eval_every and step % recipe.train.eval_every == 0:
            with policy.gathered():  # rank 0 evaluates the whole set while the others wait
                report = world.on_main(lambda: evaluate_examples(
                    model, tokenizer, eval_examples, data, max_new_tokens=recipe.rollout.max_completion_length,
                    reward_cfg=recipe.reward, seed=recipe.run.seed))
            row["eval_pass@1"] = report.metrics["pass@1"]
            if world.is_main:
                run.write_report(f"eval-step-{step}", report.to_dict(model=str(source), data=data.eval))
        if warning := health.check(row):
            row["warning"] = warning
        row["time_elapsed"] = time.perf_counter() - clock
        if world.is_main:
            run.log_metrics(row)
        if recipe.train.log_rollouts_every and step % recipe.train.log_rollouts_every == 0:
            save_rollouts(run, step, batch, examples, group_size, world)
        if step % recipe.train.save_every == 0 or step == recipe.train.steps:
            save(step)
        if on_step:
            on_step(row)
    world.barrier()  # every rank returns once rank 0 has written the last checkpoint
    return run


def _own_rng_state(saved: torch.Tensor | list[torch.Tensor], world: World) -> torch.Tensor:
    """This rank's saved torch RNG state (a distributed run saves one per rank; resumed with another number
    of ranks, every rank takes rank 0's: only dropout draws from it)."""
    if isinstance(saved, torch.Tensor):
        return saved
    return saved[world.rank] if len(saved) == world.size else saved[0]


def measure_layer_costs(model, rollout: Rollout, world: World, first_group: int, group_size: int,
                        eligible: list[int], params: SamplingParams) -> LayerCosts:
    """Per-layer skip costs on the first completion of each of the step's first PROBE_ROWS prompt groups, as a
    single process measures them: each rank probes the groups it holds, and the per-layer means are combined
    weighted by token counts, so every rank (and its adaptive controller) gets the same costs."""
    groups = range(first_group, first_group + len(rollout.prompt_ids) // group_size)
    rows = [(g - first_group) * group_size for g in groups if g < PROBE_ROWS]
    if not world.distributed:
        return probe_layer_costs(model, rollout, rows, eligible, params)
    costs = probe_layer_costs(model, rollout, rows, eligible, params) if rows else None
    n = int(rollout.completion_mask[rows].sum()) if rows else 0
    sums = world.sum(n, *(costs.kl[i] * n if costs else 0.0 for i in eligible))
    return LayerCosts({i: total / sums[0] for i, total in zip(eligible, sums[1:])}, len(decoder_layers(model)))


def batch_metrics(batch: ScoredRollout, group_size: int, world: World) -> dict[str, float]:
    """Reward, accuracy, completion length and no-signal fraction of the whole batch (every rank's rows)."""
    rewards = world.gather_rows(batch.rewards)
    correct = world.gather_rows(torch.tensor(batch.correct, dtype=torch.float64))
    lengths = world.gather_rows(batch.rollout.completion_mask.sum(1).float())
    groups = rewards.view(-1, group_size)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "accuracy": correct.mean().item(),
        "completion_length": lengths.mean().item(),
        "frac_reward_zero_std": (groups.std(1, unbiased=False) == 0).float().mean().item(),
    }


def save_rollouts(run: RunDir, step: int, batch: ScoredRollout, examples: list[Example], group_size: int,
                  world: World = World()) -> None:
    """`rollouts/step-N.jsonl`: each sampled completion with its prompt, gold answer, reward and advantage
    (every rank's, in batch order; written by rank 0)."""
    lines = []
    for i, text in enumerate(batch.texts):
        ex = examples[i // group_size]
        lines.append(json.dumps({"id": ex.id, "question": ex.question, "gold": ex.answer, "completion": text,
                                 "reward": batch.rewards[i].item(), "correct": batch.correct[i],
                                 "advantage": batch.advantages[i].item()}, ensure_ascii=False))
    lines = [line for part in world.gather_objects(lines) for line in part]
    if world.is_main:
        atomic_write_text(run.rollouts_dir / f"step-{step}.jsonl", "\n".join(lines) + "\n")
