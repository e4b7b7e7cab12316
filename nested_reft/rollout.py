"""The generation engine: batched sampling with a KV cache, used by train, evaluate and bench.

One left-padded batch holds every prompt repeated `num_generations` times. A prefill pass runs each prompt
once, gives its keys and values to its `num_generations` rows, and yields only the last position's logits; then
tokens are decoded one at a time (`decoding.decode`, the one decode loop). Each token is drawn from
`sampling.log_probs` (temperature, top-k, top-p), and its log-probability under exactly that distribution is
recorded as the behavior log-prob `lp_b`. Every step's
random number for every row is drawn up front, so a row's tokens do not depend on how the batch around it
shrinks; with per-prompt `seeds` they do not depend on which other prompts share the batch either (a
data-parallel rank samples exactly what a single process sampling the whole batch does). Rows that have
emitted EOS are dropped from the batch and the cache, so later steps only compute live rows.

Two KV caches (`kv_cache`), behind the same loop:
- "dynamic": transformers' DynamicCache (`decoding.DynamicDecodeCache`); the model runs inside `skip_layers`,
  so the cache has one slot per kept layer. Works for every supported family.
- "static": preallocated buffers written in place (`static_engine`, one engine per model, reused across
  rollouts), which calls the decoder layers itself and leaves the skipped ones out. With `cuda_graphs`
  "auto" on a CUDA device its decode units are replayed from CUDA graphs captured per layer, so every skip
  set reuses the same graphs. Same tokens and log-probs as "dynamic" on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from nested_reft.decoding import DynamicDecodeCache, decode
from nested_reft.packed_weights import packed_linears
from nested_reft.sampling import SamplingParams
from nested_reft.skip_bridges import SkipBridges
from nested_reft.skipping import decoder_layers, skip_layers, validate_skip_set
from nested_reft.static_engine import engine_for

KV_CACHES = ("dynamic", "static")
CUDA_GRAPHS = ("auto", "off")


@dataclass
class Rollout:
    """A batch of sampled completions; row i belongs to prompt i // num_generations."""

    prompt_ids: torch.Tensor  # [B, P] left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [B, P] 1 for prompt tokens, 0 for padding
    completion_ids: torch.Tensor  # [B, T] right-padded with pad_token_id; T = longest completion
    completion_mask: torch.Tensor  # [B, T] bool, True for generated tokens including the EOS that ended the row
    behavior_log_probs: torch.Tensor  # [B, T] float32 log mu_S(token) under the sampling distribution, 0 on padding
    skipped_layers: tuple[int, ...]
    prefill_seconds: float
    decode_seconds: float
    tokens_generated: int  # completion_mask.sum()
    compile_seconds: float = 0.0  # of decode_seconds, spent building compiled graphs (compile_layers)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of prefill + decode time."""
        seconds = self.prefill_seconds + self.decode_seconds
        return self.tokens_generated / seconds if seconds > 0 else 0.0

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, P + T] of prompt + completion, as the loss re-reads them."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        return ids, torch.cat([self.prompt_mask, self.completion_mask.long()], dim=1)

    def completions(self) -> list[list[int]]:
        """Each row's generated token ids (through its EOS, without padding)."""
        return [row[mask].tolist() for row, mask in zip(self.completion_ids, self.completion_mask)]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    num_generations: int = 1,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_ids: set[int] | list[int],
    pad_token_id: int,
    skip: Sequence[int] = (),
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    min_new_tokens: int = 0,
    kv_cache: str = "dynamic",
    cuda_graphs: str = "auto",
    compile_layers: bool = False,
    should_stop: Callable[[], bool] | None = None,
    bridges: SkipBridges | None = None,
) -> Rollout:
    """Sample `num_generations` completions per prompt with decoder layers `skip` bypassed.

    A row stops at its first EOS token (kept in the completion) or after `max_new_tokens`. EOS cannot be
    sampled before `min_new_tokens` tokens (for fixed-length benchmarks; the recorded log-probs then describe
    that EOS-free distribution). The same `seed` on the same device gives the same rollout; `seeds` (one per
    prompt, instead of `seed`) makes each prompt's completions a function of its own seed alone
    (`prompt_uniforms`), whatever else is in the batch. `kv_cache` is "dynamic" or "static"; `cuda_graphs`
    "auto" replays static decoding from CUDA graphs on a CUDA device (never on CPU), "off" runs it eagerly.
    `compile_layers` (static only; `rollout.compile`) runs each decoder layer's decode step through
    torch.compile (`compiled_decode`): one compilation shared by every layer and skip set. `should_stop` (polled
    at each host read of the finished rows) ends decoding early once it returns True; the rollout then holds what
    was decoded so far. `bridges` run in place of the skipped layers that have one (`skip_bridges`): the
    behavior model is then the skipped view with its bridges, and `lp_b` is its log-prob.
    """
    _check_arguments(prompts, num_generations, max_new_tokens, min_new_tokens, eos_token_ids)
    if kv_cache not in KV_CACHES or cuda_graphs not in CUDA_GRAPHS:
        raise ValueError(f"kv_cache must be one of {KV_CACHES} and cuda_graphs one of {CUDA_GRAPHS}, "
                         f"got {kv_cache!r} and {cuda_graphs!r}")
    if compile_layers and kv_cache != "static":
        raise ValueError("compile_layers needs kv_cache='static'")
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, num_generations, pad_token_id, device)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
    uniforms = prompt_uniforms(seeds, num_generations, max_new_tokens, device) if seeds is not None else \
        _batch_uniforms(seed, len(prompt_ids), max_new_tokens, device)
    eos = torch.tensor(sorted(set(eos_token_ids)), device=device)
    skip = validate_skip_set(skip, len(decoder_layers(model)))
    kept = [layer for index, layer in enumerate(decoder_layers(model)) if index not in skip]
    # bf16 weights on CPU are packed for oneDNN once per rollout (packed_weights), except for compiled layers,
    # whose graphs take the plain weights as inputs.
    packed = nullcontext() if compile_layers else packed_linears([*kept, model.get_output_embeddings()],
                                                                  len(prompt_ids))
    compiling = 0.0
    with _eval_mode(model), packed, (nullcontext() if kv_cache == "static" else skip_layers(model, skip, bridges)):
        if kv_cache == "static":
            graphs = cuda_graphs == "auto" and device.type == "cuda"
            engine = engine_for(model, len(prompt_ids), prompt_ids.shape[1] + max_new_tokens, graphs=graphs,
                                compile_layers=compile_layers, skip=skip)
            cache = engine.begin(skip, params, eos, *prompt_ids.shape, max_new_tokens, bridges=bridges)
            compiling = engine.compile_seconds
        else:
            cache = DynamicDecodeCache(model, params, eos, max_new_tokens)
        decoded, prefill_seconds, decode_seconds = decode(
            cache, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos=eos,
            pad_token_id=pad_token_id, uniforms=uniforms, should_stop=should_stop, group_size=num_generations,
        )
        if kv_cache == "static":
            compiling = engine.compile_seconds - compiling
    completion_ids, completion_mask, behavior_log_probs = decoded
    length = int(completion_mask.sum(1).max())
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids[:, :length],
        completion_mask=completion_mask[:, :length],
        behavior_log_probs=behavior_log_probs[:, :length],
        skipped_layers=tuple(sorted(skip)),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        tokens_generated=int(completion_mask.sum()),
        compile_seconds=compiling,
    )


def _batch_uniforms(seed: int | None, rows: int, max_new_tokens: int, device: torch.device) -> torch.Tensor:
    """Float64 uniforms [max_new_tokens, rows]: every step's random number for every row, drawn up front from
    one generator (see the module docstring); `seed=None` draws a fresh seed."""
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return torch.rand((max_new_tokens, rows), generator=generator, dtype=torch.float64, device=device)


def prompt_uniforms(seeds: Sequence[int], num_generations: int, max_new_tokens: int,
                    device: torch.device) -> torch.Tensor:
    """Float64 uniforms [max_new_tokens, len(seeds) * num_generations]: column block i (prompt i's rows) comes
    from a CPU generator seeded with seeds[i], so it is the same on every device and in every batch. Drawn
    once per rollout and moved to `device` in one copy: the decode loop only indexes it."""
    blocks = [torch.rand((max_new_tokens, num_generations), generator=torch.Generator().manual_seed(s),
                         dtype=torch.float64) for s in seeds]
    return torch.cat(blocks, dim=1).to(device)


def left_pad(
    prompts: list[list[int]], num_generations: int, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [len(prompts) * num_generations, longest prompt]: each prompt repeated in a contiguous group."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    ids = ids.repeat_interleave(num_generations, dim=0)
    mask = mask.repeat_interleave(num_generations, dim=0)
    return ids.to(device), mask.to(device)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Generate in eval mode, then restore each module's own mode.

    In train mode with gradient checkpointing, transformers silently drops the KV cache, which would make
    every decode step see a single token.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_arguments(
    prompts: list[list[int]], num_generations: int, max_new_tokens: int, min_new_tokens: int, eos: set[int] | list[int]
) -> None:
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if num_generations < 1 or max_new_tokens < 1:
        raise ValueError(
            f"num_generations and max_new_tokens must be >= 1, got {num_generations} and {max_new_tokens}"
        )
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    if not eos:
        raise ValueError("generate needs at least one EOS token id")
