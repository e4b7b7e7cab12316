"""The training prompt stream: endless, seeded, reshuffled each epoch, resumable from a two-number cursor."""

from __future__ import annotations

import random

from nested_reft.data.rows import Example
from nested_reft.errors import UserError


class PromptStream:
    """Endless, seeded stream of training examples, reshuffled each epoch.

    The order of epoch e is a pure function of (seed, e), so the cursor (epoch, index) is the whole state and a
    run resumed at any step, an epoch boundary included, sees exactly the prompts an uninterrupted run would.
    """

    def __init__(self, examples: list[Example], seed: int):
        if not examples:
            raise UserError("data.train: no training examples")
        self.examples, self.seed = examples, seed
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[Example]:
        batch = []
        order = self._order(self.epoch)
        while len(batch) < n:
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            batch.append(self.examples[order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
