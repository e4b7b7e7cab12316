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
    sequential cumulative sum, so it is never drawn; the sum is float64 so that the rounding of a parallel
    GPU scan leaves it at most a ~1e-16 window. u * total < total holds exactly for u < 1, so the index is
    always in range. Greedy takes the argmax of the raw logits, as `model.generate` does; top-k/top-p never
    remove the argmax, so it is also the mode of the distribution.
    """
    distribution = log_probs(logits, params)
    if params.greedy:
        token = logits.argmax(-1)
    else:
        cumulative = distribution.exp().cumsum(-1, dtype=torch.float64)
        token = torch.searchsorted(cumulative, uniform[:, None] * cumulative[:, -1:], right=True).squeeze(1)
    return token, distribution.gather(-1, token[:, None]).squeeze(1)
