"""Activation memory: gradient checkpointing of the decoder layers.

With checkpointing on, a decoder layer keeps only its input during the forward pass and recomputes its
activations during backward: the update's activation memory falls from every layer's to about one layer's,
for about one more forward pass per update. It applies in train mode with gradients enabled only, which is
exactly the update's full-model forward (`objective.completion_log_probs`; its LM-head chunks are checkpointed
there already). The sampler runs without gradients and in eval mode, so its KV cache is never dropped; layer
skipping swaps whole layer modules, which keep their checkpointing flag.

`auto` (the recipe default) is on with CUDA and off on CPU. On a GPU the update's activations are what does
not fit (GPU recipes: 16 sequences of up to 1024 tokens through 28 layers) and the recomputation is cheap next
to the rollouts; on CPU memory is rarely the limit and the extra forward is paid in full.
"""

from __future__ import annotations

import torch


def resolve_gradient_checkpointing(choice: bool | str, device: torch.device) -> bool:
    """`train.gradient_checkpointing` for `device`: auto -> on with CUDA, off on CPU; a bool is kept."""
    if choice == "auto":
        return device.type == "cuda"
    return bool(choice)


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn decoder-layer checkpointing (non-reentrant) on or off for a transformers causal LM."""
    # transformers 5 renamed the API (the old names warn); 4.x only has the old ones.
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def gradient_checkpointing_enabled(model: torch.nn.Module) -> bool:
    """Whether any decoder layer of the model checkpoints its activations."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())
