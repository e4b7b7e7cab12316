"""The policy update: `num_iterations` passes of clipped, importance-corrected policy-gradient steps over one
scored batch, and the learning-rate schedule they follow.

Per token, the loss is the PPO-clipped surrogate weighted by an off-policy correction w(lp_old, lp_b) for having
sampled from the layer-skipped mu_S rather than pi_theta (`objective`). `optimise` reads as the update:

    plan the rows (`UpdatePlan`) -> lp_old and lp_ref without gradients -> per pass: micro-batched backward
    passes, then one optimiser step -> statistics of the batch

Five things make this more than a loop over micro-batches:

- **No update without signal.** With beta = 0 every term of a row's loss is multiplied by its advantage, so a row
  with advantage 0 (every row of a group whose rewards are all equal) adds exactly 0 to the loss and gradient.
  Those rows get no forward and backward pass; the loss still divides by the whole batch's sequence and token
  counts, so it equals computing everything (up to float summation order). A batch without any such row changes
  no weight (`update_skipped`). Off-policy, one completion of each silent group still gets a no-grad forward for
  lp_old, and stands for its group's G rows in the statistics: the KL and weight statistics (which the adaptive
  skip controller reads) must stay measurable, and unbiased, exactly when a behavior model that is too far away
  earns no reward.
- **Precision.** `masters` (`precision.MasterWeights`) receives the gradients, is clipped and stepped in float32,
  and is written back into the low-precision model. A step whose loss or gradient norm is not finite changes
  nothing (`nonfinite_updates`); under fp16 the loss scaler handles overflow itself.
- **Data parallelism.** `policy` (`parallel.Parallel`) spans the ranks: the loss divides by the global counts,
  gradients are summed over ranks, and the update is skipped only when no rank has a row with signal. Passes
  without gradients run inside `policy.gathered()`; sharded gradient passes are padded to the same count on
  every rank.
- **No host sync per micro-batch.** Losses, clip counts and KL sums accumulate on the device and are read once
  per pass, so a GPU never waits for the host between micro-batches.
- **No padding computed.** A batch is [left-padded prompts | right-padded completions], as wide as its longest
  prompt plus its longest completion. Rows are grouped into micro-batches by length, longest first, and each
  micro-batch is trimmed to its own widest prompt and longest completion (`MicroBatch`): bucketing. Packing
  rows into one sequence would leave no padding at all, but attention then spans the whole packed length under
  a block-diagonal mask: on the quickstart's batches (benchmarks/update_padding.py) packing measured 1.33x slower
  than full width, bucketing as fast where there was little to trim, and faster the shorter completions get.
  Trimming changes no row's values: positions come from the attention mask, and the dropped columns are masked
  keys or right padding that causal attention never reads.

lp_old (the policy before the update, no grad) of a trained row equals the detached lp of the first pass, which
saves a forward unless there are several passes. With the empty skip set the behavior policy *is* pi_old, so lp_b
is taken to be lp_old: baseline ReFT is exactly on-policy (rho = 1) rather than carrying the sampler's rounding
into every correction. What that substitution hides is logged as `sampler_lp_abs_diff` / `sampler_lp_bias` (the
KV-cached sampler against the full forward: ~1e-6 in float32, up to a few 1e-2 nats per token in bf16, exactly 0
on CPUs whose bf16 kernels happen to agree).

A stop request (`stop`, see `stopping.StopCheck`) makes a rank skip its remaining micro-batches; before the
optimiser step the ranks agree, and if any asked, the update is abandoned with no weight changed
(`stopping.StepAbandoned`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from nested_reft.guards import finite
from nested_reft.objective import (
    CorrectionConfig,
    LossConfig,
    completion_log_probs,
    correction_stats,
    correction_weights,
    policy_loss,
)
from nested_reft.parallel import Parallel, no_parallel
from nested_reft.precision import MasterWeights
from nested_reft.recipe import Recipe
from nested_reft.sampling import SamplingParams
from nested_reft.scoring import ScoredRollout
from nested_reft.stopping import StopCheck

# reference() -> a context in which the yielded model is the frozen KL reference (objective.beta > 0).
Reference = Callable[[], AbstractContextManager]


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


def optimizer_and_schedule(params, recipe: Recipe) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The run's AdamW over `params` (the master weights) with the recipe's settings, and its learning-rate schedule
    over every optimiser step of the run (`train.steps` x `objective.num_iterations`)."""
    opt = recipe.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    total_updates = recipe.train.steps * recipe.objective.num_iterations
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt.warmup_steps, total_updates,
                                                                             opt.schedule))


@dataclass
class MicroBatch:
    """Rows that run one forward (and backward) together, and the columns they need."""

    rows: torch.Tensor  # indices into the batch, on its device
    left: int  # leading columns that are prompt padding in every one of these rows
    width: int  # completion columns up to the longest completion among them


@dataclass
class UpdatePlan:
    """Which rows of this rank's batch the update trains and measures, and the global counts the loss divides by."""

    input_ids: torch.Tensor  # [B, P + T] prompt + completion
    attention: torch.Tensor  # [B, P + T]
    prompt_width: int
    mask: torch.Tensor  # [B, T] completion tokens
    advantages: torch.Tensor  # [B]
    sampler_log_probs: torch.Tensor  # [B, T] what the sampler recorded: lp_b off-policy
    on_policy: bool  # the empty skip set: lp_b := lp_old
    train_rows: torch.Tensor  # rows with signal: forward and backward
    measure_rows: torch.Tensor  # silent rows whose lp_old is still measured (one per group, off-policy)
    row_weight: torch.Tensor  # [B] how many rows of the batch each row stands for in the statistics
    num_sequences: int  # the whole batch's (every rank's)
    num_tokens: int
    signal: bool  # some rank has a row with signal
    prompt_lengths: list[int]  # each row's, on the host
    completion_lengths: list[int]

    @classmethod
    def of(cls, batch: ScoredRollout, group_size: int, world, *, skip_zero_advantage: bool, beta: float) -> UpdatePlan:
        r = batch.rollout
        input_ids, attention = r.sequences()
        mask = r.completion_mask
        device = mask.device
        advantages = batch.advantages.to(device)
        off_policy = bool(r.skipped_layers)
        trained = advantages != 0 if skip_zero_advantage and beta == 0 else torch.ones_like(advantages, dtype=torch.bool)
        first_of_group = torch.arange(len(trained), device=device) % group_size == 0
        silent = ~trained & first_of_group if off_policy else torch.zeros_like(trained)
        # A silent group's measured row stands for all G of its rows: the statistics are the batch's as sampled.
        row_weight = torch.where(silent, float(group_size), trained.float())
        train_rows, measure_rows = trained.nonzero().squeeze(1), silent.nonzero().squeeze(1)
        prompt_lengths, completion_lengths = torch.stack([r.prompt_mask.sum(1), mask.sum(1)]).tolist()
        n_seq, n_tok, n_train = world.sum(input_ids.shape[0], sum(completion_lengths), len(train_rows))
        return cls(input_ids, attention, r.prompt_ids.shape[1], mask, advantages, r.behavior_log_probs,
                   not off_policy, train_rows, measure_rows, row_weight, int(n_seq), int(n_tok), n_train > 0,
                   prompt_lengths, completion_lengths)

    def micro_batches(self, rows: torch.Tensor, size: int) -> list[MicroBatch]:
        """`rows` in micro-batches of at most `size`, longest rows first, so that rows of similar length share one
        (stable: rows of equal length keep their order). One host read of `rows` and one copy back per call,
        none per micro-batch."""
        order = sorted(rows.tolist(), key=lambda row: -(self.prompt_lengths[row] + self.completion_lengths[row]))
        ordered = torch.tensor(order, dtype=torch.long, device=rows.device)
        return [MicroBatch(ordered[start : start + size],
                           left=self.prompt_width - max(self.prompt_lengths[row] for row in chunk),
                           width=max(1, max(self.completion_lengths[row] for row in chunk)))
                for start in range(0, len(order), size) if (chunk := order[start : start + size])]

    def log_probs(self, compute: Callable[..., torch.Tensor], batch: MicroBatch, params: SamplingParams,
                  chunk_size: int) -> torch.Tensor:
        """`compute(input_ids, attention_mask, prompt_len, params, chunk_size)` (completion log-probs) on the
        micro-batch's rows and columns only; [rows, T] like the batch, 0 past the micro-batch's longest
        completion (right padding of every one of its rows)."""
        end = self.prompt_width + batch.width
        lp = compute(self.input_ids[batch.rows, batch.left : end], self.attention[batch.rows, batch.left : end],
                     self.prompt_width - batch.left, params, chunk_size)
        return torch.nn.functional.pad(lp, (0, self.mask.shape[1] - batch.width))


def optimise(model, reference: Reference | None, optimizer, scheduler, batch: ScoredRollout, recipe: Recipe,
             params: SamplingParams, masters: MasterWeights | None = None, *, policy: Parallel | None = None,
             skip_zero_advantage: bool = True, stop: StopCheck | None = None) -> dict[str, Any]:
    """Update the policy on this rank's part of a scored batch (see the module docstring); returns the metrics
    of the whole batch: correction statistics, loss, grad norm, clip fraction, trained rows, skipped updates. The
    lp_old it computed is recorded on the batch (`old_log_probs`).
    Raises `stopping.StepAbandoned`, with no weight changed, when a stop was requested on any rank."""
    masters = masters or MasterWeights(model, "no")
    policy = policy or no_parallel(model)
    obj = recipe.objective
    plan = UpdatePlan.of(batch, recipe.rollout.num_generations, policy.world,
                         skip_zero_advantage=skip_zero_advantage, beta=obj.beta)
    correction = CorrectionConfig(kind=obj.correction, threshold=obj.is_threshold, mask_low=obj.mask_low,
                                  mask_high=obj.mask_high, retrace_lambda=obj.retrace_lambda)
    loss_cfg = LossConfig(loss_type=obj.loss_type, epsilon=obj.epsilon, epsilon_high=obj.epsilon_high,
                          beta=obj.beta, max_completion_length=recipe.rollout.max_completion_length)
    lp_old, lp_ref = _log_probs_without_grad(model, reference, policy, plan, params, recipe)

    model.train()
    sums, grad_norm, nonfinite = torch.zeros(3), 0.0, 0
    for _ in range(obj.num_iterations):
        sums = _backward_passes(policy, masters, optimizer, plan, lp_old, lp_ref, params, recipe, correction,
                                loss_cfg, stop)
        if stop is not None:
            stop.check()  # every rank agrees before any weight changes: abandon the step, or go on together
        if plan.signal:
            policy.sync_gradients(masters.params)
            grad_norm = masters.clip_grad_norm_(recipe.optimizer.max_grad_norm, clip=policy.clip_grad_norm_)
        # The same decision on every rank (they share the summed gradients); under fp16 an overflowing gradient
        # is the loss scaler's business (it skips the step and backs off).
        if finite(policy.world.sum(sums[0].item())[0]) and (finite(grad_norm)
                                                            or masters.compute_dtype == torch.float16):
            masters.step(optimizer)  # skips parameters without a gradient: no signal, no change
        else:
            optimizer.zero_grad(set_to_none=True)
            nonfinite += 1
        scheduler.step()
    model.eval()
    computed = plan.row_weight > 0  # trained rows, and the measured silent ones
    batch.old_log_probs = lp_old.masked_fill(~computed[:, None], math.nan)
    return _statistics(plan, lp_old, sums, correction, policy.world, reference is not None) | {
        "grad_norm": grad_norm, "update_skipped": not plan.signal, "nonfinite_updates": nonfinite}


def _log_probs_without_grad(model, reference: Reference | None, policy: Parallel, plan: UpdatePlan,
                            params: SamplingParams, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lp_old, lp_ref) [B, T] float32 for the rows that need them before any gradient pass: the measured silent
    rows always, the trained rows too when there are several passes (with one, the first pass's detached lp is
    lp_old), and lp_ref of the trained rows when beta > 0. Other rows stay 0."""
    obj, mb = recipe.objective, recipe.train.micro_batch_size
    lp_old = torch.zeros(plan.mask.shape, dtype=torch.float32, device=plan.mask.device)
    lp_ref = None
    rows = plan.measure_rows if obj.num_iterations == 1 else torch.cat([plan.measure_rows, plan.train_rows])
    with torch.no_grad(), policy.gathered():
        for batch in plan.micro_batches(rows, mb):
            lp_old[batch.rows] = plan.log_probs(partial(completion_log_probs, model), batch, params,
                                                obj.logprob_chunk_size)
        if reference is not None:
            lp_ref = torch.zeros_like(lp_old)
            with reference() as ref_model:
                for batch in plan.micro_batches(plan.train_rows, mb):
                    lp_ref[batch.rows] = plan.log_probs(partial(completion_log_probs, ref_model), batch, params,
                                                        obj.logprob_chunk_size)
    return lp_old, lp_ref


def _backward_passes(policy: Parallel, masters: MasterWeights, optimizer, plan: UpdatePlan, lp_old: torch.Tensor,
                     lp_ref: torch.Tensor | None, params: SamplingParams, recipe: Recipe,
                     correction: CorrectionConfig, loss_cfg: LossConfig, stop: StopCheck | None) -> torch.Tensor:
    """One pass of micro-batched forward/backward over the trained rows, gradients accumulated into `masters`;
    returns this rank's [loss, clipped tokens, k3 KL sum] as one device tensor (read by the caller, once).
    With one pass, fills lp_old of the trained rows from the detached lp."""
    obj = recipe.objective
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(3, dtype=torch.float32, device=plan.mask.device)
    for batch in policy.pad(plan.micro_batches(plan.train_rows, recipe.train.micro_batch_size)):
        if batch is None:  # sharded, with fewer micro-batches than another rank: join its collectives, add 0
            dummy = plan.train_rows.new_zeros(1)
            masters.backward(policy.log_probs(plan.input_ids[dummy], plan.attention[dummy], plan.prompt_width, params,
                                              obj.logprob_chunk_size).sum() * 0.0)
            continue
        if stop is not None and stop.local() and not policy.sharded:  # sharded passes are collectives: go on
            break
        rows = batch.rows
        lp = plan.log_probs(policy.log_probs, batch, params, obj.logprob_chunk_size)
        if obj.num_iterations == 1:
            lp_old[rows] = lp.detach()
        old, mask = lp_old[rows], plan.mask[rows]
        lp_b = old if plan.on_policy else plan.sampler_log_probs[rows]
        w = correction_weights(old, lp_b, mask, correction)
        loss, info = policy_loss(lp, old, plan.advantages[rows], w, mask, loss_cfg,
                                 lp_ref=None if lp_ref is None else lp_ref[rows],
                                 num_sequences=plan.num_sequences, num_tokens=plan.num_tokens)
        masters.backward(loss)
        sums += torch.stack([loss.detach().float(), info["clipped_tokens"], info["kl_sum"]])
    return sums


def _statistics(plan: UpdatePlan, lp_old: torch.Tensor, sums: torch.Tensor, correction: CorrectionConfig, world,
                with_reference: bool) -> dict[str, Any]:
    """The batch's correction statistics (weights, ESS, KL(mu||pi)) and the last pass's loss and clip fraction.

    They describe the batch as sampled: on-policy every row has weight 1 and KL 0 exactly; off-policy they cover
    the rows whose lp_old was computed, a measured silent row standing for its whole group.
    """
    lp_b = lp_old if plan.on_policy else plan.sampler_log_probs
    weight = torch.ones_like(plan.row_weight) if plan.on_policy else plan.row_weight  # on-policy: all exact
    known = plan.mask & (weight > 0)[:, None]
    w = correction_weights(lp_old, lp_b, known, correction)
    counts = weight[:, None].expand_as(known)
    if world.distributed:  # every rank's known tokens, in the order of a single process's rows
        w, lp_old_known, lp_b_known, counts = (world.gather_rows(t[known]) for t in (w, lp_old, lp_b, counts))
        stats = correction_stats(w, lp_old_known, lp_b_known, torch.ones_like(w, dtype=torch.bool), counts)
    else:
        stats = correction_stats(w, lp_old, lp_b, known, counts)
    scalars = [*sums.tolist(), len(plan.train_rows)]
    if plan.on_policy:  # what lp_b := lp_old hid, over the trained rows (where lp_old exists)
        trained = plan.mask & (plan.row_weight > 0)[:, None]
        diff = (plan.sampler_log_probs - lp_old)[trained]
        scalars += torch.stack([diff.abs().sum(), diff.sum()]).tolist() + [diff.numel()]
    totals = world.sum(*scalars)
    loss, clipped, kl_sum, trained_sequences = totals[:4]
    stats.update(loss=loss, clip_frac=clipped / max(1, plan.num_tokens), trained_sequences=int(trained_sequences))
    if plan.on_policy and totals[6]:
        stats.update(sampler_lp_abs_diff=totals[4] / totals[6], sampler_lp_bias=totals[5] / totals[6])
    if with_reference:
        stats["kl_ref"] = kl_sum / max(1, plan.num_tokens)  # mean k3 KL to the frozen reference
    return stats
