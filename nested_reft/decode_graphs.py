"""CUDA graphs of decode units: capture once, replay for every skip set.

A unit is a closure with no arguments that reads and writes only preallocated tensors (the static KV cache,
the decode state); `static_engine` builds them from plain functions that also run eagerly, on CPU too. This
module only wraps them: `capture` records one into a graph, `replay` launches it. Capturing a whole decode
step would bake the skip set into the graph; capturing each decoder layer separately (bound to that layer's
weights and its own cache buffers) gives graphs that any skip set simply replays in order, so their number is
(layers + 2) x batch buckets, whatever the skip sets.

All graphs share one memory pool. That is safe here because no unit leaves a live tensor allocated inside the
pool: each copies its result into a preallocated buffer, so every block a capture allocates is free again when
the capture ends and may be reused by the next capture without any ordering constraint between replays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import torch

# Eager runs of a unit on a side stream before capturing it: the first run of an op may initialise
# libraries (cuBLAS handles and workspaces, kernel selection) in ways that cannot be captured.
WARMUP_RUNS = 2


class DecodeGraphs:
    """CUDA graphs keyed by any hashable (e.g. ("layer", 3, 64)), with capture time and memory accounting."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.capture_memory_bytes = 0  # growth of the allocator's reserved memory across captures

    def __contains__(self, key: Hashable) -> bool:
        return key in self.graphs

    def __len__(self) -> int:
        return len(self.graphs)

    def capture(self, units: dict[Hashable, Callable[[], None]]) -> None:
        """Warm each unit up on a side stream, then record it.

        Running a unit (the warm-up) mutates its buffers: capture only while they hold nothing still needed
        (the engine captures before prefill). Memory is measured as the growth of the allocator's reserved
        memory across the whole batch of captures, with cached free blocks released before and after.
        """
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(self.device)
        start = time.perf_counter()
        for key, unit in units.items():
            # Under autocast, cast weights must not come from autocast's cache: a graph would keep reading that
            # cached copy (stale after an optimizer step, and freed when the caller's autocast block ends).
            with _uncached_autocast():
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        unit()
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    unit()
            self.graphs[key] = graph
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.capture_seconds += time.perf_counter() - start
        self.capture_memory_bytes += torch.cuda.memory_reserved(self.device) - reserved

    def replay(self, key: Hashable) -> None:
        self.graphs[key].replay()

    def stats(self) -> dict[str, float]:
        return {
            "graphs": len(self.graphs),
            "capture_seconds": self.capture_seconds,
            "capture_memory_mb": self.capture_memory_bytes / 2**20,
        }


def _uncached_autocast():
    """The caller's CUDA autocast settings with its weight-cast cache off (a no-op context without autocast)."""
    enabled = torch.is_autocast_enabled("cuda")
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=enabled, cache_enabled=False)
