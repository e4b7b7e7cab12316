"""Experiment tracking: every metrics row also goes to TensorBoard and/or Weights & Biases (`train.report_to`).

`metrics.jsonl` stays the record; trackers get a copy of each row's numeric fields (nested mappings flattened
to `a/b`, booleans as 0/1; strings, lists and nulls left out; `step` is the x-axis). Neither tracker is a
dependency: each is an extra (`pip install 'nested-reft[tensorboard]'`, `'nested-reft[wandb]'`; in a clone,
`pip install -e '.[tensorboard]'`), and a recipe
naming a missing one fails with a one-line error before any model loads (`check_available`).

- TensorBoard: event files in `<run>/tensorboard/` (`tensorboard --logdir <run>/tensorboard`). A resumed run
  purges the events after its resume step, so redone steps are not shown twice.
- W&B: files in `<run>/wandb/`. It runs offline unless an API key is configured (`WANDB_API_KEY` or
  `wandb login`); `WANDB_MODE` and `WANDB_PROJECT` are honoured. A resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from nested_reft.errors import UserError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name in report_to -> module it needs (= the extra)
WANDB_PROJECT = "nested-reft"
WANDB_ID_FILE = "nested-reft-run-id"


def check_available(report_to: list[str]) -> None:
    """UserError naming the extra to install for the first tracker in `report_to` whose package is missing."""
    for name in report_to:
        module = TRACKERS.get(name)
        if module is None:
            raise UserError(f"train.report_to: unknown tracker {name!r}; expected one of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.report_to: {name} needs the `{module}` package; install it with: pip install "
                            f"'nested-reft[{module}]' (in a clone of the repository: pip install -e '.[{module}]')")


def scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric fields of a metrics row as {tag: float}; nested mappings become `outer/inner` tags.

    Booleans count as 0/1; NaN and inf are kept (a tracker should show a diverging run as it is); strings,
    lists (e.g. `skipped_layers`) and None are left out, as is the top-level `step`.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        tag = f"{prefix}{key}"
        if not prefix and key == "step":
            continue
        if isinstance(value, Mapping):
            out.update(scalars(value, prefix=f"{tag}/"))
        elif isinstance(value, (bool, int, float)):
            out[tag] = float(value)
    return out


class _Backend(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class Tracker:
    """Sends metrics rows to the trackers a recipe names; with none, `log` and `close` do nothing.

    Use as a context manager, or call `close()`: it flushes what the trackers buffer.
    """

    def __init__(self, backends: list[_Backend]):
        self._backends = backends

    @classmethod
    def open(cls, report_to: list[str], run_root: Path, config: dict[str, Any] | None = None, *,
             start_step: int = 0) -> Tracker:
        """Start the trackers for the run in `run_root`; `start_step` is the step the run resumes after (0:
        fresh), `config` the resolved recipe (shown by W&B)."""
        check_available(report_to)
        backends: list[_Backend] = []
        try:
            for name in report_to:
                if name == "tensorboard":
                    backends.append(_TensorBoard(Path(run_root) / "tensorboard", start_step))
                else:
                    backends.append(_WandB(Path(run_root), config or {}, start_step))
        except BaseException:
            for backend in backends:
                backend.close()
            raise
        return cls(backends)

    def log(self, row: Mapping[str, Any]) -> None:
        """Send one metrics row (it must have an integer `step`)."""
        if not self._backends:
            return
        values, step = scalars(row), int(row["step"])
        for backend in self._backends:
            backend.log(values, step)

    def close(self) -> None:
        for backend in self._backends:
            backend.close()
        self._backends = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _TensorBoard:
    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events at or after the first redone step that an earlier attempt had written.
        self._writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # one row per step: flushing keeps the events of a killed run

    def close(self) -> None:
        self._writer.close()


class _WandB:
    def __init__(self, run_root: Path, config: dict[str, Any], start_step: int):
        import wandb

        folder = run_root / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / WANDB_ID_FILE
        if start_step and id_file.is_file():  # a resumed run continues its W&B run
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n", encoding="utf-8")
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=run_root.name,
                               dir=str(run_root), config=config, id=run_id, resume="allow", mode=wandb_mode())
        # Our step is a metric of its own: W&B's internal step only ever increases, and a resumed run redoes steps.
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log({**values, "step": step})

    def close(self) -> None:
        self._run.finish()


def wandb_mode() -> str:
    """`WANDB_MODE` when set; else "online" with an API key configured (env or `wandb login`), else "offline"."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"
