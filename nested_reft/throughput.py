"""How close a step comes to the machine's limit: a matmul probe of the peak, and the model FLOPs of each part.

`bench --what train` divides each part's model FLOPs by its time and by the probed peak. Model FLOPs count the
useful arithmetic only (as MFU does): 2 per weight per token through a linear layer, attention's two products
over the context, 3x the forward for a forward and backward; neither recomputation (gradient checkpointing, the
LM head's chunks), nor padding, nor the embedding lookup. The peak is what a large square matmul in the compute
dtype reaches here, best of a few runs: a real, reachable limit for this dtype, threads and load, which small
decode matmuls (a few rows against every weight: memory-bound) cannot approach.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from nested_reft.packed_weights import packed_linears
from nested_reft.skipping import decoder_layers


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` [size x size] @ [size x size] matmuls in `dtype` on `device` (size 1536 on
    CPU, 8192 on CUDA), after one warm-up, through a linear layer with its weight packed as rollouts pack it
    (`packed_weights`: bf16 on CPU), so that the probe runs the fastest kernel the model does. Many short runs:
    the best one is the least disturbed by other processes on a shared machine."""
    size = size or (8192 if device.type == "cuda" else 1536)
    linear = nn.Linear(size, size, bias=False, device=device, dtype=dtype)
    x = torch.randn(size, size, device=device).to(dtype)
    seconds = []
    with torch.no_grad(), packed_linears([linear], size):
        for _ in range(repeats + 1):  # the first is a warm-up (allocation, kernel selection)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            linear(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    return 2 * size**3 / min(seconds[1:])


@dataclass(frozen=True)
class ModelFlops:
    """Per-token forward FLOPs of a decoder-only model's pieces."""

    layer: float  # one decoder layer's linear layers
    attention: float  # one layer's attention products per token of context
    head: float  # the LM head
    num_layers: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelFlops:
        layers = list(decoder_layers(model))
        linears = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(layer=2 * linears / len(layers), attention=4 * config.num_attention_heads * head_dim,
                   head=2 * model.get_output_embeddings().weight.numel(), num_layers=len(layers))

    def forward(self, tokens: float, context: float, layers: int, head_tokens: float) -> float:
        """FLOPs of `tokens` through `layers` decoder layers, attending over `context` tokens on average, and of
        `head_tokens` of them through the LM head."""
        return tokens * layers * (self.layer + self.attention * context) + head_tokens * self.head


def step_flops(flops: ModelFlops, prompt_lengths: list[int], completion_lengths: list[int], group_size: int,
               kept_layers: int) -> dict[str, float]:
    """Model FLOPs of one step's parts: `prefill` (each prompt once, `kept_layers` deep, the head at its last
    token), `decode` (every generated token through the kept layers and the head) and `update` (a forward and
    backward of every row through the full model, the head on completion tokens). Lengths are per row; rows come
    in groups of `group_size` sharing a prompt."""
    prompts = prompt_lengths[::group_size]
    prefill = sum(flops.forward(p, p / 2, kept_layers, 1) for p in prompts)
    decode = sum(flops.forward(c, p + c / 2, kept_layers, c) for p, c in zip(prompt_lengths, completion_lengths))
    update = 3 * sum(flops.forward(p + c, (p + c) / 2, flops.num_layers, c)
                     for p, c in zip(prompt_lengths, completion_lengths))
    return {"prefill": prefill, "decode": decode, "update": update}
