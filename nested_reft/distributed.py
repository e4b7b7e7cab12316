"""The process group of a data-parallel job: set-up from torchrun's environment, rank helpers, reductions, failure.

`torchrun --nproc-per-node N -m nested_reft train RECIPE` starts N copies of the same command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (multi-node: one torchrun per node with `--nnodes`,
`--node-rank` or `--rdzv-endpoint`). `init` reads them and joins the group: gloo on CPU, nccl on CUDA (each
rank on GPU LOCAL_RANK). A plain `nested-reft train` is a world of one: every helper here is then the identity
and no collective runs, so a single process behaves exactly as before distributed training existed.

What every rank must agree on is decided before anything can differ: the world-size checks run before the
group is joined and before a model loads, so a bad recipe is the same one-line error on every rank, never a
rank waiting forever for a peer that has already exited.

Failure: every collective has the recipe's `train.distributed_timeout_s`. A rank that raises tears its group
down on the way out (`teardown`); with gloo its peers' pending collectives then fail at once ("connection
closed") instead of waiting for the timeout, and torchrun stops the remaining workers of a failed job in any
case. A collective that fails because of a peer becomes `PeerFailure`: one line, exit code 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nested_reft.errors import UserError

T = TypeVar("T")


class PeerFailure(UserError):
    """This rank stopped because another rank failed or a collective timed out: not bad input, but reported
    the same way (one line, no traceback unless --debug). The failing rank's own error names the cause."""

    exit_code = 1


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun); UserError when it is not a number."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment: {name}={value!r} is not an integer (set by torchrun)") from None


def check_world(prompts_per_step: int, world_size: int) -> None:
    """Whole prompt groups are split across ranks: the prompts of a step must divide evenly."""
    if prompts_per_step % world_size:
        raise UserError(
            f"train.prompts_per_step={prompts_per_step} does not divide by the world size {world_size}: every rank "
            f"takes the same number of whole prompt groups; use a multiple of {world_size}"
        )


@dataclass(frozen=True)
class World:
    """This process's place in the job. The default instance is a single process (every method is the identity)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes to the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: Sequence[T]) -> tuple[int, list[T]]:
        """(index of this rank's first item, its contiguous block of len(items) / size items)."""
        per_rank = len(items) // self.size
        start = self.rank * per_rank
        return start, list(items[start : start + per_rank])

    # -- reductions (all of them collectives: every rank must call them in the same order) -----------------
    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks, as float64 (exact for integer counts below 2**53)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def max(self, *values: float) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: Sequence[float], op: dist.ReduceOp) -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 in rank order (sizes along dim 0 may differ)."""
        if not self.distributed:
            return tensor
        is_bool = tensor.dtype == torch.bool
        local = (tensor.to(torch.uint8) if is_bool else tensor).to(self.device)  # gloo has no bool all-gather
        sizes = torch.tensor([local.shape[0]], dtype=torch.int64, device=self.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.size)]
        dist.all_gather(all_sizes, sizes)
        counts = [int(s) for s in all_sizes]
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        out = torch.cat([part[:n] for part, n in zip(parts, counts)]).to(tensor.device)
        return out.bool() if is_bool else out

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and hand its result to every rank. A UserError there is raised on every
        rank with the same one line, so no rank is left waiting for a peer that gave up."""
        if not self.distributed:
            return fn()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome = [("ok", fn())]
            except UserError as exc:
                outcome = [("error", str(exc))]
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            raise UserError(value)
        return value

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init(device: str, timeout_s: float) -> World:
    """Join the job torchrun started (a World of one when it did not); `device` is the recipe's model.device.

    gloo when the ranks compute on CPU, nccl on CUDA (rank r uses GPU LOCAL_RANK). `timeout_s` bounds every
    collective, so a rank that stops answering ends the job instead of hanging it.
    """
    size, rank, local_rank = env_world_size(), env_rank(), _env_int("LOCAL_RANK", 0)
    if size == 1:
        return World()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError("model.device: 'cuda' was requested but CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                            f"start at most that many processes per node (--nproc-per-node)")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=where)
    else:
        where = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, size=size, local_rank=local_rank, device=where)


def teardown(world: World) -> None:
    """Leave the group (a no-op for a world of one). After a failure this is what releases the peers."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because of another rank (closed connection, timeout, abort)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                                      "NCCL communicator was aborted", "ProcessGroup", "Socket Timeout")
    )


def peer_failure(world: World, exc: BaseException) -> PeerFailure:
    """The one line a rank reports when the job failed elsewhere."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return PeerFailure(f"rank {world.rank}/{world.size}: stopped because another rank failed or stopped answering "
                       f"(see that rank's error above; collective error: {first_line})")
