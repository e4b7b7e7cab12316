"""The device a command runs on: resolving the recipe's `model.device`, and the settings that device wants.

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


def use_tf32(device: torch.device) -> None:
    """On a CUDA device, let float32 matmuls and cuDNN convolutions run on TF32 tensor cores; elsewhere nothing.

    What stays float32 on a GPU is mostly the LM head under mixed precision (`precision.cast_to_compute`; for
    Qwen2.5-1.5B's tied head a 1536 x 151936 matmul per token) and whole float32 runs. With TF32 off, torch's
    default, an H100 computes those at about 1/15 of its bf16 rate. TF32 keeps float32's range and rounds the
    inputs to a 10-bit mantissa, as bf16 compute already does to everything else, with float32 accumulation.

    The switch is process-wide and CUDA-only: CPU matmuls (oneDNN's own fp32 precision) are left alone, so a
    CPU run computes exactly as before. The legacy flags are used rather than `fp32_precision = "tf32"`:
    torch refuses `torch.get_float32_matmul_precision()`, which inductor calls, once the new API has been used.
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True  # = torch.set_float32_matmul_precision("high") for CUDA only
    torch.backends.cudnn.allow_tf32 = True  # torch's default; set in case a caller turned it off
