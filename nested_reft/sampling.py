"""The sampling distribution, defined once.

The rollout engine samples from it and records the behavior log-probs `lp_b`; the objective recomputes
`lp_old` and `lp` from it. Both go through `log_probs` so that temperature, top-k and top-p are applied
identically on both sides: a mismatch here (TRL #4159) silently biases every importance ratio, and with
the empty skip set the ratio must be exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Logits outside the top-k / top-p support get this value instead of -inf: their probability underflows to 0
# exactly, yet log-probs, ratios and gradients stay finite when the loss evaluates such a token.
MASKED_LOGIT = -1e4
# Inverse-CDF sampling scans the vocabulary in blocks of this many tokens (`inverse_cdf`).
CDF_BLOCK = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How a next token is drawn. temperature 0 means greedy; top_k 0 and top_p 1.0 mean "no truncation"."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p to float logits [..., V]; returns float32 logits.

    Greedy (temperature 0) is treated as temperature 1 here: its log-probs are those of the untempered model.
    """
    logits = logits.float()
    if not params.greedy and params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, MASKED_LOGIT)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, MASKED_LOGIT)
    return logits


def log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities [..., V] of the sampling distribution defined by `params`."""
    return torch.log_softmax(process_logits(logits, params), dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from `log_probs(logits, params)`; return (tokens [B], their log-probs [B]).

    `uniform` [B] float64 in [0, 1) is the row's random number: inverse-CDF sampling takes the first index
    whose cumulative probability exceeds u * total. Taking u as an argument (instead of a generator) makes
    the draw a pure function of its inputs: the engine draws every step's numbers up front, indexed by the
    original row, so a row's tokens do not depend on which other rows are still in the batch, and the whole
    step can be captured in a CUDA graph. It needs B random numbers instead of the B x V of Gumbel-max and
    no host sync. A token outside the top-k/top-p support has probability exactly 0 and adds nothing to a
    cumulative sum, so it is never drawn (`inverse_cdf`). Greedy takes the argmax of the raw logits, as
    `model.generate` does; top-k/top-p never remove the argmax, so it is also the mode of the distribution.
    """
    distribution = log_probs(logits, params)
    token = logits.argmax(-1) if params.greedy else inverse_cdf(distribution.exp(), uniform)
    return token, distribution.gather(-1, token[:, None]).squeeze(1)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row of probs [B, V] (non-negative, any total), the first index whose cumulative sum exceeds
    uniform [B] * total, computed in float64 in two passes: the totals of blocks of `CDF_BLOCK` tokens and
    their running sum pick a block, then a scan of that block alone picks the token.

    A full-vocabulary float64 scan costs a [B, V] float64 buffer and a pass over it each step (measured on 2 CPU
    cores: ~20 ms of a ~90 ms SmolLM2 decode step at 16 rows; ~1 ms this way). The two passes sum in a
    different order than one scan, so a draw can differ from it only when u * total falls within float64
    rounding (~1e-16) of a boundary. A token of probability 0 is never drawn: within the chosen block it adds
    nothing to the scan, and when the block's own scan ends a rounding error short of the target, the block's
    last token of positive probability is taken (the block has one: its total exceeds the target's offset).
    u * total < total holds exactly for u < 1, so the chosen block is always in range.
    """
    rows, vocab = probs.shape
    pad = -vocab % CDF_BLOCK
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(rows, -1, CDF_BLOCK)
    ends = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [B, blocks]: the mass up to each block's end
    target = uniform[:, None] * ends[:, -1:]
    block = torch.searchsorted(ends, target, right=True).clamp_max(ends.shape[1] - 1)  # [B, 1]
    start = torch.where(block > 0, ends.gather(1, (block - 1).clamp_min(0)), 0.0)
    chosen = blocks.gather(1, block[:, :, None].expand(-1, -1, CDF_BLOCK)).squeeze(1)  # [B, CDF_BLOCK]
    # .double() then scan: cumsum(dtype=float64) converts inside the scan, ~8x slower on CPU.
    offset = torch.searchsorted(start + chosen.double().cumsum(-1), target, right=True)
    positions = torch.arange(CDF_BLOCK, device=probs.device)
    last_positive = torch.where(chosen > 0, positions, 0).amax(-1, keepdim=True)
    return (block * CDF_BLOCK + torch.minimum(offset, last_positive)).squeeze(1)
