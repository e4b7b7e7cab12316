"""Non-finite guard: a NaN or inf loss or gradient must never reach the weights, nor the weights a checkpoint.

Three pieces, each used at one place in the training loop:
- `finite(loss, grad_norm)` before `optimizer.step()`: False means skip this update (zero the gradients,
  leave the weights as they are) and say so in the metrics row;
- `NonFiniteGuard.step_done(step, skipped_updates)` after each step: counts steps with a skipped update in a
  row and raises `NonFiniteError` once `train.max_nonfinite_steps` of them follow each other;
- `check_finite_parameters(model)` before writing a checkpoint: the last good checkpoint stays the latest.

`NonFiniteError` is a UserError (one line, no traceback) with its own exit code, 3: the run diverged, which
is neither bad input (2) nor a crash (1). Resuming from the last checkpoint with a lower learning rate, a
tighter `max_grad_norm` or float32 weights is the usual way out, and the message says so.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nested_reft.errors import UserError

EXIT_NONFINITE = 3
_ADVICE = "lower optimizer.lr or optimizer.max_grad_norm, or use model.dtype=float32, then resume from it with --resume"


class NonFiniteError(UserError):
    """The run produced non-finite values it cannot recover from. The CLI prints one line and exits 3."""

    exit_code = EXIT_NONFINITE


def finite(*values: float | torch.Tensor) -> bool:
    """Whether every value (python numbers or tensors of any shape) is finite: no NaN, no +-inf.

    One host sync for all tensors together, so it costs the same on GPU whatever the number of values.
    """
    tensors = [v.detach().float().reshape(-1) for v in values if isinstance(v, torch.Tensor)]
    numbers = [float(v) for v in values if not isinstance(v, torch.Tensor)]
    if not all(math.isfinite(n) for n in numbers):
        return False
    if not tensors:
        return True
    device = tensors[0].device
    return bool(torch.isfinite(torch.cat([t.to(device) for t in tensors])).all())


class NonFiniteGuard:
    """Counts consecutive steps that had to skip an update, and stops the run after `max_consecutive`.

    A step with at least one skipped update (`skipped_updates > 0`; with num_iterations > 1 a step has several
    updates) counts as one non-finite step; a step whose updates all went through resets the count.
    """

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.first_step: int | None = None  # the first step of the current run of non-finite steps

    def step_done(self, step: int, skipped_updates: int) -> None:
        """Record `step`; raise NonFiniteError when it is the `max_consecutive`-th non-finite step in a row."""
        if skipped_updates == 0:
            self.consecutive, self.first_step = 0, None
            return
        if self.consecutive == 0:
            self.first_step = step
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            steps = f"steps {self.first_step}-{step}" if self.first_step != step else f"step {step}"
            raise NonFiniteError(
                f"{steps}: the loss or gradient norm was not finite (NaN/inf) {self.consecutive} step(s) in a row "
                f"(train.max_nonfinite_steps={self.max_consecutive}); those updates were skipped and the last "
                f"checkpoint is intact; {_ADVICE}"
            )


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None when all are finite."""
    params = list(model.named_parameters())
    if not params:
        return None
    # One reduction per parameter but a single host sync; a model-sized temporary is never built.
    flags = torch.stack([torch.isfinite(p.detach()).all().to(params[0][1].device) for _, p in params])
    if bool(flags.all()):
        return None
    return params[int((~flags).nonzero()[0])][0]


def check_finite_parameters(model: nn.Module, step: int) -> None:
    """NonFiniteError naming the parameter when the model holds a NaN or inf: such weights are never written."""
    name = first_nonfinite_parameter(model)
    if name is not None:
        raise NonFiniteError(
            f"step {step}: parameter {name} holds NaN/inf; refusing to write a checkpoint of these weights "
            f"(the last checkpoint is intact); {_ADVICE}"
        )
