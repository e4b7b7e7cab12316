"""Checkpoints of a training run: the policy as a Hugging Face folder, and the trainer state that resumes it bit
for bit.

`checkpoints/step-N/` holds `config.json` + `model.safetensors` (the master weights, in the storage dtype; under
LoRA the adapter folder instead), the tokenizer, and `trainer_state.pt`: optimiser, scheduler, data cursor, skip
sampler and controller, fp16 loss scale, the skip bridges and their optimiser, and each rank's random number generators (CPU, and its CUDA device).

Loading maps every tensor to the CPU first (memory-mapped, so it costs page cache, not a copy per rank): a
checkpoint written by rank 0 from `cuda:0` would otherwise be restored onto `cuda:0` by every rank, ~12 GB of
AdamW state per rank for a 1.5B model, all on one GPU. The optimiser's `load_state_dict` then moves each state
to its own parameter's device.

A step draws from the data stream, the skip sampler and the RNG before it changes any weight. `snapshot` and
`restore` put those back, so that a step abandoned on a stop request leaves the state of the last finished step,
which is then what a checkpoint saves (`stopping`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nested_reft.data import PromptStream
from nested_reft.distributed import World
from nested_reft.guards import check_finite_parameters
from nested_reft.lora import Adapters
from nested_reft.parallel import Parallel
from nested_reft.precision import MasterWeights
from nested_reft.robustness import Robustness
from nested_reft.rundir import RunDir
from nested_reft.skipping import SkipSampler

TRAINER_STATE = "trainer_state.pt"


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The torch generators this process draws from: the CPU one, and the CUDA one of `device` (None on CPU)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    """Restore what `rng_state` returned (a CUDA state is restored on a CUDA device only)."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """`trainer_state.pt` of a checkpoint, every tensor on the CPU (see the module docstring)."""
    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", mmap=True, weights_only=False)


@dataclass
class TrainingState:
    """The parts of a run that change from step to step: what a checkpoint saves and a resume restores."""

    model: torch.nn.Module
    tokenizer: Any
    adapters: Adapters | None
    masters: MasterWeights
    policy: Parallel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: PromptStream
    sampler: SkipSampler
    world: World
    device: torch.device
    robustness: Robustness | None = None  # the skip bridges and their optimiser

    def save(self, run: RunDir, step: int, keep_last: int) -> None:
        """Checkpoint `step`: gathered on every rank (a collective), written atomically by rank 0."""
        optimizer_state = self.policy.optimizer_state_dict(self.optimizer)
        rng = self.world.gather_objects(rng_state(self.device))
        with self.masters.masters_in_model():
            check_finite_parameters(self.model, step)  # non-finite weights never reach a checkpoint
            model_state = self.policy.model_state_dict()

            def write(folder: Path) -> None:
                if self.adapters is not None:
                    self.adapters.save(folder, model_state)
                else:
                    self.model.save_pretrained(folder, state_dict=model_state, safe_serialization=True)
                self.tokenizer.save_pretrained(folder)
                torch.save({"step": step, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                            "data": self.stream.state_dict(), "sampler": self.sampler.state_dict(), "rng": rng,
                            "precision": self.masters.state_dict(),
                            "robustness": self.robustness.state_dict() if self.robustness else None},
                           folder / TRAINER_STATE)

            if self.world.is_main:
                run.save_checkpoint(step, write, keep_last=keep_last)

    def load(self, checkpoint: Path) -> int:
        """Restore everything but the weights (the model was loaded from the checkpoint); returns its step."""
        state = load_trainer_state(checkpoint)
        self.policy.load_optimizer_state_dict(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.masters.load_state_dict(state.get("precision", {}))
        self.stream.load_state_dict(state["data"])
        self.sampler.load_state_dict(state["sampler"])
        if self.robustness is not None and state.get("robustness"):
            self.robustness.load_state_dict(state["robustness"])
        set_rng_state(self._own(state), self.device)
        return state["step"]

    def _own(self, state: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """This rank's saved RNG state. A run resumed with another number of ranks gives every rank rank 0's
        (only dropout, which training disables, draws from them). Checkpoints before CUDA states were saved
        hold `torch_rng`: one CPU state, or one per rank."""
        saved = state.get("rng")
        if saved is None:
            old = state["torch_rng"]
            saved = [{"cpu": t} for t in old] if isinstance(old, list) else [{"cpu": old}]
        return saved[self.world.rank] if len(saved) == self.world.size else saved[0]

    def snapshot(self) -> dict[str, Any]:
        """What a step draws before it changes any weight: the data cursor, the skip sampler, the RNG."""
        return {"data": self.stream.state_dict(), "sampler": self.sampler.state_dict(),
                "rng": rng_state(self.device)}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Undo a step that was abandoned before its update: what it drew is drawn again on resume."""
        self.optimizer.zero_grad(set_to_none=True)
        self.stream.load_state_dict(snapshot["data"])
        self.sampler.load_state_dict(snapshot["sampler"])
        set_rng_state(snapshot["rng"], self.device)
