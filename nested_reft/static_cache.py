"""The static KV cache: key/value buffers and attention masks allocated once and written in place.

Nothing here changes shape while a rollout runs, which is what lets a decode step be captured as a CUDA graph
(a graph replays kernels on fixed addresses) and saves the dynamic cache's per-step concatenation.

Layout. Row r of a batch is [left-padded prompt | completion]; slot s of its cache holds the token in column s.
Every row therefore writes the same slot at a given step (`write_index`), although its RoPE position differs by
its left padding. Keys and values are [batch, kv_heads, length, head_dim], one pair per decoder layer of the
*full* model, indexed by the layer's original index: a layer reads and writes the same buffers whichever
other layers a rollout skips, so anything bound to them (a CUDA graph) stays valid for every skip set. The
skipped layers' buffers sit unused; that costs the skipped fraction of the cache's memory.

Masks [batch, 1, 1, length] (bool, True = may attend) mark the slots holding real tokens: the prompt's
non-padding columns and the completion slots written so far. Layers with a sliding window get a second mask
that also hides slots `window` or more columns back (column distance equals position distance: the padding
offset is the same for both ends).
"""

from __future__ import annotations

import torch


class LayerCacheView:
    """What one transformers attention module receives as its `cache` argument.

    `update` (the only Cache method the supported attention modules call) writes the new keys/values at the
    slots `write_index` and returns the first `read_length` slots to attend over (all of them when None).
    `updates` counts calls, so the engine can check that transformers really handed the cache to the layer.
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, write_index: torch.Tensor, read_length: int | None
    ) -> None:
        self.keys, self.values, self.write_index, self.read_length = keys, values, write_index, read_length
        self.updates = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.dtype != self.keys.dtype or value_states.dtype != self.values.dtype:
            raise RuntimeError(
                f"static KV cache: the layer produced {key_states.dtype} keys and {value_states.dtype} values, "
                f"the cache holds {self.keys.dtype} and {self.values.dtype}"
            )
        self.keys.index_copy_(2, self.write_index, key_states)
        self.values.index_copy_(2, self.write_index, value_states)
        self.updates += 1
        end = self.read_length
        return self.keys[:, :, :end], self.values[:, :, :end]


class StaticKVCache:
    """Per-layer key/value buffers [batch, kv_heads, length, head_dim], zero-initialised.

    Zeros matter: attention reads whole buffers under a mask, and a masked slot's weight is exactly 0, but
    0 * NaN is NaN, so never-written slots must hold finite values. Keys and values may differ in dtype: under
    autocast, values leave a bf16 projection while keys are promoted to float32 by the rotary embedding.
    """

    def __init__(
        self, num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device, value_dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=value_dtype or dtype, device=device) for _ in range(num_layers)]
        self.batch, self.length, self.dtype = batch, length, dtype

    def view(self, layer: int, width: int, write_index: torch.Tensor, read_length: int | None) -> LayerCacheView:
        """The cache of `layer` for the first `width` rows (a view: same storage, fixed address)."""
        return LayerCacheView(self.keys[layer][:width], self.values[layer][:width], write_index, read_length)

    def select_rows(self, layers: list[int], rows: torch.Tensor, filled: int) -> None:
        """Move rows `rows` (sorted ascending) of `layers` to the front; only the first `filled` slots are copied."""
        count = len(rows)
        for layer in layers:
            for buffer in (self.keys[layer], self.values[layer]):
                buffer[:count, :, :filled] = buffer[rows, :, :filled]  # the gather copies first: no aliasing

    def repeat_rows(self, layers: list[int], rows: int, repeats: int, filled: int) -> None:
        """Spread rows [0, rows) of `layers` over rows [0, rows * repeats), each repeated `repeats` times in a
        row (row r to rows [r * repeats, (r + 1) * repeats)); only the first `filled` slots are copied."""
        for layer in layers:
            for buffer in (self.keys[layer], self.values[layer]):
                # repeat_interleave copies first: no aliasing
                buffer[: rows * repeats, :, :filled] = buffer[:rows, :, :filled].repeat_interleave(repeats, dim=0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class AttentionMasks:
    """Which cache slots each row may attend to during decoding: one bool mask per attention window."""

    def __init__(self, batch: int, length: int, windows: set[int | None], device: torch.device) -> None:
        self.visible = torch.zeros((batch, 1, 1, length), dtype=torch.bool, device=device)
        self.windowed = {w: torch.zeros_like(self.visible) for w in windows if w is not None}
        self.slots = torch.arange(length, device=device)

    def start(self, prompt_mask: torch.Tensor) -> None:
        """A new rollout: rows see their prompt tokens only; rows past the batch see nothing yet."""
        batch, width = prompt_mask.shape
        self.visible.zero_()
        self.visible[:batch, 0, 0, :width] = prompt_mask.bool()

    def open(self, write_index: torch.Tensor, width: int) -> None:
        """Make slot `write_index` (the token being decoded) visible to the first `width` rows."""
        self.visible[:width].index_fill_(3, write_index, True)
        for window, mask in self.windowed.items():
            # Slot s is within the window of the query at slot c when c - s < window.
            torch.logical_and(self.visible[:width], self.slots > write_index - window, out=mask[:width])

    def get(self, window: int | None, width: int, read_length: int | None) -> torch.Tensor:
        mask = self.visible if window is None else self.windowed[window]
        return mask[:width, :, :, :read_length]

    def select_rows(self, rows: torch.Tensor) -> None:
        count = len(rows)
        for mask in (self.visible, *self.windowed.values()):
            mask[:count] = mask[rows]


def prefill_mask(prompt_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, P, P] bool: causal, real prompt tokens only, within `window` when given.

    A padding query also sees itself. transformers leaves such rows fully masked; their outputs are never
    read (every later query masks padding slots), but a fully masked row gives NaN on some attention
    kernels, and a NaN key or value in the cache would poison real rows (0 * NaN).
    """
    width = prompt_mask.shape[1]
    slots = torch.arange(width, device=prompt_mask.device)
    query, key = slots[:, None], slots[None, :]
    allowed = (key <= query) & (prompt_mask.bool()[:, None, None, :] | (key == query))
    if window is not None:
        allowed = allowed & (query - key < window)
    return allowed
