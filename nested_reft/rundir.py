"""The run directory: everything one run leaves behind, written so that a crash never leaves it half-written.

    <run>/recipe.yaml           the resolved recipe (what actually ran)
    <run>/metrics.jsonl         one JSON object per line, append-only
    <run>/reports/*.json        calibration, evaluation and bench reports
    <run>/rollouts/step-N.jsonl sampled completions
    <run>/checkpoints/step-N/   Hugging Face checkpoints + trainer state
    <run>/checkpoints/latest    a one-line file naming the newest checkpoint folder

Every file is written to a temporary sibling and renamed into place (`os.replace` is atomic on POSIX), and a
checkpoint folder is assembled under a temporary name and renamed once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nested_reft.errors import UserError

LATEST = "latest"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class RunDir:
    """One run's folder. Create it with `RunDir.open`, which enforces the resume/overwrite rules."""

    def __init__(self, root: Path):
        self.root = Path(root)

    recipe_path = property(lambda self: self.root / "recipe.yaml")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    reports_dir = property(lambda self: self.root / "reports")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    rollouts_dir = property(lambda self: self.root / "rollouts")

    @classmethod
    def open(cls, root: Path, recipe_yaml: str, *, resume: bool = False, overwrite: bool = False) -> RunDir:
        """Prepare `root` for a run of the recipe whose resolved YAML is `recipe_yaml`.

        - a missing or empty folder becomes a fresh run;
        - `overwrite` deletes whatever was there and starts fresh;
        - `resume` requires an existing run and keeps it (the recipe may differ, e.g. more steps);
        - a folder holding the same recipe, or a run that never produced a metric or checkpoint (it failed
          while starting), is reused;
        - anything else is an error: a different run is never silently replaced.
        """
        if resume and overwrite:
            raise UserError("--resume and --overwrite are mutually exclusive")
        run = cls(root)
        # A folder holding only reports (calibrate-skips writes there before the first training run) is fresh.
        contents = {p.name for p in run.root.iterdir()} if run.root.is_dir() else set()
        exists = bool(contents - {"reports"})
        if exists and not run.recipe_path.exists() and not overwrite:
            raise UserError(f"{run.root}: exists and is not a nested-reft run directory; choose another run.output_dir")
        if resume and not exists:
            raise UserError(f"{run.root}: nothing to resume (no run there); drop --resume to start a new run")
        if exists and overwrite:
            shutil.rmtree(run.root)
        elif exists and not resume and run.has_results() and run.recipe_path.read_text(encoding="utf-8") != recipe_yaml:
            raise UserError(
                f"{run.root}: holds a run of a different recipe; pass --resume to continue it or --overwrite to replace it"
            )
        for d in (run.root, run.reports_dir, run.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.recipe_path, recipe_yaml)
        return run

    def has_results(self) -> bool:
        """Whether the run logged a metric or saved a checkpoint (then it is worth protecting)."""
        return self.metrics_path.exists() or bool(self.checkpoints())

    # -- metrics -----------------------------------------------------------------------------------------------
    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one JSON line. A single small write+fsync: a crash loses at most the line being written."""
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete metric rows (a torn last line from a crash is ignored)."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after `after_step` (a resumed run redoes those steps and logs them again)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def write_report(self, name: str, obj: Any) -> Path:
        path = self.reports_dir / f"{name}.json"
        atomic_write_json(path, obj)
        return path

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep_last: int | None = None) -> Path:
        """Build `checkpoints/step-N/` atomically: `write(tmp_dir)` fills a temporary folder, which is then
        renamed into place, and only then is `latest` moved to it. Older checkpoints beyond `keep_last` go."""
        final = self.checkpoints_dir / f"step-{step}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints_dir, prefix=f".step-{step}."))
        try:
            write(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.checkpoints_dir / LATEST, final.name + "\n")
        if keep_last:
            for old in self.checkpoints()[:-keep_last]:
                shutil.rmtree(old)
        return final

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.exists():
            return []
        done = [p for p in self.checkpoints_dir.glob("step-*") if p.is_dir()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names, or None when the run has none yet."""
        pointer = self.checkpoints_dir / LATEST
        if not pointer.exists():
            return None
        path = self.checkpoints_dir / pointer.read_text(encoding="utf-8").strip()
        if not path.is_dir():
            raise UserError(f"{pointer}: names {path.name}, which does not exist")
        return path


def resolve_model_path(spec: str) -> str:
    """Map a run directory to its latest checkpoint; anything else (a folder, a file, an alias) is returned as is."""
    path = Path(spec)
    if (path / "recipe.yaml").is_file() and (path / "checkpoints").is_dir():
        latest = RunDir(path).latest_checkpoint()
        if latest is None:
            raise UserError(f"{path}: this run directory has no checkpoint yet")
        return str(latest)
    return spec
