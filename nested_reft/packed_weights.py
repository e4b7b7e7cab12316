"""oneDNN-packed linear weights for bf16 rollouts on CPU.

A bf16 matmul on CPU runs in oneDNN, whose kernels read the weight in a blocked layout: given a plain weight, every
call first copies it into that layout. A decode step multiplies a few rows by every weight of the model, so that copy
is most of its matmul time (measured on a 2-core AVX512-BF16 EPYC, one thread, a 1536 x 576 bf16 weight: 288 us at 1
row and 198 us at 16 rows plain, 45 and 150 us packed). Weights do not change during a rollout, so `packed_linears`
packs each one once when the rollout starts and swaps the module's forward for the packed matmul until it ends.
Results are bit-identical to `F.linear` (the same oneDNN kernel, without the copy); packing costs one pass over the
weights per rollout.

Only plain bf16 CPU weights are packed: float32 matmuls use MKL, where a packed oneDNN kernel would change the
rounding (and so the sampler-vs-trainer agreement); sharded (DTensor) and other tensor subclasses are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn


def packable(linear: nn.Linear) -> bool:
    """Whether `linear`'s weight is one that `packed_linears` packs: a plain bf16 tensor on CPU, with oneDNN."""
    weight = linear.weight
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.layout == torch.strided
            and type(weight.data) is torch.Tensor and torch.backends.mkldnn.is_available())


@contextmanager
def packed_linears(modules: Iterable[nn.Module], rows: int) -> Iterator[int]:
    """Inside, every packable `nn.Linear` in `modules` multiplies with a packed copy of its weight (see the module
    docstring); yields how many were packed. `rows` is a hint for the blocking (the batch being decoded); any
    number of rows gives the same results. The weights must not change inside (a rollout's do not)."""
    linears = {id(m): m for module in modules for m in module.modules() if isinstance(m, nn.Linear) and packable(m)}
    try:
        for linear in linears.values():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
            linear.forward = partial(_packed_linear, packed, linear.bias)  # shadows the class's forward
        yield len(linears)
    finally:
        for linear in linears.values():
            linear.__dict__.pop("forward", None)


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
