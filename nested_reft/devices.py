"""The device a command runs on: resolving the recipe's `model.device`.

Kept apart from `models` (which loads) and `precision` (which decides dtypes) because both need it before any
model exists: precision resolves `auto` choices for the device, and loading moves the model there.
"""

from __future__ import annotations

import torch

from nested_reft.errors import UserError


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; an explicit device must exist on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', found '{device}'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device: '{device}' was requested but CUDA is not available on this machine; use 'cpu' or 'auto'"
        )
    return resolved

