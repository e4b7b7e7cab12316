"""Shared fixtures: tiny randomly initialised causal LMs (no download) and token-id prompts (no tokenizer).

Models are rebuilt per test from a fixed seed, so a test may change one freely. Weights are drawn with a
larger spread than the usual 0.02 so that next-token distributions are peaked: greedy choices then have
clear margins, and token-for-token comparisons do not hinge on float rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

VOCAB_SIZE = 128
NUM_LAYERS = 6
PAD_ID = 0

# Tiny models gain nothing from intra-op threads, and when other processes share the cores OpenMP's
# synchronisation makes each small op up to ~30x slower (measured: 4 s vs 120 s for the skipping and rollout
# tests under load). One thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)

TINY_SHAPE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def build_tiny(config_class: type, seed: int = 0, **overrides) -> PreTrainedModel:
    """A float32, eval-mode causal LM from `config_class(**TINY_SHAPE, **overrides)` with seeded weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**{**TINY_SHAPE, **overrides}), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_llama() -> PreTrainedModel:
    return build_tiny(LlamaConfig)


@pytest.fixture
def tiny_qwen2() -> PreTrainedModel:
    return build_tiny(Qwen2Config)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return build_tiny(LlamaConfig if request.param == "llama" else Qwen2Config)


@pytest.fixture
def tiny_prompts() -> list[list[int]]:
    """Token-id prompts of different lengths (so batches are left-padded), avoiding the pad/bos/eos ids."""
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(3, VOCAB_SIZE, (length,), generator=generator).tolist() for length in (5, 9, 3, 7)]



@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder, and 24 training rows for it (the trainer loads by path)."""
    from .tiny import write_examples, write_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_examples(root / "train.jsonl", 24)
