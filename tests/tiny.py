"""A tiny random Llama with a word-level tokenizer, saved as a Hugging Face folder, and data files for it.

The trainer, evaluate and bench load models by path like a user would, so their tests need a real folder
(config, safetensors, tokenizer) rather than an in-memory module.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(16)]
TARGET_WORD = "w5"


def write_tiny_model(folder: Path, num_layers: int = 4, seed: int = 0, extra_words: tuple[str, ...] = ()) -> Path:
    """Save a seeded 4-layer Llama (hidden 32) with a 19-token word-level tokenizer to `folder` (plus
    `extra_words` at the end of the vocabulary, e.g. "####" and digits to spell answers)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS, *extra_words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_examples(path: Path, n: int, seed: int = 0) -> Path:
    """`n` project-format rows whose questions are random word sequences (answers are irrelevant here)."""
    rng = random.Random(seed)
    rows = [{"id": f"tiny-{i}", "question": " ".join(rng.choices(WORDS, k=rng.randint(2, 5))) + f" w{i % 16}",
             "answer": str(i), "source": "tiny"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
