"""Mixed precision: the dtype the model computes in, and fp32 master weights so that no update is lost.

Two recipe fields, two roles:

- `model.dtype` is the *storage* dtype: the weights as loaded, held by the optimiser (the master weights) and
  saved in checkpoints;
- `model.mixed_precision` (`auto | no | bf16 | fp16`, accelerate's names) is the *compute* dtype of every
  forward and backward: rollouts, log-probs, evaluation.

`float32` + `bf16` (the recommended pairing where bf16 is native) computes in bf16 and keeps float32 masters:
the model's parameters are cast to bf16 *in place* (so the sampler, the loss and evaluation run the bf16
model with nothing re-cast per decode step), and `MasterWeights` keeps the float32 originals, which are what
AdamW updates (its states are float32 too). Gradients are added into the float32 master gradients after
every backward, clipping and the step happen on the masters, and the masters are written back to the bf16
model (rounded to nearest) after each step. An update of lr 1e-6 on a weight of 0.05 is 4e-5 of bf16's
resolution there (2^-12 ~ 2.4e-4): without masters it would round away every step; with them it accumulates
and reaches the bf16 weight once it is worth a bf16 step. `bfloat16` + anything is pure bf16 (weights and
optimiser in bf16, small updates lost): the user's explicit choice. Memory per parameter with masters:
2 B (bf16 weight) + 4 B (master) + 4 B (master grad) + 8 B (AdamW), against 4 + 4 + 8 in float32.

Log-softmax, log-probs, importance ratios, advantages and losses are float32 whatever the compute dtype:
`sampling.process_logits` upcasts logits before the softmax and the objective works on its float32 outputs.
The LM head's matmul itself runs in the compute dtype or in float32 (`model.head_dtype`): `compute` casts its
weight like the others (a float32 master is kept, as for every weight) and its bf16 logits are upcast before the
float32 log-softmax, in chunks of tokens (`objective.completion_log_probs`), so no [tokens, V] float32 tensor
exists at once; `float32` keeps the head's weight float32 and upcasts the hidden states instead.

fp16 needs loss scaling (its range is too small for gradients): `MasterWeights` then multiplies the loss by a
dynamic scale (halved and the step skipped when a gradient overflows, doubled after `growth_interval` clean
steps, as torch's GradScaler does). fp16 is accepted on CUDA only; bf16 has float32's range and needs none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nested_reft.compiled_decode import resolve_compile
from nested_reft.devices import resolve_device
from nested_reft.errors import UserError
from nested_reft.memory import resolve_gradient_checkpointing

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
HEAD_DTYPES = ("auto", "float32", "compute")
COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of CPUs that compute bf16 matmuls natively (Intel AMX, and AVX-512 BF16 on Intel/AMD).
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


# -- what the hardware does natively ----------------------------------------------------------------------------------


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16), by torch's probes or /proc/cpuinfo.

    Without either, torch emulates bf16 matmuls: measured on a 2-core AVX2 EPYC, a SmolLM2-135M forward and
    backward takes 25x longer in bf16 than in float32.
    """
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None),
              getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    if any(probe is not None and probe() for probe in probes):
        return True
    return bool(set(NATIVE_BF16_CPU_FLAGS) & _cpuinfo_flags())


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cuda_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes bf16 natively (compute capability 8.0, Ampere, and later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


# -- the policy -------------------------------------------------------------------------------------------------------


def resolve_mixed_precision(choice: str, device: torch.device) -> tuple[str, str | None]:
    """('no' | 'bf16' | 'fp16', a one-line notice or None) for the recipe's `choice` on `device`.

    `auto` is bf16 where the hardware computes it natively (a CUDA device with bf16, a CPU with AMX-BF16 or
    AVX512-BF16), else `no`, with a notice saying why. An explicit choice the device cannot run is a UserError
    (fp16 on CPU; bf16 on a CUDA device without it); explicit bf16 on a CPU that only emulates it runs, with a
    notice that it is slow. Cheap and model-free: callers resolve before anything is loaded.
    """
    if choice not in MIXED_PRECISION:
        raise UserError(f"model.mixed_precision: expected one of {', '.join(MIXED_PRECISION)}, found {choice!r}")
    cuda = device.type == "cuda"
    native = cuda_bf16(device) if cuda else cpu_native_bf16()
    if choice == "auto":
        if native:
            return "bf16", None
        where = "this CUDA device has no native bf16" if cuda else "this CPU has no AMX-BF16 or AVX512-BF16"
        return "no", f"mixed_precision auto: {where}; computing in float32"
    if choice == "fp16" and not cuda:
        raise UserError("model.mixed_precision: fp16 needs a CUDA device; on CPU use bf16 (or no)")
    if choice == "bf16" and cuda and not native:
        raise UserError("model.mixed_precision: this CUDA device has no native bf16; use fp16 or no")
    if choice == "bf16" and not native:
        return "bf16", ("mixed_precision bf16: this CPU has no AMX-BF16 or AVX512-BF16, so bf16 is emulated "
                        "(much slower than float32)")
    return choice, None


def resolve_head_dtype(choice: str, mode: str) -> str:
    """'float32' or 'compute': the dtype of the LM head's matmul for the recipe's `choice` under compute `mode`.

    `auto` is `compute`. Measured on SmolLM2-135M in bf16 on a 2-core AVX512-BF16 CPU (benchmarks/head_dtype.py,
    16 rows, one thread, interleaved): a decode step 1.17x faster (0.107 -> 0.092 s), a forward + backward of the
    log-probs 1.03-1.08x, and the sampler-vs-trainer mismatch mean |lp_b - lp_old| 0.019 -> 0.027 nats/token
    with its mean (the bias the KL estimate sees) unchanged at 0.003, against skip costs of >= 0.1 per layer.
    On Hopper a float32 matmul runs at a fraction of bf16's rate, so the choice is the same there. With
    `mode` 'no' there is nothing to choose: float32.
    """
    if choice not in HEAD_DTYPES:
        raise UserError(f"model.head_dtype: expected one of {', '.join(HEAD_DTYPES)}, found {choice!r}")
    if mode == "no":
        return "float32"
    return "compute" if choice == "auto" else choice


def describe(mode: str, storage_dtype: str, head_dtype: str = "float32") -> str:
    """The start-up line: what computes in which dtype and what the optimiser holds."""
    if mode == "no" or _DTYPE_NAMES[mode] == storage_dtype:
        return f"precision: {storage_dtype} compute and weights" + (
            " (pure low precision: small updates are lost)" if storage_dtype != "float32" else "")
    head = mode if head_dtype == "compute" else "float32"
    return f"precision: {mode} compute ({head} LM head), {storage_dtype} master weights and optimiser states"


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def resolve_runtime(recipe: Any) -> tuple[Any, list[str]]:
    """A copy of the recipe with its hardware-dependent `auto` values resolved for its device
    (`model.mixed_precision` -> no | bf16 | fp16, `model.head_dtype` -> float32 | compute, `rollout.compile` ->
    on | off, `train.gradient_checkpointing` -> true | false), and the lines to show at start: the precision, and
    the notice when a choice fell back or will be slow. UserError for a choice the device cannot run. Loads
    nothing, so it runs before any model does."""
    device = resolve_device(recipe.model.device)
    mode, notice = resolve_mixed_precision(recipe.model.mixed_precision, device)
    resolved = recipe.model_copy(deep=True)
    resolved.model.mixed_precision = mode
    resolved.model.head_dtype = resolve_head_dtype(recipe.model.head_dtype, mode)
    resolved.rollout.compile = resolve_compile(recipe.rollout.compile, device)
    resolved.train.gradient_checkpointing = resolve_gradient_checkpointing(recipe.train.gradient_checkpointing, device)
    return resolved, [describe(mode, recipe.model.dtype, resolved.model.head_dtype), *([notice] if notice else [])]


def keeps_fp32_head(model_cfg: Any) -> bool:
    """Whether a resolved recipe's model keeps its LM head in float32 (`model.head_dtype`)."""
    return model_cfg.head_dtype == "float32"


def cast_for_inference(model: torch.nn.Module, mode: str, *, fp32_head: bool = True) -> torch.nn.Module:
    """Cast the model to `mode`'s compute dtype in place for inference (no masters: nothing trains).

    See `cast_to_compute`; 'no' leaves the model as it is.
    """
    dtype = COMPUTE_DTYPES[mode]
    if dtype is not None:
        cast_to_compute(model, dtype, fp32_head=fp32_head)
    return model


def cast_to_compute(model: torch.nn.Module, dtype: torch.dtype, *,
                    fp32_head: bool = True) -> list[torch.nn.Parameter]:
    """Cast the model's floating-point parameters to `dtype` in place; returns those left in float32.

    Buffers keep their dtype (the rotary inverse frequencies must stay float32 for exact positions). With
    `fp32_head` the LM head keeps float32 weights (with a tied input embedding, that one weight) and computes
    float32 logits from upcast hidden states, and the embedding's output is cast down to `dtype`: bf16 logits
    carry ~3 significant digits (0.06 at a logit of 16), which measured on SmolLM2-135M was most of the
    sampler-vs-trainer log-prob mismatch (see benchmarks/precision_choice.py). The head is one matmul per
    token, so this costs little next to the decoder.
    """
    head = model.get_output_embeddings() if fp32_head and hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if head is not None else None
    kept = {id(p) for p in head.parameters()} if head is not None else set()
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and id(p) not in kept:
            p.data = p.data.to(dtype)
    if head is None:
        return []
    if not getattr(head, "_nested_reft_fp32", False):  # hooks once, even if the model is cast twice
        # The head's own dtype: float32 normally; bf16 when the weights were stored in bf16 (pure bf16).
        head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))
        if any(id(p) in kept for p in embedding.parameters()):  # tied: the embedding's output must be cast down
            embedding.register_forward_hook(lambda _module, _args, output: output.to(dtype))
        head._nested_reft_fp32 = True
    return [p for p in model.parameters() if id(p) in kept]


# -- master weights ---------------------------------------------------------------------------------------------------


@dataclass
class _LossScale:
    """GradScaler's dynamic loss scale, for fp16."""

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    clean_steps: int = 0


class MasterWeights:
    """The model computes in `mode`'s dtype; the optimiser updates master copies in the storage dtype.

    Construction casts the model's floating-point parameters to the compute dtype in place (`cast_to_compute`:
    the LM head stays float32 with `fp32_head`, and is then its own master) and keeps their previous tensors
    as the masters (no copy); frozen parameters (a LoRA base) are cast and need none. Use `params` (the
    trainable ones) for the optimiser, `backward(loss)` instead of
    `loss.backward()`, `clip_grad_norm_` on the masters, and `step(optimizer)`, which steps and writes the
    masters back into the model. Each backward's low-precision gradient is added into the master's float32
    gradient as soon as it is ready (a post-accumulate hook), so accumulation over micro-batches is float32.

    Pass-through when there is nothing to do (`mode` 'no', or parameters already in the compute dtype):
    `params` are the model's own and every method is the plain operation, except fp16 loss scaling, which
    applies whenever the compute dtype is float16.
    """

    def __init__(self, model: torch.nn.Module, mode: str, *, fp32_head: bool = True):
        if mode not in COMPUTE_DTYPES:
            raise ValueError(f"mode must be one of {tuple(COMPUTE_DTYPES)}, got {mode!r}")
        self.model, self.mode = model, mode
        self.compute_dtype = COMPUTE_DTYPES[mode]
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (model param, master)
        self.params: list[torch.nn.Parameter] = []
        self._hooks = []
        originals = {id(p): p.data for p in model.parameters()}
        if self.compute_dtype is not None:
            cast_to_compute(model, self.compute_dtype, fp32_head=fp32_head)
        for p in model.parameters():
            original = originals[id(p)]
            if not p.requires_grad:  # frozen (a LoRA base): computes in the compute dtype, never updated
                continue
            if p.dtype == original.dtype:  # not cast (already in the compute dtype, or the float32 head)
                self.params.append(p)
                continue
            master = torch.nn.Parameter(original)
            self._pairs.append((p, master))
            self.params.append(master)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._hook_for(master)))
        self._loss_scale = _LossScale() if self.compute_dtype == torch.float16 else None
        self._new_step()

    def _new_step(self) -> None:
        """Forget what was learnt about the gradients being accumulated (fp16): none is unscaled yet."""
        self._overflow: torch.Tensor | None = None  # once unscaled: > 0 on the device when a gradient overflowed
        self._found_inf: bool | None = None  # the same, once known on the host

    @property
    def active(self) -> bool:
        """Whether masters are kept (the model computes in a lower precision than the optimiser holds)."""
        return bool(self._pairs)

    @property
    def loss_scale(self) -> float:
        return self._loss_scale.scale if self._loss_scale else 1.0

    @staticmethod
    def _hook_for(master: torch.nn.Parameter):
        def to_master(p: torch.Tensor) -> None:
            # Move this backward's gradient into the float32 accumulator and free the low-precision one.
            if master.grad is None:
                master.grad = p.grad.to(master.dtype)
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return to_master

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, with the loss multiplied by the dynamic scale under fp16."""
        self._new_step()
        (loss * self._loss_scale.scale if self._loss_scale else loss).backward()

    def _unscale(self) -> None:
        """Under fp16, divide the gradients by the loss scale, once per step, and flag an overflow on the device.

        GradScaler's fused kernel does both in one pass over every gradient and never waits for the device, so
        that the step reads one flag instead of syncing once per tensor.
        """
        if not self._loss_scale or self._overflow is not None:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        self._overflow = torch.zeros(1, device=device)
        if grads:
            inverse = torch.full((1,), 1.0 / self._loss_scale.scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self._overflow, inverse)

    def clip_grad_norm_(self, max_norm: float, clip: Callable[[list, float], float] | None = None) -> float:
        """Unscale (fp16), then clip the masters' gradients to `max_norm` (with `clip(params, max_norm)` when
        given, e.g. a sharded model's); returns the total norm before clipping (inf or nan when a gradient
        overflowed: `step` then skips the update)."""
        self._unscale()
        norm = clip(self.params, max_norm) if clip else float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self._found_inf = not math.isfinite(norm)  # read anyway: `step` need not read the overflow flag
        return norm

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """`optimizer.step()` on the masters, then masters -> model (rounded to nearest in the compute dtype).

        Under fp16 a step whose gradients overflowed is skipped (returns False) and the scale halves; whether they
        did is one read of a device flag, or none after `clip_grad_norm_`, whose norm already said.
        """
        self._unscale()
        overflowed = self._loss_scale is not None and (
            self._found_inf if self._found_inf is not None else bool(self._overflow))
        self._new_step()
        if overflowed:
            optimizer.zero_grad(set_to_none=True)
            self._loss_scale.scale *= self._loss_scale.backoff_factor
            self._loss_scale.clean_steps = 0
            return False
        if self._loss_scale:
            self._loss_scale.clean_steps += 1
            if self._loss_scale.clean_steps % self._loss_scale.growth_interval == 0:
                self._loss_scale.scale *= self._loss_scale.growth_factor
        optimizer.step()
        self.copy_to_model()
        return True

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Write every master into its model parameter, rounded to the compute dtype."""
        for p, master in self._pairs:
            p.copy_(master)

    @contextmanager
    def masters_in_model(self) -> Iterator[torch.nn.Module]:
        """Temporarily make the model's parameters *be* the masters (storage dtype), e.g. to save them."""
        saved = [p.data for p, _ in self._pairs]
        try:
            for p, master in self._pairs:
                p.data = master.data
            yield self.model
        finally:
            for (p, _), data in zip(self._pairs, saved):
                p.data = data

    def save_pretrained(self, folder: Path, **kwargs: Any) -> None:
        """`model.save_pretrained` of the masters: the exact weights the optimiser holds, in the storage dtype
        (config.json's `dtype` says so), loadable with `from_pretrained` and resumed bit for bit."""
        with self.masters_in_model() as model:
            model.save_pretrained(folder, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The loss-scale state (fp16); empty otherwise. The masters themselves are saved as the checkpoint."""
        return dict(vars(self._loss_scale)) if self._loss_scale else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._loss_scale and state:
            self._loss_scale = _LossScale(**state)
