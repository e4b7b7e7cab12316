"""The skip-robustness term: after each update, train the skip bridges so that the skipped view tracks the policy.

Skipping is a property of the model, and the model can be changed (BRIEF §1). On SmolLM2-135M every layer costs
too much KL to skip; `skip_bridges` gives each skippable layer a tiny stand-in that acts only in the skipped view,
and this term trains them:

    loss = lambda * mean over completion tokens of KL(pi_theta.detach() || mu_S')

on `robustness_rows` rows of the step's batch, every `robustness_every` steps, after the policy's update (so the
teacher is the policy the next rollout targets). S' is the set worth making cheaper: under `adaptive` the one
its controller would try next (its current count + 1, cheapest first), otherwise the step's own skip set. The
gradient reaches the bridges only (the policy's weights get none: its log-probs are bit-identical with and without
the term), and the bridges have their own AdamW. With Adam the scale of a loss does not change its steps, so
lambda > 0 switches the term on and `robustness_lr` sets how fast the bridges move.

What a step measures, for the metrics row and the controller:
- `robust_kl_mu_pi`: the exact KL(mu_S' || pi) per token of the set it trains, over the vocabulary, before this
  step's bridge update: the controller raises to S' when it is within `target_kl` (measured, not predicted from the
  step-1 probe, whose per-layer costs go stale as the bridges learn);
- `robust_loss`: lambda * KL(pi || mu_S');
- `policy_drift`: how far the update moved the full model on these rows, the k3 estimate of KL(pi_old || pi_new)
  from the log-probs of the sampled tokens before (the update computed them) and after (the teacher's forward);
- `time_robust`: its own share of the step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from nested_reft.distributed import World
from nested_reft.objective import completion_hidden_states
from nested_reft.parallel import Parallel
from nested_reft.sampling import SamplingParams, log_probs
from nested_reft.scoring import ScoredRollout
from nested_reft.skip_bridges import SkipBridges
from nested_reft.skipping import skip_layers


class Robustness:
    """The skip bridges of a run, their optimiser, and the step that trains them."""

    def __init__(self, model: torch.nn.Module, skipping: Any, eligible: list[int], world: World):
        """`skipping` is the recipe's skipping section (robustness_weight, _rank, _lr, _rows, _every)."""
        self.weight, self.rows, self.every = (skipping.robustness_weight, skipping.robustness_rows,
                                              skipping.robustness_every)
        self.world = world
        device = next(model.parameters()).device
        eps = getattr(model.config, "rms_norm_eps", 1e-6)
        self.bridges = SkipBridges(model.config.hidden_size, eligible, skipping.robustness_rank, eps).to(device)
        self.optimizer = torch.optim.AdamW(self.bridges.parameters(), lr=skipping.robustness_lr, weight_decay=0.0)

    def due(self, step: int) -> bool:
        return self.weight > 0 and step % self.every == 0

    def step(self, model: torch.nn.Module, batch: ScoredRollout, target: tuple[int, ...], params: SamplingParams,
             policy: Parallel, chunk_size: int) -> dict[str, Any]:
        """Train the bridges of `target` one step on this rank's batch; returns the metrics above (whole batch)."""
        rows = self._rows(batch)
        ids, attention = (t[rows] for t in batch.rollout.sequences())
        mask = batch.rollout.completion_mask[rows].reshape(-1)
        width = batch.rollout.prompt_ids.shape[1]
        with torch.no_grad(), policy.gathered():
            teacher = completion_hidden_states(model, ids, attention, width)[mask]
        with torch.enable_grad(), policy.gathered(target), skip_layers(model, target, self.bridges):
            student = completion_hidden_states(model, ids, attention, width)[mask]
            forward_kl, reverse_kl, new_lp = token_kls(model.lm_head, teacher, student, params, chunk_size,
                                                       batch.rollout.completion_ids[rows].reshape(-1)[mask])
            count = float(mask.sum())
            loss = self.weight * forward_kl / max(count, 1.0)
            grads = torch.autograd.grad(loss, list(self.bridges.parameters()), allow_unused=True) if count else ()
        self._apply(grads)
        drift = self._drift(batch, rows, new_lp)
        totals = self.world.sum(count, forward_kl.item() if count else 0.0, reverse_kl, *drift)
        tokens = max(totals[0], 1.0)
        return {"robust_loss": self.weight * totals[1] / tokens, "robust_kl_mu_pi": totals[2] / tokens,
                "robust_skipped_layers": list(target),
                "policy_drift": totals[3] / totals[4] if totals[4] else 0.0}

    def _rows(self, batch: ScoredRollout) -> torch.Tensor:
        """Up to `rows` rows with completion tokens, those whose pre-update log-probs the update kept first (they
        give the drift)."""
        lengths = batch.rollout.completion_mask.sum(1)
        old = batch.old_log_probs
        known = torch.zeros_like(lengths, dtype=torch.bool) if old is None else ~old.isnan().all(1)
        order = sorted(range(len(lengths)), key=lambda r: (not bool(known[r]), r))
        return torch.tensor([r for r in order if lengths[r] > 0][: self.rows], dtype=torch.long,
                            device=lengths.device)

    def _apply(self, grads) -> None:
        """One AdamW step of the bridges with these gradients, summed over ranks (every rank holds all bridges)."""
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.bridges.parameters(), grads):
            p.grad = torch.zeros_like(p) if g is None else g
        if self.world.distributed:
            for p in self.bridges.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world.size
        self.optimizer.step()

    def _drift(self, batch: ScoredRollout, rows: torch.Tensor, new_lp: torch.Tensor) -> tuple[float, float]:
        """(sum of k3 over the tokens whose pre-update log-prob is known, their count)."""
        if batch.old_log_probs is None:
            return 0.0, 0.0
        mask = batch.rollout.completion_mask[rows].reshape(-1)
        old = batch.old_log_probs[rows].reshape(-1)[mask]
        known = ~old.isnan()
        log_ratio = (new_lp - old)[known].double()
        return (log_ratio.exp() - 1 - log_ratio).sum().item(), float(known.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"bridges": self.bridges.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bridges.load_state_dict(state["bridges"])
        self.optimizer.load_state_dict(state["optimizer"])


def token_kls(lm_head: torch.nn.Module, teacher: torch.Tensor, student: torch.Tensor, params: SamplingParams,
              chunk_size: int, tokens: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(sum of KL(teacher || student) per token, with grad through `student`; sum of KL(student || teacher),
    detached, as a float; the teacher's log-probs of `tokens`) for final hidden states [N, H] of the same tokens,
    under `params`' sampling distribution.

    The LM head runs on `chunk_size` rows at a time, each chunk checkpointed, so no [N, V] tensor exists: the
    largest are a few [chunk_size, V] float32 buffers, in backward too."""
    forward, reverse, token_lp = teacher.new_zeros((), dtype=torch.float32), 0.0, []
    for t, s, y in zip(teacher.split(chunk_size), student.split(chunk_size), tokens.split(chunk_size)):
        with torch.no_grad():
            t_lp = log_probs(lm_head(t), params)
        token_lp.append(t_lp.gather(-1, y[:, None]).squeeze(-1))
        kl, s_reverse = checkpoint(_chunk_kls, lm_head, t_lp, s, params, use_reentrant=False)
        forward = forward + kl
        reverse += float(s_reverse)
    return forward, reverse, torch.cat(token_lp) if token_lp else teacher.new_zeros(0)


def _chunk_kls(lm_head, teacher_lp: torch.Tensor, student_hidden: torch.Tensor, params: SamplingParams):
    s_lp = log_probs(lm_head(student_hidden), params)
    t_p = teacher_lp.exp()
    forward = (t_p * (teacher_lp - s_lp)).sum()
    reverse = (s_lp.exp() * (s_lp - teacher_lp)).sum().detach()
    return forward, reverse

