"""The decode loop: one token per step for every live row, over any KV cache that implements `DecodeCache`.

The loop owns the bookkeeping that does not depend on how keys and values are stored: which output row each
batch *slot* holds, which rows have finished, what is written to the outputs, when the host reads the finished
count (a device sync), and when finished rows are dropped. A cache owns the model calls: prefill, sampling the
next token from the current position's distribution, feeding that token through the kept layers, and moving
live slots to the front when the loop drops finished ones. Two caches implement it:

- `DynamicDecodeCache` (below): transformers' DynamicCache, grown by concatenation every step, for every
  supported family; the model runs inside `skip_layers`, so the cache has one slot per kept layer;
- `static_engine.StaticEngine`: preallocated buffers written in place, eagerly or replayed from CUDA graphs.

Slots and rows. The batch starts with one slot per row (a graph engine may add idle slots up to its batch
bucket). A slot whose row has finished emits padding until the loop drops it; idle slots write into a trash
row of the outputs that is cut off at the end. Every step's random number comes from `uniforms[step, row]`,
indexed by the slot's row, so a row's tokens do not depend on which other rows are still in the batch.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache

from nested_reft.sampling import MASKED_LOGIT, SamplingParams, sample_tokens

# Drop finished rows once they are at least this fraction of the live batch. Dropping copies the KV cache once
# (SmolLM2-135M on one CPU core, 16 rows x 200 cached tokens: ~20 ms), and each dropped row saves ~5 ms of every
# later step (step ~154 ms at 16 rows, ~93 ms at 4), so a drop pays for itself within a few steps; waiting for a
# couple of rows merely halves the number of copies.
COMPACT_FRACTION = 0.125

# (ids, mask, log-probs) [B, max_new_tokens] each; prefill seconds; decode seconds.
Decoded = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float, float]


class DecodeCache(Protocol):
    """A KV cache and the model calls that read and write it, as the decode loop drives them."""

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int = 1) -> int:
        """Run the left-padded prompts [B, P] and return the number of slots decoding starts with (>= B). Rows come
        in groups of `group_size` copies of one prompt: the prompt runs once and its keys and values (and its
        next-token distribution) are copied to its group's rows."""

    def sample(self, uniform: torch.Tensor, ban_eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(token [W], behavior log-prob [W]) of every slot from its current distribution, `uniform` [W] being
        the slots' random numbers; EOS cannot be drawn while `ban_eos`."""

    def advance(self, token: torch.Tensor) -> None:
        """Feed `token` [W] (one per slot) through the kept layers: its keys/values enter the cache and the
        next position's distribution becomes current."""

    def target_width(self, live: int, width: int) -> int:
        """How many slots to keep when `live` of the current `width` are still decoding (`width`: no drop)."""

    def compact(self, keep: torch.Tensor, width: int) -> None:
        """Move slots `keep` (ascending) to the front; `width` slots remain, those past len(keep) idle."""


def device_clock(device: torch.device) -> float:
    """Wall-clock seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def status_interval(device: torch.device) -> int:
    """Steps between host reads of which rows have finished.

    A read synchronises with the device. On CPU that is free; on a GPU it stops the host from queueing the
    next step while the current one runs, so there we read every few steps and let finished rows idle
    (emitting padding) until then, at the price of at most that many extra steps at the very end.
    """
    return 1 if device.type == "cpu" else 8


def decode(
    cache: DecodeCache,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    eos: torch.Tensor,
    pad_token_id: int,
    uniforms: torch.Tensor,
    should_stop: Callable[[], bool] | None = None,
    group_size: int = 1,
) -> Decoded:
    """Prefill, then decode up to `max_new_tokens` per row (`uniforms` [T, B]: each step's random number per row).

    Rows [g * group_size, (g + 1) * group_size) must hold the same prompt: it is prefilled once for them all. A
    row ends after its first EOS token (kept). With `should_stop`, the loop also ends early, at the next host
    read, once it returns True: the caller asked to give up this rollout (a stop request), and the outputs then
    hold what was decoded so far.
    """
    batch = prompt_ids.shape[0]
    device = prompt_ids.device
    trash = batch  # the output row idle slots write into
    out_ids = torch.full((batch + 1, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    out_mask = torch.zeros((batch + 1, max_new_tokens), dtype=torch.bool, device=device)
    out_log_probs = torch.zeros((batch + 1, max_new_tokens), dtype=torch.float32, device=device)
    uniforms = torch.cat([uniforms, uniforms.new_zeros((max_new_tokens, 1))], dim=1)  # the trash row's column
    interval = status_interval(device)

    start = device_clock(device)
    width = cache.prefill(prompt_ids, prompt_mask, group_size)
    prefill_end = device_clock(device)
    slots = torch.arange(width, device=device)
    rows = slots.clamp_max(trash)  # output row of each slot
    done = slots >= batch  # finished rows and idle slots
    for step in range(max_new_tokens):
        token, log_prob = cache.sample(uniforms[step].index_select(0, rows), ban_eos=step < min_new_tokens)
        token = token.masked_fill(done, pad_token_id)  # a finished row not yet dropped emits padding
        out_ids[rows, step] = token
        out_mask[rows, step] = ~done
        out_log_probs[rows, step] = log_prob.masked_fill(done, 0.0)
        done = done | torch.isin(token, eos)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % interval == 0:
            live = width - int(done.sum())  # the host sync
            if live == 0 or (should_stop is not None and should_stop()):
                break
            target = cache.target_width(live, width)
            if target < width:
                keep = (~done).nonzero().squeeze(1)
                cache.compact(keep, target)
                idle = target - live
                rows = torch.cat([rows[keep], rows.new_full((idle,), trash)])
                token = torch.cat([token[keep], token.new_full((idle,), pad_token_id)])
                done = torch.cat([done.new_zeros(live), done.new_ones(idle)])
                width = target
        cache.advance(token)
    end = device_clock(device)
    return (out_ids[:batch], out_mask[:batch], out_log_probs[:batch]), prefill_end - start, end - prefill_end


def cache_keyword(forward) -> str:
    """The name under which this transformers version's forward takes the KV cache."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class DynamicDecodeCache:
    """transformers' DynamicCache driven through the model's own forward (the model must be inside
    `skip_layers` for the whole rollout, so that the cache has one slot per kept layer).

    Rows are dropped exactly (no idle slots) once enough have finished (`COMPACT_FRACTION`).
    """

    def __init__(self, model: nn.Module, params: SamplingParams, eos: torch.Tensor, max_new_tokens: int) -> None:
        self.model, self.params, self.eos, self.max_new_tokens = model, params, eos, max_new_tokens
        self.cache = DynamicCache(config=model.config)  # created inside skip_layers: one slot per kept layer
        self.keyword = cache_keyword(type(model).forward)  # "cache" in current transformers

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int = 1) -> int:
        batch, self.prompt_width = prompt_ids.shape
        # Preallocated so that each step passes a growing view instead of concatenating a new mask.
        self.attention = torch.cat([prompt_mask, prompt_mask.new_ones((batch, self.max_new_tokens))], dim=1)
        self.positions = prompt_mask.sum(1, keepdim=True)  # position of each row's next token
        self.steps = 0
        ids, mask = prompt_ids[::group_size], prompt_mask[::group_size]  # one row per prompt
        logits = self._forward(ids, mask, (mask.cumsum(1) - 1).clamp_min(0),
                               logits_to_keep=1)  # left padding must not shift positions
        if group_size > 1:
            self.cache.batch_repeat_interleave(group_size)
        self.logits = logits.repeat_interleave(group_size, dim=0)
        return batch

    def sample(self, uniform: torch.Tensor, ban_eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits.index_fill(-1, self.eos, MASKED_LOGIT) if ban_eos else self.logits
        return sample_tokens(logits, self.params, uniform)

    def advance(self, token: torch.Tensor) -> None:
        self.steps += 1
        self.logits = self._forward(token[:, None], self.attention[:, : self.prompt_width + self.steps],
                                    self.positions)
        self.positions = self.positions + 1

    def target_width(self, live: int, width: int) -> int:
        return live if width - live >= max(1.0, COMPACT_FRACTION * width) else width

    def compact(self, keep: torch.Tensor, width: int) -> None:
        self.cache.batch_select_indices(keep)
        self.positions, self.attention = self.positions[keep], self.attention[keep]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.keyword: self.cache}, **kwargs)
        return out.logits[:, -1]
