"""The policy update: `num_iterations` passes of clipped, importance-corrected policy-gradient steps over one
scored batch, and the learning-rate schedule they follow.

Per token, the loss is the PPO-clipped surrogate weighted by an off-policy correction w(lp_old, lp_b) for having
sampled from the layer-skipped mu_S rather than pi_theta (`objective`). Three things make this more than a loop
over micro-batches:

- **No update without signal.** With beta = 0 every term of a row's loss is multiplied by its advantage, so a row
  with advantage 0 (every row of a group whose rewards are all equal) adds exactly 0 to the loss and gradient.
  Those rows get no forward and backward pass; the loss still divides by the whole batch's sequence and token
  counts, so it equals computing everything (up to float summation order). A batch without any such row changes
  no weight (`update_skipped`). Off-policy, one completion of each silent group still gets a no-grad forward for
  lp_old: the KL and weight statistics (which the adaptive skip controller reads) must stay measurable exactly
  when a behavior model that is too far away earns no reward.
- **Precision.** `masters` (`precision.MasterWeights`) receives the gradients, is clipped and stepped in float32,
  and is written back into the low-precision model. A step whose loss or gradient norm is not finite changes
  nothing (`nonfinite_updates`); under fp16 the loss scaler handles overflow itself.
- **Data parallelism.** `policy` (`parallel.Parallel`) spans the ranks: the loss divides by the global counts,
  gradients are summed over ranks, and the update is skipped only when no rank has a row with signal. Passes
  without gradients run inside `policy.gathered()`; sharded gradient passes are padded to the same count on
  every rank.

lp_old (the policy before the update, no grad) of a trained row equals the detached lp of the first pass, which
saves a forward unless there are several passes. With the empty skip set the behavior policy *is* pi_old, so lp_b
is taken to be lp_old: baseline ReFT is exactly on-policy (rho = 1) rather than carrying the sampler's rounding
into every correction. What that substitution hides is logged as `sampler_lp_abs_diff` / `sampler_lp_bias` (the
KV-cached sampler against the full forward: ~1e-6 in float32, a few 1e-2 nats per token in bf16).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
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


def optimise(model, reference: Reference | None, optimizer, scheduler, batch: ScoredRollout, recipe: Recipe,
             params: SamplingParams, masters: MasterWeights | None = None, *, policy: Parallel | None = None,
             skip_zero_advantage: bool = True) -> dict[str, Any]:
    """Update the policy on this rank's part of a scored batch (see the module docstring); returns the metrics
    of the whole batch: correction statistics, loss, grad norm, clip fraction, trained rows, skipped updates."""
    masters = masters or MasterWeights(model, "no")
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
    silent = ~trained & (torch.arange(len(trained), device=device) % recipe.rollout.num_generations == 0)
    measure_rows = silent.nonzero().squeeze(1) if off_policy else train_rows[:0]

    def micro_batches(rows: torch.Tensor) -> list[torch.Tensor]:
        return list(rows.split(mb)) if len(rows) else []

    def log_probs(rows: torch.Tensor, m=None) -> torch.Tensor:
        """With grad: through `policy` (sharded passes are collectives); without: `m` as a plain model (its
        layers already gathered by `policy.gathered()`)."""
        if m is None:
            return policy.log_probs(input_ids[rows], attention[rows], width, params, obj.logprob_chunk_size)
        return completion_log_probs(m, input_ids[rows], attention[rows], width, params, obj.logprob_chunk_size)

    lp_old = torch.zeros(mask.shape, dtype=torch.float32, device=device)  # filled for every row that is used
    lp_ref = None
    with torch.no_grad(), policy.gathered():
        for rows in micro_batches(measure_rows if obj.num_iterations == 1 else torch.cat([measure_rows, train_rows])):
            lp_old[rows] = log_probs(rows, model)
        if reference is not None:
            lp_ref = torch.zeros_like(lp_old)
            with reference() as ref_model:
                for rows in micro_batches(train_rows):
                    lp_ref[rows] = log_probs(rows, ref_model)

    signal = world.sum(len(train_rows))[0] > 0  # some rank has a row with signal: every rank updates
    model.train()
    loss_sum, clip_sum, kl_sum, grad_norm, nonfinite = 0.0, 0.0, 0.0, 0.0, 0
    for _ in range(obj.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, clip_sum, kl_sum = 0.0, 0.0, 0.0
        for rows in policy.pad(micro_batches(train_rows)):
            if rows is None:  # sharded, with fewer micro-batches than another rank: join its collectives, add 0
                masters.backward(log_probs(train_rows.new_zeros(1)).sum() * 0.0)
                continue
            lp = log_probs(rows)
            if obj.num_iterations == 1:
                lp_old[rows] = lp.detach()
            old = lp_old[rows]
            w = correction_weights(old, r.behavior_log_probs[rows] if off_policy else old, mask[rows], correction)
            loss, info = policy_loss(lp, old, advantages[rows], w, mask[rows], loss_cfg,
                                     lp_ref=None if lp_ref is None else lp_ref[rows],
                                     num_sequences=n_seq, num_tokens=n_tok)
            masters.backward(loss)
            loss_sum += loss.item()
            clip_sum += info["clip_frac"] * int(mask[rows].sum())
            kl_sum += info.get("kl", 0.0) * int(mask[rows].sum())
        if signal:
            policy.sync_gradients(masters.params)
            grad_norm = masters.clip_grad_norm_(recipe.optimizer.max_grad_norm, clip=policy.clip_grad_norm_)
        # The same decision on every rank (they share the summed gradients); under fp16 an overflowing gradient
        # is the loss scaler's business (it skips the step and backs off).
        if finite(world.sum(loss_sum)[0]) and (finite(grad_norm) or masters.compute_dtype == torch.float16):
            masters.step(optimizer)  # skips parameters without a gradient: no signal, no change
        else:
            optimizer.zero_grad(set_to_none=True)
            nonfinite += 1
        scheduler.step()
    model.eval()

    # Statistics describe the batch as sampled: on-policy every row has weight 1 and KL 0 exactly; off-policy
    # they cover the rows whose lp_old was computed.
    lp_b = r.behavior_log_probs if off_policy else lp_old
    known = mask & (trained | silent)[:, None] if off_policy else mask
    w = correction_weights(lp_old, lp_b, known, correction)
    if world.distributed:  # every rank's known tokens, in the order of a single process's rows
        w, lp_old_known, lp_b_known = (world.gather_rows(t[known]) for t in (w, lp_old, lp_b))
        stats = correction_stats(w, lp_old_known, lp_b_known, torch.ones_like(w, dtype=torch.bool))
    else:
        stats = correction_stats(w, lp_old, lp_b, known)
    loss_sum, clip_sum, kl_sum, trained_sequences = world.sum(loss_sum, clip_sum, kl_sum, len(train_rows))
    stats.update(loss=loss_sum, grad_norm=grad_norm, clip_frac=clip_sum / max(1, n_tok),
                 trained_sequences=int(trained_sequences), update_skipped=not signal, nonfinite_updates=nonfinite)
    if not off_policy:  # what lp_b := lp_old hid, over the trained rows (where lp_old exists)
        diff = (r.behavior_log_probs - lp_old)[mask & trained[:, None]]
        abs_sum, bias_sum, count = world.sum(diff.abs().sum().item(), diff.sum().item(), diff.numel())
        if count:
            stats.update(sampler_lp_abs_diff=abs_sum / count, sampler_lp_bias=bias_sum / count)
    if reference is not None:
        stats["kl_ref"] = kl_sum / max(1, n_tok)  # mean k3 KL to the frozen reference
    return stats

