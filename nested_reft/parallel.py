"""Data-parallel training of one policy across the ranks of a `World`: `ddp` (replicas) or `fsdp` (FSDP2 shards).

The trainer sees one object, `Parallel`, whatever the strategy; in a world of one it is a thin pass-through and
nothing here changes a single-process run.

Why not `DistributedDataParallel`: the trainer skips the forward/backward of rows without signal (advantage 0),
so ranks run different numbers of micro-batches per step, possibly none. DDP's backward hooks all-reduce
inside every synchronised backward and would wait forever for a rank that has no backward to run. So `ddp`
here accumulates local gradients with no communication and then sums them with one bucketed all-reduce per
optimiser step (`sync_gradients`): the same bytes DDP sends, without DDP's overlap of communication with the
backward pass, and correct for any micro-batch counts. The sum (not the mean) is right because the loss
already divides by the *global* sequence and token counts.

`fsdp` shards every decoder layer and the rest of the model (embeddings, final norm, LM head) with FSDP2's
`fully_shard`. FSDP2 communicates inside forward (all-gather) and backward (reduce-scatter), so:
- the gradient passes run in lock-step: a rank with fewer micro-batches runs zero-weight dummy ones (`pad`),
  so every rank joins every all-gather and reduce-scatter; gradients are summed (divide factor 1);
- the log-probs run through a root module (`LogProbModel`) whose forward is the whole chunked computation,
  so the root's parameters are gathered once per micro-batch and the chunks of the LM head call no hooks;
- everything without gradients runs inside `gathered()`: the parameters of the layers needed are all-gathered
  once (the kept layers of this step's skip set, plus the root's) and stay gathered, so sampling, the
  per-layer cost probe and the lp_old / reference passes run as on a plain model, with no collective per
  decode step and no lock-step between ranks (their rollouts end at different steps). The skip view needs
  nothing else: `skip_layers` swaps `model.model.layers` for the kept FSDP layer modules, and a skipped
  layer is never called, hence never gathered. Gathering per decode step instead would all-gather every
  kept layer once per generated token, and force every rank to decode as many steps as the slowest.

Checkpoints: rank 0 receives the full (unsharded) model and optimiser state on CPU through
`torch.distributed.checkpoint.state_dict`, and writes the same Hugging Face folder a single process writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nested_reft.distributed import World
from nested_reft.objective import completion_log_probs
from nested_reft.sampling import SamplingParams
from nested_reft.skipping import decoder_layers

MODES = ("ddp", "fsdp")
BUCKET_NUMEL = 1 << 24  # elements per gradient all-reduce (64 MiB of float32), as DDP's default 25 MiB buckets


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser updates and clipping measures (only the adapters under LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


class LogProbModel(nn.Module):
    """The FSDP root: its forward is `completion_log_probs` of the wrapped causal LM, so a single root forward
    covers the decoder and every LM-head chunk (and their recomputation in backward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                params: SamplingParams, chunk_size: int) -> torch.Tensor:
        return completion_log_probs(self.model, input_ids, attention_mask, prompt_len, params, chunk_size)


class Parallel:
    """One policy trained across the ranks of `world` with strategy `mode` (`ddp` or `fsdp`)."""

    def __init__(self, model: nn.Module, world: World, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.world = model, world
        self.mode = mode if world.distributed else "single"
        self.root = LogProbModel(model)
        if self.mode == "fsdp":
            self._shard()
        elif self.mode == "ddp":
            # Replicas must start equal (DDP broadcasts too): every rank loaded the same checkpoint with the same
            # seed, and this makes it so whatever a backend's initialisation did.
            for p in trainable_parameters(model):
                dist.broadcast(p.data, src=0)

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def _shard(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.world.device.type, (self.world.size,))
        self.layers = list(decoder_layers(self.model))
        for layer in self.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.root, mesh=mesh)
        # FSDP2 makes the first module whose forward runs the root of every state below it. Sampling calls the
        # causal LM (and so a decoder layer) before the root ever runs forward: settle the root now.
        self.root._get_fsdp_state()._lazy_init()
        for module in [*self.layers, self.root]:
            # Sum, never average: the loss already divides by the global counts. Forcing SUM-type collectives
            # also keeps gloo working (it has no pre-multiplied sum).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)

    # -- forward / backward -------------------------------------------------------------------------------
    def log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                  params: SamplingParams, chunk_size: int) -> torch.Tensor:
        """Completion log-probs of the full policy (see `objective.completion_log_probs`)."""
        if self.sharded:
            return self.root(input_ids, attention_mask, prompt_len, params, chunk_size)
        return completion_log_probs(self.model, input_ids, attention_mask, prompt_len, params, chunk_size)

    def pad(self, batches: list[Any]) -> list[Any]:
        """`batches` followed by None (a dummy micro-batch) up to the global maximum count under FSDP, whose
        forward and backward passes are collectives; unchanged otherwise. A collective when sharded."""
        if not self.sharded:
            return batches
        longest = int(self.world.max(len(batches))[0])
        return batches + [None] * (longest - len(batches))

    @contextmanager
    def gathered(self, skip: Sequence[int] = ()) -> Iterator[None]:
        """Inside: the policy runs with no collectives (sharded: all but the `skip` layers are all-gathered once
        on entry and resharded on exit). For sampling and for every pass without gradients."""
        if not self.sharded:
            yield
            return
        skipped = set(skip)
        modules = [layer for i, layer in enumerate(self.layers) if i not in skipped]
        for layer in modules:
            layer.set_reshard_after_forward(False, recurse=False)
        try:
            for module in [*modules, self.root]:
                module.unshard()
            yield
        finally:
            for module in [*modules, self.root]:
                module.reshard()
            for layer in modules:
                layer.set_reshard_after_forward(True, recurse=False)

    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        """After the local backward passes: `ddp` sums every gradient over ranks (a rank without any backward
        contributes zeros); `fsdp` already reduce-scattered them in backward. Every rank must call it."""
        if self.mode != "ddp":
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[nn.Parameter] = []
        for p in params:
            bucket.append(p)
            if sum(q.numel() for q in bucket) >= BUCKET_NUMEL:
                _all_reduce_bucket(bucket)
                bucket = []
        if bucket:
            _all_reduce_bucket(bucket)

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip by the global gradient norm; returns it (sharded gradients: a collective over their shards)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # -- checkpoints --------------------------------------------------------------------------------------
    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Sharded: the full state dict on CPU on rank 0 (a collective; other ranks get {}). Otherwise None:
        the model's own tensors are complete and are saved as they are."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser state a resumed run loads (sharded: gathered in full to rank 0; a collective)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.root, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what `optimizer_state_dict` saved (sharded: each rank keeps its shard of the full state)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.root, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _all_reduce_bucket(params: list[nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks with one collective on a flat buffer."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def no_parallel(model: nn.Module) -> Parallel:
    """A single-process `Parallel` (for callers outside a distributed job, e.g. tests and benches)."""
    return Parallel(model, World(), "ddp")

