"""The static decode engine: a static KV cache for the decode loop (`decoding.decode`), its model calls run
eagerly or replayed from CUDA graphs.

A decode step is three kinds of *units*, each a plain function of preallocated tensors:

    embed   next tokens -> hidden states and RoPE cos/sin; opens the new token's cache slot in the masks
    layer   one decoder layer (the transformers module itself) reading and writing that layer's cache
    head    final norm, LM head, sampling -> next token and its behavior log-prob

A step runs embed, the *kept* layers in order, then head. Skipping a layer is leaving it out of that list, so
no unit depends on the skip set. Eagerly (CPU, or `cuda_graphs: off`), the units are called as functions and
attention reads only the slots written so far. With CUDA graphs, every unit is captured once per batch bucket
(decode_graphs.py) and attention reads the whole preallocated length under its mask, because a graph's shapes
are fixed. Rows that finish are dropped by moving live rows to the front: to their exact count eagerly, to the
next smaller bucket with graphs (the idle rows in a bucket write into a trash row of the outputs).

The engine drives transformers' own decoder layers, embedding, rotary embedding, norm and LM head, so it
serves the architectures whose model forward is exactly `embed -> rotary -> layers -> norm -> lm_head`.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from nested_reft.compiled_decode import DECODE_ATTENTION, CompiledUnit, attention_implementation
from nested_reft.decode_graphs import DecodeGraphs
from nested_reft.decoding import COMPACT_FRACTION, cache_keyword
from nested_reft.errors import UserError
from nested_reft.models import cache_dir
from nested_reft.sampling import MASKED_LOGIT, SamplingParams, sample_tokens
from nested_reft.skip_bridges import SkipBridges
from nested_reft.skipping import decoder_layers
from nested_reft.static_cache import AttentionMasks, StaticKVCache, prefill_mask

STATIC_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
# Cache lengths are rounded up to this, so that prompts of slightly different lengths reuse one engine.
LENGTH_QUANTUM = 64


# --- the model's pieces and the units --------------------------------------------------------------------


@dataclass
class DecoderParts:
    """The submodules a decode step calls (never the top-level model: engines are cached per model, weakly)."""

    embed_tokens: nn.Module
    rotary_emb: nn.Module
    layers: list[nn.Module]  # every decoder layer, in original order
    norm: nn.Module
    lm_head: nn.Module
    windows: list[int | None]  # each layer's sliding window, None for full attention
    cache_keyword: str  # "cache" (transformers >= 5.2x) or "past_key_values" (older)
    attention: str  # "sdpa" or "eager"


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The pieces of a supported model; UserError naming what is unsupported otherwise."""
    config = model.config
    layers = list(decoder_layers(model))
    if config.model_type not in STATIC_MODEL_TYPES:
        raise UserError(
            f"rollout.kv_cache: 'static' supports the {', '.join(STATIC_MODEL_TYPES)} families, found "
            f"'{config.model_type}'; use kv_cache: dynamic"
        )
    attention = config._attn_implementation
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(
            f"rollout.kv_cache: 'static' needs attention implementation sdpa or eager, found '{attention}'"
        )
    if config.model_type == "mistral":
        windows = [getattr(config, "sliding_window", None)] * len(layers)
    else:
        windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    return DecoderParts(
        embed_tokens=model.model.embed_tokens, rotary_emb=model.model.rotary_emb, layers=layers,
        norm=model.model.norm, lm_head=model.lm_head, windows=windows,
        cache_keyword=cache_keyword(type(layers[0]).forward), attention=attention,
    )


def embed_unit(parts: DecoderParts, tokens: torch.Tensor, positions: torch.Tensor):
    """(hidden [B, Q, H], (cos, sin)) for token ids [B, Q] at RoPE positions [B, Q]."""
    hidden = parts.embed_tokens(tokens)
    return hidden, parts.rotary_emb(hidden, positions)


def layer_unit(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings, positions: torch.Tensor,
    mask: torch.Tensor | None, cache, cache_keyword: str, eager_attention: bool,
) -> torch.Tensor:
    """One decoder layer (a transformers module) on hidden [B, Q, H]; `cache.update` stores its keys/values.

    `mask` is bool [B, 1, Q, K] (True = attend) or None for plain causal attention over every key. The layer
    is an argument, not an index into a list, so that torch.compile traces this once for every layer (their
    parameters become inputs of one compiled graph) instead of once per layer.
    """
    if mask is not None and eager_attention:  # eager attention adds the mask to the scores
        mask = torch.where(mask, torch.zeros((), dtype=hidden.dtype, device=mask.device),
                           torch.finfo(hidden.dtype).min)
    out = layer(
        hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings,
        use_cache=True, **{cache_keyword: cache},
    )
    return out[0] if isinstance(out, tuple) else out


def head_unit(
    parts: DecoderParts, hidden: torch.Tensor, params: SamplingParams, uniform: torch.Tensor,
    ban_eos: torch.Tensor, is_eos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], log-prob [B]) drawn from the last position of hidden [B, Q, H].

    EOS columns (`is_eos` [V]) get MASKED_LOGIT while `ban_eos` [1] is set (min_new_tokens): a tensor, not a
    Python flag, so that one captured graph serves every step.
    """
    logits = parts.lm_head(parts.norm(hidden)[:, -1:])[:, -1]
    logits = torch.where(ban_eos & is_eos, MASKED_LOGIT, logits)
    return sample_tokens(logits, params, uniform)


class _ProbeCache:
    """Records what a layer would store, and stores nothing."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        return key_states, value_states


# --- the engine ------------------------------------------------------------------------------------------


def batch_buckets(capacity: int) -> list[int]:
    """Batch widths that graphs are captured for: powers of two below `capacity`, and `capacity`."""
    sizes = {capacity}
    size = 1
    while size < capacity:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class StaticEngine:
    """Preallocated decode state for one model: the KV cache, masks, per-row buffers and (optionally) graphs.

    Reused across rollouts whose batch and length fit; `engine_for` builds and caches one per model.
    """

    def __init__(
        self, model: nn.Module, batch: int, length: int, graphs: bool, bucketed: bool = False,
        compile_layers: bool = False, skip: tuple[int, ...] = (),
    ) -> None:
        """`graphs`: capture and replay CUDA graphs. `bucketed` (implied by graphs): run the very calls that
        graphs capture (batch buckets, whole-length masked reads) eagerly, e.g. to test them on CPU.
        `compile_layers`: decode steps run the layer unit through torch.compile (`compiled_decode`: one compiled
        graph shared by every layer; batch size symbolic so that the buckets share it too); prefill stays eager.
        `skip`: layers
        the current rollout skips, which the engine must not call while it sizes its buffers (a sharded model
        gathers only the layers it keeps)."""
        self.parts = parts = decoder_parts(model)
        self.bucketed = bucketed or graphs
        self.compiled = CompiledUnit(layer_unit, cache_dir() / "compiled") if compile_layers else None
        self._layer_unit = self.compiled or layer_unit
        self.device = device = next(model.parameters()).device
        self.batch, self.length = batch, length
        self.signature = _signature(model, graphs)
        with torch.no_grad():
            probe_hidden, (probe_cos, _), probe = self._probe(device, next(i for i in range(len(parts.layers))
                                                                           if i not in set(skip)))
        _, kv_heads, _, head_dim = probe.keys.shape
        self.cache = StaticKVCache(len(parts.layers), batch, length, kv_heads, head_dim, probe.keys.dtype, device,
                                   value_dtype=probe.values.dtype)
        self.masks = AttentionMasks(batch, length, set(parts.windows), device)
        # Per-row decode state; views [:width] of these are what units read and write.
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)  # RoPE position of `token`
        self.write_index = torch.zeros(1, dtype=torch.long, device=device)  # cache slot of `token`
        self.hidden = torch.zeros((batch, 1, probe_hidden.shape[-1]), dtype=probe_hidden.dtype, device=device)
        self.cos = torch.zeros((batch, 1, probe_cos.shape[-1]), dtype=probe_cos.dtype, device=device)
        self.sin = torch.zeros_like(self.cos)
        self.uniform = torch.zeros(batch, dtype=torch.float64, device=device)
        self.token_log_prob = torch.zeros(batch, dtype=torch.float32, device=device)
        self.ban_eos = torch.zeros(1, dtype=torch.bool, device=device)
        self.is_eos = torch.zeros(parts.lm_head.out_features, dtype=torch.bool, device=device)
        self.slot_padded = torch.zeros(batch, dtype=torch.bool, device=device)  # the slot's prompt is left-padded
        rope_type = str(getattr(parts.rotary_emb, "rope_type", "default"))
        if graphs and ("dynamic" in rope_type or "longrope" in rope_type):
            raise UserError(f"rollout.cuda_graphs: RoPE type '{rope_type}' recomputes its frequencies from the "
                            "positions on the host, which a CUDA graph cannot replay; use cuda_graphs: off")
        self.graphs = DecodeGraphs(device) if graphs else None
        if self.graphs is not None:
            with torch.no_grad():
                self._capture_body()

    # -- units bound to this engine's buffers (what graphs capture; eager mode calls them too) --

    def _embed(self, width: int) -> None:
        hidden, (cos, sin) = embed_unit(self.parts, self.token[:width, None], self.positions[:width])
        self.hidden[:width].copy_(hidden)
        self.cos[:width].copy_(cos)
        self.sin[:width].copy_(sin)
        self.masks.open(self.write_index, width)

    def _layer(self, index: int, width: int, read_length: int | None, mask: torch.Tensor | None) -> None:
        view = self.cache.view(index, width, self.write_index, read_length)
        hidden = self.hidden[:width]
        position_embeddings = (self.cos[:width], self.sin[:width])
        additive_mask = self.parts.attention == "eager" and self.compiled is None  # decode_attention takes bools
        out = self._layer_unit(self.parts.layers[index], hidden, position_embeddings, self.positions[:width], mask,
                               view, self.parts.cache_keyword, additive_mask)
        hidden.copy_(out)

    def _bridge(self, index: int, width: int) -> None:
        hidden = self.hidden[:width]
        hidden.copy_(self.bridges[index](hidden))

    def _decode_attention(self):
        """The attention decode steps run: compiled, `compiled_decode.decode_attention`; else the model's own."""
        if self.compiled is None:
            return nullcontext()
        return attention_implementation(self.parts.layers[0].self_attn.config, DECODE_ATTENTION)

    def _head(self, width: int, params: SamplingParams) -> None:
        token, log_prob = head_unit(
            self.parts, self.hidden[:width], params, self.uniform[:width], self.ban_eos, self.is_eos
        )
        self.token[:width].copy_(token)
        self.token_log_prob[:width].copy_(log_prob)

    # -- graphs --

    def _capture_body(self) -> None:
        """Embed and every layer (skipped or not in any rollout) for every bucket: whole-length masked reads."""
        units = {}
        for width in batch_buckets(self.batch):
            units[("embed", width)] = partial(self._embed, width)
            for index, window in enumerate(self.parts.windows):
                mask = self.masks.get(window, width, None)
                units[("layer", index, width)] = partial(self._layer, index, width, None, mask)
        with self._decode_attention():
            self.graphs.capture(units)

    def _capture_heads(self, params: SamplingParams) -> None:
        """Head graphs for `params` (sampling settings change the captured ops), once per settings."""
        missing = {("head", width, params): partial(self._head, width, params)
                   for width in batch_buckets(self.batch) if ("head", width, params) not in self.graphs}
        if missing:
            self.graphs.capture(missing)

    def _capture_bridges(self) -> None:
        """Graphs of this rollout's bridges (bound to their parameters, which the optimiser updates in place)."""
        missing = {self._bridge_key(index, width): partial(self._bridge, index, width)
                   for kind, index in self.plan if kind == "bridge" for width in batch_buckets(self.batch)
                   if self._bridge_key(index, width) not in self.graphs}
        if missing:
            self.graphs.capture(missing)

    def _bridge_key(self, index: int, width: int) -> tuple:
        return ("bridge", id(self.bridges), index, width)

    @property
    def compile_seconds(self) -> float:
        """Wall time spent building compiled graphs of the layer unit so far (0 when not compiled)."""
        return self.compiled.compile_seconds if self.compiled is not None else 0.0

    def graph_stats(self) -> dict[str, float]:
        return self.graphs.stats() if self.graphs is not None else {"graphs": 0}

    # -- the decode loop's cache interface (decoding.DecodeCache) --

    def begin(self, skip: tuple[int, ...], params: SamplingParams, eos: torch.Tensor, batch: int,
              prompt_width: int, max_new_tokens: int, bridges: SkipBridges | None = None) -> StaticEngine:
        """Set up a rollout of `batch` prompts of `prompt_width` tokens with layers `skip` bypassed (replaced by
        their `bridges`, when given); returns self, ready for `decoding.decode`."""
        if batch > self.batch or prompt_width + max_new_tokens > self.length:
            raise ValueError(f"rollout of {batch} x {prompt_width + max_new_tokens} exceeds the engine's "
                             f"{self.batch} x {self.length}")
        skipped = set(skip)
        self.kept = [index for index in range(len(self.parts.layers)) if index not in skipped]
        self.bridges = bridges
        self.plan = bridges.plan(skip, len(self.parts.layers)) if bridges else [("layer", i) for i in self.kept]
        if self.graphs is not None:  # before any state is set: warm-up runs overwrite buffers
            self._capture_heads(params)
            self._capture_bridges()
        self.params = params
        self.is_eos.zero_()
        self.is_eos[eos[eos < len(self.is_eos)]] = True  # an id outside the vocabulary can never be drawn
        return self

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int = 1) -> int:
        """Run the prompts through the kept layers (eagerly, any mode), filling cache slots [0, P), each group of
        `group_size` identical rows from one run of its prompt; returns the starting width: the batch, or its
        bucket when bucketed (the slots past the batch idle)."""
        batch, self.prompt_width = prompt_ids.shape
        width = self._start_width(batch)
        self.steps = 0
        self.positions[:batch, 0] = prompt_mask.sum(1)
        self.positions[batch:width] = 0  # idle slots: any position will do, but keep them from growing
        self.write_index.fill_(self.prompt_width)
        self.masks.start(prompt_mask)
        self.slot_padded[:batch] = ~prompt_mask.bool().all(1)
        self.padded = self._padded(batch)
        self._prefill(prompt_ids[::group_size], prompt_mask[::group_size])
        if group_size > 1:  # rows [0, batch / group_size) hold one per prompt: spread them over their groups
            self.cache.repeat_rows(self.kept, batch // group_size, group_size, filled=self.prompt_width)
            self.hidden[:batch] = self.hidden[: batch // group_size].repeat_interleave(group_size, dim=0)
        return width

    def sample(self, uniform: torch.Tensor, ban_eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = len(uniform)
        self.uniform[:width].copy_(uniform)
        self.ban_eos.fill_(ban_eos)
        if self.graphs is not None:
            self.graphs.replay(("head", width, self.params))
        else:
            self._head(width, self.params)
        return self.token[:width], self.token_log_prob[:width]

    def advance(self, token: torch.Tensor) -> None:
        width = len(token)
        self.token[:width].copy_(token)
        self.steps += 1
        self._run_body(width, self.plan, read_length=self.prompt_width + self.steps, padded=self.padded)
        self.positions[:width] += 1
        self.write_index += 1

    def target_width(self, live: int, width: int) -> int:
        if self.bucketed:
            return next(size for size in batch_buckets(self.batch) if size >= live)
        return live if width - live >= max(1.0, COMPACT_FRACTION * width) else width

    def compact(self, keep: torch.Tensor, width: int) -> None:
        count = len(keep)
        self.cache.select_rows(self.kept, keep, filled=self.prompt_width + self.steps)
        self.masks.select_rows(keep)
        for buffer in (self.token, self.positions, self.slot_padded):
            buffer[:count] = buffer[keep]
        self.padded = self._padded(width)

    def decode_step(self, width: int, skip: tuple[int, ...], params: SamplingParams) -> None:
        """One bucketed decode step (embed, kept layers, head) on whatever state the buffers hold, without
        recording or advancing: repeated calls rewrite the same cache slot. For profiling; needs a bucketed or
        graph engine whose head graphs for `params` exist (any earlier rollout made them)."""
        if not self.bucketed:
            raise ValueError("decode_step needs a bucketed or graph engine")
        plan = [("layer", index) for index in range(len(self.parts.layers)) if index not in set(skip)]
        self._run_body(width, plan, read_length=self.length, padded=True)
        self.sample(self.uniform[:width].clone(), ban_eos=False)

    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        batch, width = prompt_ids.shape
        positions = (prompt_mask.cumsum(1) - 1).clamp_min(0)  # left padding must not shift positions
        hidden, position_embeddings = embed_unit(self.parts, prompt_ids, positions)
        padded = not bool(prompt_mask.bool().all())
        # As transformers does: no mask (sdpa's is_causal) when nothing needs hiding.
        masks = {window: prefill_mask(prompt_mask, window) if padded or (window is not None and width >= window)
                 else None for window in set(self.parts.windows)}
        write = torch.arange(width, device=self.device)
        for kind, index in self.plan:
            if kind == "bridge":
                hidden = self.bridges[index](hidden)
                continue
            view = self.cache.view(index, batch, write, width)
            hidden = layer_unit(self.parts.layers[index], hidden, position_embeddings, positions,
                                masks[self.parts.windows[index]], view, self.parts.cache_keyword,
                                self.parts.attention == "eager")
            if view.updates != 1:
                raise RuntimeError(f"decoder layer {index} did not write the static KV cache "
                                   f"(transformers did not pass `{self.parts.cache_keyword}` through)")
        self.hidden[:batch].copy_(hidden[:, -1:])

    def _run_body(self, width: int, plan: list[tuple[str, int]], read_length: int, padded: bool) -> None:
        """Embed the current tokens and run `plan` (kept layers, and bridges in place of skipped ones): write slot
        `write_index`, leave hidden states."""
        with self._decode_attention():
            self._run_plan(width, plan, read_length, padded)

    def _run_plan(self, width: int, plan: list[tuple[str, int]], read_length: int, padded: bool) -> None:
        if self.graphs is not None:
            self.graphs.replay(("embed", width))
            for kind, index in plan:
                self.graphs.replay(("layer", index, width) if kind == "layer" else self._bridge_key(index, width))
            return
        self._embed(width)
        masks = {}
        for window in set(self.parts.windows):
            # As transformers does: no mask when no slot is hidden (sdpa then attends to every key). Bucketed steps
            # read the whole length under their mask, as graphs do.
            needed = self.bucketed or padded or (window is not None and read_length >= window)
            masks[window] = self.masks.get(window, width, None if self.bucketed else read_length) if needed else None
        for kind, index in plan:
            if kind == "bridge":
                self._bridge(index, width)
            else:
                self._layer(index, width, None if self.bucketed else read_length, masks[self.parts.windows[index]])

    def _start_width(self, batch: int) -> int:
        if not self.bucketed:
            return batch
        return next(size for size in batch_buckets(self.batch) if size >= batch)

    def _padded(self, width: int) -> bool:
        """Whether any of the first `width` slots has prompt padding (exact mode only; bucketed steps always
        apply masks)."""
        return self.bucketed or bool(self.slot_padded[:width].any())

    def _probe(self, device: torch.device, layer: int):
        """One token through the embedding and one layer: the dtypes and shapes the buffers must have."""
        tokens = torch.zeros((1, 1), dtype=torch.long, device=device)
        hidden, position_embeddings = embed_unit(self.parts, tokens, tokens)
        probe = _ProbeCache()
        layer_unit(self.parts.layers[layer], hidden, position_embeddings, tokens, None, probe,
                   self.parts.cache_keyword, self.parts.attention == "eager")
        if probe.keys is None:
            raise RuntimeError(f"decoder layer {layer} ignored the `{self.parts.cache_keyword}` argument: this "
                               "transformers version is not supported by kv_cache: static")
        return hidden, position_embeddings, probe


# --- one engine per model --------------------------------------------------------------------------------

# model -> {(graphs?, compiled?): engine}. Weak keys: an engine dies with its model (it holds submodules, never
# the model itself).
_ENGINES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[bool, bool], StaticEngine]] = weakref.WeakKeyDictionary()


def engine_for(
    model: nn.Module, batch: int, length: int, graphs: bool, compile_layers: bool = False, skip: tuple[int, ...] = ()
) -> StaticEngine:
    """The model's cached engine of this kind (graphs or not, compiled or not) when it fits (batch, length,
    same layers and parameter dtypes; for graphs, the same parameter tensors), else a new one (its buffers
    sized without calling the layers in `skip`).

    Capacities only grow, so alternating sizes do not rebuild, except that a graph engine more than twice as
    long as needed is rebuilt: graphs read the whole length every step.
    """
    length = -(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM
    signature = _signature(model, graphs)
    engines = _ENGINES.setdefault(model, {})
    kind = (graphs, compile_layers)
    engine = engines.pop(kind, None)
    if engine is not None and engine.signature == signature:
        too_long = graphs and engine.length > 2 * length
        if engine.batch >= batch and engine.length >= length and not too_long:
            engines[kind] = engine
            return engine
        batch = max(batch, engine.batch)
        length = length if too_long else max(length, engine.length)
    engine = None  # free the old buffers before allocating new ones
    engines[kind] = StaticEngine(model, batch, length, graphs, compile_layers=compile_layers, skip=skip)
    return engines[kind]


def release_engine(model: nn.Module) -> None:
    """Free the model's static caches and graphs (they are also freed with the model)."""
    _ENGINES.pop(model, None)


def _signature(model: nn.Module, graphs: bool) -> tuple:
    """What an engine is bound to: the layer modules, the parameters' dtypes and the autocast state (they set
    the cache's dtypes and, under graphs, the captured kernels), and for graphs the parameter tensors
    themselves (a graph replays reads of fixed addresses).

    Eager engines call the modules, whatever tensors they hold at the time: FSDP gathers a layer's parameters
    into new storage for every rollout, and an optimizer step may replace them, without invalidating one.
    """
    device = next(model.parameters()).device
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    addresses = tuple(p.data_ptr() for p in model.parameters()) if graphs else ()
    return (device, autocast, tuple(p.dtype for p in model.parameters()), addresses,
            tuple(id(layer) for layer in decoder_layers(model)))
