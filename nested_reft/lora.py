"""LoRA adapters through peft: attach them for training, the reference without them, adapter checkpoints.

`attach` injects LoRA modules into the transformers model itself (peft's `get_peft_model` wraps it, and the
wrapper is kept only for what peft does best: switching adapters off, saving and merging). The trainer keeps
training the same `model` object, so `model.model.layers` still lists the decoder layers, now with LoRA modules
inside them: the layer-skipped behavior view includes the adapters of every kept layer and leaves those of a
skipped layer out, exactly as it treats base weights. Every base weight is frozen, so only the adapters reach
the optimiser, gradient clipping and the gradient all-reduce.

With `objective.beta > 0` the frozen reference is the same model with its adapters disabled (`reference`),
not a second copy: the policy starts equal to it (LoRA's B starts at zero) and moves only through adapters.

A LoRA checkpoint folder is peft's adapter folder (`adapter_config.json`, `adapter_model.safetensors`) plus the
tokenizer and the trainer state; `PeftModel.from_pretrained(base, folder)` loads it, and `load_merged` (what
`models.load_model` calls for such a folder) gives the base with the adapters merged in.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nested_reft.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(path: Path) -> bool:
    """A peft adapter checkpoint: adapter_config.json and no full model config beside it."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path: Path) -> str:
    """The base model an adapter folder was trained on (`base_model_name_or_path`)."""
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UserError(f"model: cannot read '{path / ADAPTER_CONFIG}' ({exc})") from None
    if not isinstance(base, str) or not base:
        raise UserError(f"model: '{path / ADAPTER_CONFIG}' names no base_model_name_or_path")
    return base


class Adapters:
    """The LoRA adapters attached to a model being trained."""

    def __init__(self, peft_model: Any):
        self.peft_model = peft_model

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen reference policy: the base model, i.e. this model with every adapter switched off."""
        with self.peft_model.disable_adapter():
            yield self.peft_model.get_base_model()

    def save(self, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter folder. `state_dict` is a full state dict of the transformers model (gathered from
        shards); None saves the adapters' own tensors."""
        if state_dict is not None:  # peft expects its wrapper's keys, and keeps only the adapters' entries
            state_dict = {f"base_model.model.{key}": value for key, value in state_dict.items()}
        self.peft_model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def attach(model: nn.Module, cfg: Any, base: str, checkpoint: Path | None = None) -> Adapters:
    """Give `model` (modified in place) trainable LoRA adapters per `cfg` (the recipe's model.lora), or those
    of a checkpoint folder when resuming; every other parameter is frozen. `base` is recorded in the adapter
    config as the model the adapters apply to."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        peft_model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    else:
        target = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
        config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                            bias="none", task_type="CAUSAL_LM")
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:  # e.g. target modules not found in the model
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"model.lora: {reason}") from None
    peft_model.peft_config["default"].base_model_name_or_path = base
    return Adapters(peft_model)


def load_merged(base: nn.Module, folder: Path) -> nn.Module:
    """`base` with the adapters of `folder` merged into its weights: a plain transformers model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder).merge_and_unload()
