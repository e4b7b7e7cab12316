"""torch.compile of the static engine's decode unit: one compiled layer step for every layer, bucket and skip set.

The engine's layer unit takes the decoder layer as an argument, so its parameters are inputs of the compiled graph
and one compilation serves every layer; the batch is symbolic, so it serves every batch bucket too. On CPU the unit
runs the inductor's C++ kernels; on CUDA the engine captures the compiled unit into its per-layer CUDA graphs
(`decode_graphs`), which is what `mode="reduce-overhead"` would do, but with one graph per layer and bucket that
every skip set replays (reduce-overhead's own graph trees would re-record per skip set).

Compiled artefacts are cached on disk between runs: inductor's FX-graph cache and AOTAutograd's cache live under
`$NESTED_REFT_CACHE/compiled` (the engine's choice; `TORCHINDUCTOR_CACHE_DIR` overrides it), so a second run
reloads the kernels instead of compiling them. Dynamo still traces the unit once per process
(`CompiledUnit.compile_seconds` measures both: the calls during which a graph was built).

Attention. transformers' sdpa path packs grouped-query heads for a single query (no copies of the keys) but only
when not compiling; under torch.compile it expands the whole cache to every query head first, which measured
3 ms of a 6 ms compiled SmolLM2 layer step on CPU. The compiled unit runs `decode_attention` instead: the query
heads of a key/value head attend together, with a float32 softmax, reading the cache in place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from transformers import AttentionInterface

DECODE_ATTENTION = "nested_reft_decode"


def resolve_compile(choice: str, device: torch.device) -> str:
    """'on' or 'off' for the recipe's `rollout.compile` on `device`; `auto` is where compiling measured faster.

    Measured on SmolLM2-135M in bf16, 16 rows, a 2-core AVX512-BF16 EPYC (interleaved, one thread): a compiled
    decode step took 0.0815 s against 0.0777 s eager with packed bf16 weights (`packed_weights`; a compiled
    graph takes the weights as inputs, so it cannot use them) and 0.0963 s eager without; with two threads under
    load, 0.273 s against 0.216 s. In float32, 0.140 s against 0.143 s. So `auto` is off on CPU. On a GPU it is
    off until measured: `benchmarks/gpu_check.sh` times CUDA graphs with and without the compiled unit.
    """
    del device  # the same answer everywhere measured so far
    return "on" if choice == "on" else "off"


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, for one query per row: query [B, H, 1, D] over the cache's
    key and value [B, KV, L, D] under a bool mask [B, 1, 1, L] (True = attend) or none; returns ([B, 1, H, D],
    None). The H / KV query heads of each key/value head are one [G, D] block, so the cache is read as it is."""
    batch, heads, queries, dim = query.shape
    if queries != 1:
        raise ValueError(f"decode_attention takes one query per row, got {queries}")
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling  # [B, KV, G, L]
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(weights, value)  # [B, KV, G, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


@contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Inside, the model whose (shared) config this is runs attention function `name`."""
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved


def use_artefact_cache(folder: Path) -> Path:
    """Make `folder` where inductor and AOTAutograd cache compiled graphs from now on in this process, unless the
    user's `TORCHINDUCTOR_CACHE_DIR` names another; returns the folder in use.

    Inductor reads the variable whenever it touches its cache, and fills in its default (a folder under /tmp,
    lost at reboot) the first time; importing transformers' models already does that, so the default is treated
    as unset."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


class CompiledUnit:
    """`fn` through torch.compile (symbolic sizes), its artefacts cached in `cache`, with the wall time of the
    calls that built a graph."""

    def __init__(self, fn: Callable[..., Any], cache: Path) -> None:
        self.cache = use_artefact_cache(cache)
        self.fn = torch.compile(fn, dynamic=True)
        self.compile_seconds = 0.0
        self.graphs = 0

    def __call__(self, *args: Any) -> Any:
        stats = torch._dynamo.utils.counters["stats"]
        before, start = stats["unique_graphs"], time.perf_counter()
        out = self.fn(*args)
        if stats["unique_graphs"] != before:
            self.compile_seconds += time.perf_counter() - start
            self.graphs += 1
        return out
