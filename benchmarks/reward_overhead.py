"""What a user's reward function adds to a training step: called in a reward worker process (as training does)
against called in the trainer's own process, on the quickstart's batch.

The batch is the quickstart's: 4 prompts x 4 completions of up to 96 tokens (--prompts, --generations,
--tokens), questions and a max_words column from examples/word_problems-train.jsonl, completions of ~70 words.
The functions are examples/rewards.py's two (within_budget, shows_work), scored through `RewardFunctions` as a
step scores them (arguments built, results checked), once with the worker pool and once with the same functions
called in this process. The first call, which starts a worker and imports the file there, is reported apart:
a run pays it once. Usage:

    python benchmarks/reward_overhead.py [--repeats 200] [--prompts 4] [--generations 4] [--tokens 96]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from nested_reft.data import load_examples
from nested_reft.rewards import user
from nested_reft.rewards.functions import Completions, RewardFunction, RewardFunctions

REPO = Path(__file__).resolve().parent.parent
FILE = REPO / "examples" / "rewards.py"
NAMES = ("within_budget", "shows_work")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per completion")
    args = parser.parse_args()

    examples = load_examples(str(REPO / "examples" / "word_problems-train.jsonl"), split="train",
                             limit=args.prompts, seed=0)
    rng = random.Random(0)
    words = "so she has 12 + 7 = 19 apples and then gives away 4 of them which leaves".split()
    rows = [e for e in examples for _ in range(args.generations)]
    texts = [" ".join(rng.choices(words, k=int(args.tokens * 0.75))) + "\n#### 15" for _ in rows]
    ids = [[rng.randrange(49152) for _ in range(args.tokens)] for _ in rows]
    batch = Completions(texts, ids, rows, 1, "step 1")

    in_worker = RewardFunctions([RewardFunction(name, f"{FILE}:{name}", 1.0, {}) for name in NAMES])
    in_process = RewardFunctions([RewardFunction(name, f"{FILE}:{name}", 1.0, {}, local=user.resolve(f"{FILE}:{name}"))
                                  for name in NAMES])
    started = time.perf_counter()
    in_worker(batch)  # starts a worker and imports the file there: once per run
    first = time.perf_counter() - started
    assert in_worker(batch) == in_process(batch)

    print(f"batch: {len(rows)} completions of {args.tokens} tokens; functions: {', '.join(NAMES)} ({FILE.name})")
    print(f"first call in a worker (start-up and import, once per run): {first * 1e3:.0f} ms")
    for label, rewards in (("worker pool", in_worker), ("in-process", in_process)):
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            rewards(batch)
            seconds.append(time.perf_counter() - started)
        seconds.sort()
        print(f"{label:>12}: median {statistics.median(seconds) * 1e3:.2f} ms per step, "
              f"p95 {seconds[int(0.95 * len(seconds))] * 1e3:.2f} ms ({args.repeats} steps)")


if __name__ == "__main__":
    main()
