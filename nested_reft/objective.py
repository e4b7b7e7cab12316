"""The GRPO / Nested-ReFT objective: log-probs, advantages, off-policy weights and the clipped loss.

Pure tensor functions; the trainer owns the model, the optimiser and logging. Notation (BRIEF §1), per
completion token t: `lp_b` is the behavior (layer-skipped) log-prob recorded at sampling time, `lp_old` the
full model's before the update, `lp` the full model's with grad. Tensors are [B, T] over completion tokens,
with a mask that is True on real tokens and False on right padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch.utils.checkpoint import checkpoint

from nested_reft.errors import UserError
from nested_reft.sampling import SamplingParams, log_probs

CorrectionKind = Literal["none", "is", "token_tis", "seq_tis", "token_mask", "seq_mask", "retrace"]
LossType = Literal["grpo", "dr_grpo", "dapo"]
AdvantageScale = Literal["group", "batch", "none"]


# --- log-probs -------------------------------------------------------------------------------------------


def completion_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    params: SamplingParams,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Float32 log-probs [B, T] of the completion tokens `input_ids[:, prompt_len:]` under `params`' distribution.

    Rows are [left-padded prompt of width P | right-padded completion of width T]. Positions come from the
    attention mask (cumsum - 1, clamped at 0), so a row's log-probs do not depend on its left padding. Values
    at right-padding positions are meaningless; callers mask them.

    Memory: the decoder body runs once; the LM head then runs on at most `chunk_size` token rows at a time,
    so the largest vocabulary-sized tensors are a few [chunk_size, V] float32 buffers, never [B, T, V]. With
    grad enabled each chunk is checkpointed: autograd keeps only the [B*T, H] hidden states and recomputes
    a chunk's logits during backward, so the bound holds in backward too.
    """
    if not 0 < prompt_len < input_ids.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {input_ids.shape[1] - 1}], got {prompt_len}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    predicting = completion_hidden_states(model, input_ids, attention_mask, prompt_len)
    targets = input_ids[:, prompt_len:].reshape(-1)
    chunks = []
    for h, y in zip(predicting.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled():
            chunks.append(checkpoint(_token_log_probs, model.lm_head, h, y, params, use_reentrant=False))
        else:
            chunks.append(_token_log_probs(model.lm_head, h, y, params))
    return torch.cat(chunks).view_as(input_ids[:, prompt_len:])


def completion_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """Final hidden states [B*T, H] of the positions that predict the T completion tokens, row-major.

    Logits of a model with a plain LM head are `model.lm_head` of these; they are returned instead of logits so
    that callers can apply the head in chunks.
    """
    _check_plain_lm_head(model.config)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    # The hidden state at position p predicts token p + 1.
    return hidden[:, prompt_len - 1 : -1].reshape(-1, hidden.shape[-1])


# Config fields of architectures whose forward() transforms the LM head's output; with any of them set,
# lm_head alone would give different logits from the model's own, and every ratio would be silently off.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _check_plain_lm_head(config: object) -> None:
    """Raise unless the model's logits are exactly `lm_head(hidden)`."""
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(f"completion_log_probs supports plain LM heads; model config sets {name}")


def _token_log_probs(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """Log-prob [N] of `targets` [N] given hidden states [N, H]."""
    return log_probs(lm_head(hidden), params).gather(-1, targets[:, None]).squeeze(-1)


# --- advantages ------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: AdvantageScale, eps: float = 1e-4
) -> torch.Tensor:
    """Float32 advantages [N]: reward minus its group's mean, divided by (std + eps).

    Rows [g*G, (g+1)*G) hold the G completions of prompt g. `scale` picks the std: of the group ("group"),
    of the whole batch ("batch") or none at all ("none", Dr.GRPO). The std is the unbiased (N - 1) one, as
    `torch.std` and TRL compute it. A group whose rewards are all equal carries no signal and gets advantage
    exactly 0 (its mean can differ from its members by a rounding error that eps would otherwise amplify).
    """
    if group_size < 2 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"need 1-D rewards in groups of >= 2, got shape {tuple(rewards.shape)}, G={group_size}")
    groups = rewards.float().view(-1, group_size)
    centered = groups - groups.mean(-1, keepdim=True)
    constant = (groups == groups[:, :1]).all(-1, keepdim=True)
    centered = centered.masked_fill(constant, 0.0)
    if scale == "group":
        centered = centered / (groups.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (groups.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be one of {get_args(AdvantageScale)}, got {scale!r}")
    return centered.reshape(-1)


# --- off-policy corrections ------------------------------------------------------------------------------


@dataclass
class CorrectionConfig:
    """Which off-policy weight multiplies each token's loss (BRIEF §1 table) and its thresholds."""

    kind: CorrectionKind = "token_tis"
    threshold: float = 2.0  # C of token_tis / seq_tis (verl's rollout_is_threshold)
    mask_low: float = 0.5  # token_mask / seq_mask keep a ratio in [mask_low, mask_high]
    mask_high: float = 2.0
    retrace_lambda: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in get_args(CorrectionKind):
            raise UserError(f"correction.kind: expected one of {get_args(CorrectionKind)}, found {self.kind!r}")
        if not self.threshold > 0:
            raise UserError(f"correction.threshold: expected a number > 0, found {self.threshold}")
        if not 0 <= self.mask_low <= self.mask_high:
            raise UserError(
                f"correction.mask_low/mask_high: expected 0 <= mask_low <= mask_high, "
                f"found {self.mask_low} and {self.mask_high}"
            )
        if not 0 <= self.retrace_lambda <= 1:
            raise UserError(f"correction.retrace_lambda: expected a number in [0, 1], found {self.retrace_lambda}")


def correction_weights(
    lp_old: torch.Tensor, lp_b: torch.Tensor, mask: torch.Tensor, cfg: CorrectionConfig
) -> torch.Tensor:
    """Detached float32 weights [B, T] per BRIEF §1, with rho_t = exp(lp_old - lp_b); 0 on padding.

    Sequence-level ratios and Retrace traces are sums of log-ratios before any exp, so long sequences cannot
    overflow. When lp_b == lp_old every weight on a valid token is exactly 1 (for retrace: when lambda = 1).
    """
    mask = mask.bool()
    log_rho = torch.where(mask, lp_old.detach().float() - lp_b.detach().float(), 0.0)
    log_w = _log_weights(log_rho, mask, cfg)
    return torch.where(mask, log_w.exp(), 0.0)


def _log_weights(log_rho: torch.Tensor, mask: torch.Tensor, cfg: CorrectionConfig) -> torch.Tensor:
    """Log of the weights on valid tokens (-inf where a token is masked out); padding entries are unused."""
    log_c = math.log(cfg.threshold)
    if cfg.kind == "none":
        return torch.zeros_like(log_rho)
    if cfg.kind == "is":
        return log_rho
    if cfg.kind == "token_tis":
        return log_rho.clamp(max=log_c)
    if cfg.kind == "seq_tis":
        return log_rho.sum(-1, keepdim=True).clamp(max=log_c).expand_as(log_rho)
    if cfg.kind == "token_mask":
        return log_rho.masked_fill(~_within(log_rho, cfg), -math.inf)
    if cfg.kind == "seq_mask":
        log_geo_mean = log_rho.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return torch.where(_within(log_geo_mean, cfg), 0.0, -math.inf).expand_as(log_rho)
    # retrace: log w_t = log min(1, rho_t) + sum over valid s < t of log(lambda * min(1, rho_s)).
    log_trunc = log_rho.clamp(max=0.0)
    log_lambda = math.log(cfg.retrace_lambda) if cfg.retrace_lambda > 0 else -math.inf
    step = torch.where(mask, log_lambda + log_trunc, 0.0)
    before = torch.cat([torch.zeros_like(step[:, :1]), step[:, :-1].cumsum(-1)], dim=-1)
    return log_trunc + before


def _within(log_ratio: torch.Tensor, cfg: CorrectionConfig) -> torch.Tensor:
    """Whether exp(log_ratio) lies in [mask_low, mask_high] (compared as ratios, so the bounds are exact)."""
    ratio = log_ratio.exp()
    return (ratio >= cfg.mask_low) & (ratio <= cfg.mask_high)


def correction_stats(
    w: torch.Tensor, lp_old: torch.Tensor, lp_b: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor | None = None
) -> dict[str, float]:
    """Weight diagnostics over valid tokens, as python floats (one host read).

    `counts` (same shape, default 1) is how many tokens of the batch each token stands for: a measured row that
    represents a whole group of unmeasured ones counts G times. `ess` is (sum c w)^2 / (sum c * sum c w^2), in
    (0, 1] with 1 when every weight is equal; it is 0 when every weight is 0 (no effective sample left).
    `frac_masked` is the fraction of tokens with weight exactly 0. `kl_mu_pi` is the mean of lp_b - lp_old:
    tokens come from mu_S, so this is the plain Monte-Carlo estimate of KL(mu_S || pi_old) = E_mu[log mu - log pi]
    (non-negative in expectation; the brief's "lp_old - lp_b" is its negative).
    """
    mask = mask.bool()
    if not mask.any():
        raise ValueError("correction_stats needs at least one valid token")
    w = w.detach().float()[mask]
    c = torch.ones_like(w) if counts is None else counts.float()[mask]
    n, sum_cw, sum_cw2 = c.sum(), (c * w).sum(), (c * w * w).sum()
    ess = torch.where(sum_cw2 > 0, sum_cw**2 / (n * sum_cw2), 0.0)
    kl = (c * (lp_b.detach().float() - lp_old.detach().float())[mask]).sum() / n
    values = torch.stack([sum_cw / n, w.min(), w.max(), (c * (w == 0)).sum() / n, ess, kl]).tolist()
    return dict(zip(("weight_mean", "weight_min", "weight_max", "frac_masked", "ess", "kl_mu_pi"), values))


# --- the loss --------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """The clipped surrogate's hyper-parameters and how per-token losses aggregate (TRL's names)."""

    loss_type: LossType = "grpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None -> epsilon (symmetric clip)
    beta: float = 0.0  # weight of the k3 KL to the reference model
    max_completion_length: int | None = None  # Dr.GRPO's constant normaliser; None -> T of the batch

    def __post_init__(self) -> None:
        if self.loss_type not in get_args(LossType):
            raise UserError(f"loss.loss_type: expected one of {get_args(LossType)}, found {self.loss_type!r}")
        if not 0 < self.epsilon < 1:
            raise UserError(f"loss.epsilon: expected a number in (0, 1), found {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise UserError(f"loss.epsilon_high: expected a number > 0, found {self.epsilon_high}")
        if not self.beta >= 0:
            raise UserError(f"loss.beta: expected a number >= 0, found {self.beta}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise UserError(
                f"loss.max_completion_length: expected an integer >= 1, found {self.max_completion_length}"
            )


def policy_loss(
    lp: torch.Tensor,
    lp_old: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    lp_ref: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted PPO-clipped loss (scalar, with grad through `lp`) and detached sums for statistics.

    Per token: l_t = w_t * (-min(q A, clip(q, 1 - eps, 1 + eps_high) A) + beta * k3_t), q = exp(lp - lp_old),
    k3_t = exp(lp_ref - lp) - (lp_ref - lp) - 1. The weight covers the KL term too: both are expectations
    under the policy estimated from behavior samples. Aggregation: "grpo" averages each sequence's token-mean
    over `num_sequences`; "dapo" divides the token sum by `num_tokens`; "dr_grpo" divides it by
    `num_sequences * max_completion_length`. For gradient accumulation pass the whole batch's counts: the
    micro-batch losses then sum to the full-batch loss (for dr_grpo with max_completion_length None, only if
    every micro-batch has the same T). The sums cover this call's valid tokens, as 0-dim device tensors (no host
    sync: callers accumulate them over micro-batches and read them once): `clipped_tokens` (tokens whose gradient
    the clip zeroes) and `kl_sum` (sum of k3; 0 when beta = 0).
    """
    mask = mask.bool()
    if cfg.beta > 0 and lp_ref is None:
        raise ValueError("policy_loss: beta > 0 needs lp_ref")
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    # Zero the log-ratio on padding first: garbage there must not reach exp() or the gradient as inf/NaN.
    q = torch.where(mask, lp - lp_old.detach(), 0.0).exp()
    adv = advantages.detach().float()[:, None]
    clipped = q.clamp(1 - cfg.epsilon, 1 + eps_high)
    per_token = -torch.minimum(q * adv, clipped * adv)
    zero_grad_by_clip = ((q < 1 - cfg.epsilon) & (adv < 0)) | ((q > 1 + eps_high) & (adv > 0))
    stats = {"clipped_tokens": (zero_grad_by_clip & mask).sum().float(), "kl_sum": q.new_zeros(())}
    if cfg.beta > 0:
        log_ref_ratio = torch.where(mask, lp_ref.detach() - lp, 0.0)
        k3 = log_ref_ratio.exp() - log_ref_ratio - 1
        per_token = per_token + cfg.beta * k3
        stats["kl_sum"] = torch.where(mask, k3.detach(), 0.0).sum()
    per_token = torch.where(mask, per_token * weights.detach(), 0.0)
    return _aggregate(per_token, mask, cfg, num_sequences, num_tokens), stats


def _aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, cfg: LossConfig, num_sequences: int | None, num_tokens: int | None
) -> torch.Tensor:
    """Reduce masked per-token losses [B, T] to the scalar that `cfg.loss_type` defines."""
    num_sequences = per_token.shape[0] if num_sequences is None else num_sequences
    if cfg.loss_type == "grpo":
        seq_means = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
        return seq_means.sum() / num_sequences
    if cfg.loss_type == "dapo":
        if num_tokens is None:
            return per_token.sum() / mask.sum().clamp(min=1)
        return per_token.sum() / max(num_tokens, 1)
    length = per_token.shape[1] if cfg.max_completion_length is None else cfg.max_completion_length
    return per_token.sum() / (num_sequences * length)
