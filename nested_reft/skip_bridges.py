"""Skip bridges: small parameters that act only in the layer-skipped view, so that it can learn to track the policy.

Skipping decoder layer i passes the residual stream unchanged: h -> h. A bridge replaces that identity with a
low-rank residual update, h -> h + B A norm(h) (rank r, B initialised to 0, so an untrained bridge *is* the plain
skip). One bridge per eligible layer; a rollout that skips layer i runs its bridge in its place. The policy never
runs a bridge: the full model, its log-probs, its checkpoints and evaluation are exactly what RL makes them, and
the behavior model is still the policy's own weights plus `2 r H` numbers per skipped layer (rank 32 on SmolLM2:
37k per layer, 1% of its 3.5M and 0.03% of the model; on Qwen2.5-1.5B 98k per layer against 46M), at `4 r H`
FLOPs a token, next to the ~`24 H^2` of the layer it stands in for. The importance weights still correct whatever difference remains.

Why parameters of their own rather than training the shared weights to be skippable: measured on SmolLM2-135M,
skipping its 8 cheapest layers, KL(mu_S || pi) held out on 12 prompts fell from 5.83 to 1.72 nats/token in 18
steps of rank-32 bridges (AdamW, lr 1e-3) with the policy unchanged, against 2.90 with the shared weights trained
at lr 1e-5, which also moved the policy (KL(pi_new || pi_0) 0.034); `benchmarks/bridges_vs_shared.py`. See
`robustness` for how they are trained.

Bridges compute in float32 whatever the model's compute dtype (their input is upcast, their output cast back):
they are tiny, and their updates are small.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class Bridge(nn.Module):
    """h -> h + up(down(rms_norm(h))): the low-rank stand-in for one skipped decoder layer."""

    def __init__(self, hidden_size: int, rank: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)  # starts as the plain skip

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.down(self.norm(hidden.float()))).to(hidden.dtype)


class SkipBridges(nn.Module):
    """A bridge for each of `layers` (the eligible ones), keyed by layer index."""

    def __init__(self, hidden_size: int, layers: Iterable[int], rank: int, eps: float = 1e-6):
        super().__init__()
        self.rank = rank
        self.bridges = nn.ModuleDict({str(i): Bridge(hidden_size, rank, eps) for i in layers})

    def covers(self, layer: int) -> bool:
        return str(layer) in self.bridges

    def __getitem__(self, layer: int) -> Bridge:
        return self.bridges[str(layer)]

    def plan(self, skip: Iterable[int], num_layers: int) -> list[tuple[str, int]]:
        """The decoder, in order, with layers `skip` bypassed: ("layer", i) for a kept layer, ("bridge", i) for a
        skipped one that has a bridge (a skipped layer without one is the identity and leaves no trace)."""
        skipped = set(skip)
        return [("bridge", i) if i in skipped else ("layer", i) for i in range(num_layers)
                if i not in skipped or self.covers(i)]


@contextmanager
def bridged(layers: list[nn.Module], final_norm: nn.Module, skip: Iterable[int],
            bridges: SkipBridges | None) -> Iterator[None]:
    """While inside, calling the decoder (whose layer list the caller has cut to the kept layers) applies the bridge
    of each skipped layer where that layer was: before the next kept layer, or before the final norm for skipped
    layers at the end. `layers` is the decoder's full layer list. Forward pre-hooks: this works for any
    family's own forward and for the dynamic KV cache, which never sees a bridge."""
    skipped = sorted(i for i in set(skip) if bridges is not None and bridges.covers(i))
    handles = []
    try:
        pending: list[int] = []
        for index, layer in enumerate(layers):
            if index in skipped:
                pending.append(index)
            elif pending:
                handles.append(layer.register_forward_pre_hook(_applying(bridges, pending), prepend=True))
                pending = []
        if pending:
            handles.append(final_norm.register_forward_pre_hook(_applying(bridges, pending), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _applying(bridges: SkipBridges, indices: list[int]):
    """A pre-hook that runs the bridges of `indices`, in order, on the module's first positional input."""

    def hook(_module, args):
        hidden = args[0]
        for index in indices:
            hidden = bridges[index](hidden)
        return (hidden, *args[1:])

    return hook
