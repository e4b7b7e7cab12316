"""Turning questions into prompt token ids, the same way for train, evaluate, calibrate and bench."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from nested_reft.errors import UserError
from nested_reft.recipe import DataConfig


def encode_prompts(tokenizer: PreTrainedTokenizerBase, questions: list[str], cfg: DataConfig) -> list[list[int]]:
    """Token ids of each question as a prompt: wrapped in the chat template (with the recipe's system prompt)
    when the recipe asks for it, and left-truncated to `max_prompt_length` tokens so the end of the prompt,
    where the question and the generation cue are, is kept."""
    if cfg.chat_template and tokenizer.chat_template is None:
        raise UserError("data.chat_template: the model's tokenizer has no chat template; set it to false")
    prompts = []
    for question in questions:
        if cfg.chat_template:
            messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
            messages.append({"role": "user", "content": question})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = f"{cfg.system_prompt}\n\n{question}\n" if cfg.system_prompt else f"{question}\n"
        ids = tokenizer(text, add_special_tokens=not cfg.chat_template)["input_ids"]
        prompts.append(ids[-cfg.max_prompt_length :])
    return prompts


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config=None) -> set[int]:
    """Every token that ends a completion: the tokenizer's EOS and the generation config's (often a list)."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    if not ids:
        raise UserError("model: the tokenizer defines no EOS token; completions could never end")
    return ids
