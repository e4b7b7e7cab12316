"""Two reward functions in TRL's form, for recipes/examples/custom_reward.yaml.

Each receives the whole batch by keyword: the completions (and their prompts and token ids), every column of the
data set with one value per completion (here `max_words`, from examples/word_problems-*.jsonl), and `step`. Each
returns one number per completion, or None where it does not apply. `**kwargs` takes the arguments a function
does not use, so that the same function runs under nested-reft and under TRL's GRPOTrainer.
"""

import re

_STEP = re.compile(r"\d+\s*[-+*/x×]\s*\d+\s*=\s*\d+")  # a worked step such as "12 + 7 = 19"
_FINAL = re.compile(r"^####\s*\S", re.MULTILINE)


def within_budget(completions, max_words, **kwargs):
    """1.0 for a completion of at most its problem's `max_words` words, falling as budget / words past it."""
    rewards = []
    for completion, budget in zip(completions, max_words):
        words = len(completion.split())
        rewards.append(1.0 if words <= budget else budget / words)
    return rewards


def shows_work(completions, **kwargs):
    """1.0 when a completion that ends with a `####` answer shows at least one worked step before it, else 0.0;
    None (not applicable) when it has no final answer at all, which the math reward already scores."""
    rewards = []
    for completion in completions:
        final = _FINAL.search(completion)
        rewards.append(None if final is None else float(bool(_STEP.search(completion[: final.start()]))))
    return rewards
