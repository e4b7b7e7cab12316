"""The run directory: everything one run leaves behind, written so that a crash never leaves it half-written.

    <run>/recipe.yaml           the resolved recipe (what actually ran)
    <run>/metrics.jsonl         one JSON object per line, append-only
    <run>/reports/*.json        calibration, evaluation and bench reports
    <run>/rollouts/step-N.jsonl sampled completions
    <run>/checkpoints/step-N/   Hugging Face checkpoints + trainer state
    <run>/checkpoints/latest    a one-line file naming the newest checkpoint folder
    <run>/tensorboard/, wandb/  experiment-tracker files (when `train.report_to` names them)

Every file is written to a temporary sibling and renamed into place (`os.replace` is atomic on POSIX), and a
checkpoint folder is assembled under a temporary name and renamed once complete. A disk that fills up while
writing is a one-line UserError, and what was there before stays intact.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nested_reft.errors import UserError

LATEST = "latest"
# What a run directory may hold: `--overwrite` deletes a folder only when it holds nothing else.
RUN_LAYOUT = frozenset({"recipe.yaml", "metrics.jsonl", "reports", "rollouts", "checkpoints", "tensorboard", "wandb"})
# Written into a run's reports/ by the commands that measure its model before it trains (calibrate-skips' default
# --out, which `skipping.calibration_file` then names; bench's default --report): `--overwrite` keeps them.
PRE_RUN_REPORTS = ("calibration.json", "bench.json")
_TEMPORARY = re.compile(r"\..+\.tmp")  # atomic_write_text's leftovers after a crash
_STEP = re.compile(r"(?:step|eval-step)-(\d+)(?:\.jsonl|\.json)?")
_NEARLY_FULL_BYTES = 1 << 20


def ordinary_mode(*, folder: bool = False) -> int:
    """The mode `open` or `mkdir` would give a new file or folder (0644 / 0755 under the usual umask 022).
    `tempfile` creates owner-only entries (0600 / 0700): what it makes to be renamed into place gets this mode, so
    that data, recipes and models are readable by a teammate or by a serving process under another user."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the complete new one, with the mode of
    an ordinary new file.

    A write the file system refuses (full disk, read-only, a file where a folder should be) is a UserError
    naming the path; the old file, if any, is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{path}: cannot write ({_broken_link(path.parent) or _reason(e)})") from None
    try:
        os.fchmod(fd, ordinary_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write ({_reason(e)}); the previous file is unchanged") from None
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def ensure_writable(path: Path, what: str, *, folder: bool = False) -> None:
    """UserError (naming `what`, e.g. "--report" or "run.output_dir") unless `path` can be written: a file
    (`folder=False`) or a folder whose missing parents can be created. Called before any model loads, so that a
    bad output path costs a second rather than a run. Creates nothing: it probes with a temporary entry."""
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise UserError(f"{what} {path}: is a folder; expected a file path")
    if path.exists() and not path.is_dir() and folder:
        raise UserError(f"{what} {path}: is a file; expected a folder")
    target = path if folder else path.parent
    if broken := _broken_link(target):
        raise UserError(f"{what} {path}: cannot write ({broken})")
    existing = target
    while not existing.exists():  # the nearest existing ancestor must be a folder we can write in
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path}: cannot create folder {target} ({existing} is a file)")
    try:
        if existing == target:
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".nested-reft-probe-", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".nested-reft-probe-", suffix=".tmp"))
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write in {existing} ({_reason(e)})") from None


def _broken_link(folder: Path) -> str | None:
    """Why `folder` cannot be created, if it or a missing ancestor is a symbolic link to nothing (mkdir would only
    say "File exists"); None otherwise. Only missing paths are looked at: below a broken link nothing exists."""
    while not folder.exists() and folder != folder.parent:
        if folder.is_symlink():
            return f"{folder} is a symbolic link to {os.readlink(folder)}, which does not exist"
        folder = folder.parent
    return None


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether `error` (from writing into `folder`) means the disk or quota is full. torch.save reports a full
    disk as an unrelated stream error, so a nearly full file system counts too."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in ("No space left on device", "Disk quota exceeded", "os error 28")):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def step_of(path: Path) -> int:
    """The step in a `step-N` checkpoint folder, `rollouts/step-N.jsonl` or `eval-step-N.json` name."""
    match = _STEP.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a step-N name")
    return int(match.group(1))


class RunDir:
    """One run's folder. Create it with `RunDir.open`, which enforces the resume/overwrite rules."""

    def __init__(self, root: Path):
        self.root = Path(root)

    recipe_path = property(lambda self: self.root / "recipe.yaml")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    reports_dir = property(lambda self: self.root / "reports")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    rollouts_dir = property(lambda self: self.root / "rollouts")
    tensorboard_dir = property(lambda self: self.root / "tensorboard")
    wandb_dir = property(lambda self: self.root / "wandb")

    @classmethod
    def open(cls, root: Path, recipe_yaml: str, *, resume: bool = False, overwrite: bool = False) -> RunDir:
        """Prepare `root` for a run of the recipe whose resolved YAML is `recipe_yaml`.

        - a missing or empty folder (or one holding only `reports/`) becomes a fresh run;
        - a run that never produced a metric or checkpoint (it failed while starting) is reused;
        - `overwrite` replaces a run, but only a nested-reft run directory (`recipe.yaml` and nothing outside
          the run layout): any other folder, the working directory say, is an error and is never touched. The
          reports measured before the run (`PRE_RUN_REPORTS`, e.g. the calibration profile) stay;
        - `resume` continues the run from its latest checkpoint: whatever was logged after that checkpoint
          (metric rows, rollouts, eval reports) is dropped, since those steps run again. With no checkpoint
          yet, it starts over with all of that dropped. The recipe may differ (e.g. more steps);
        - a run with results, whatever its recipe, is never silently appended to or replaced: without
          `resume` or `overwrite` it is an error.

        Problems with the folder itself (a file in the way, no permission, full disk) are UserErrors too, all
        found before any model is loaded.
        """
        if resume and overwrite:
            raise UserError("--resume and --overwrite are mutually exclusive")
        run = cls(root)
        ensure_writable(run.root, "run.output_dir", folder=True)
        contents = {p.name for p in run.root.iterdir()} if run.root.is_dir() else set()
        exists = bool(contents - {"reports"})
        if exists and not run.is_run_dir():
            strays = ", ".join(sorted(run.strays())[:3]) or "no recipe.yaml"
            action = "--overwrite only replaces one" if overwrite else "choose another run.output_dir"
            raise UserError(f"{run.root}: not a nested-reft run directory (it holds {strays}); {action}")
        if resume and not exists:
            raise UserError(f"{run.root}: nothing to resume (no run there); drop --resume to start a new run")
        if exists and overwrite:
            run._remove_layout()
        elif exists and not resume and run.has_results():
            same = run.recipe_path.read_text(encoding="utf-8") == recipe_yaml
            what = "a run with results" if same else "a run of a different recipe"
            raise UserError(f"{run.root}: holds {what}; pass --resume to continue it or --overwrite to replace it")
        try:
            for d in (run.root, run.reports_dir, run.checkpoints_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run.output_dir {run.root}: cannot create it ({_reason(e)})") from None
        atomic_write_text(run.recipe_path, recipe_yaml)
        if resume:
            latest = run.latest_checkpoint()
            run.truncate_metrics(after_step=step_of(latest) if latest is not None else 0)
        return run

    def is_run_dir(self) -> bool:
        """Whether the folder holds `recipe.yaml` and nothing outside the run layout (what --overwrite may delete)."""
        return self.recipe_path.is_file() and not self.strays()

    def strays(self) -> list[str]:
        """Entries of the folder that are not part of a run directory."""
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.name not in RUN_LAYOUT and not _TEMPORARY.fullmatch(p.name)]

    def _remove_layout(self) -> None:
        """Delete the run's own entries (never anything else; the folder itself stays), but the reports that
        `calibrate-skips` and `bench` wrote before the run (`PRE_RUN_REPORTS`): they are its inputs, not its results."""
        for entry in self.root.iterdir():
            if entry == self.reports_dir and entry.is_dir() and not entry.is_symlink():
                for report in entry.iterdir():
                    if report.name not in PRE_RUN_REPORTS:
                        _remove(report)
            else:
                _remove(entry)

    def has_results(self) -> bool:
        """Whether the run logged a metric or saved a checkpoint (then it is worth protecting)."""
        logged = self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0
        return logged or bool(self.checkpoints())

    # -- metrics -----------------------------------------------------------------------------------------------
    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one JSON line. A single small write+fsync: a crash loses at most the line being written."""
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise UserError(f"{self.metrics_path}: cannot append a metrics row ({_reason(e)})") from None

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
        """Drop everything logged after `after_step`: metric rows, rollouts and periodic eval reports (a resumed
        run redoes those steps and logs them again; 0 drops them all)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        if self.metrics_path.exists() or kept:
            atomic_write_text(self.metrics_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        stale = [*self.rollouts_dir.glob("step-*.jsonl"), *self.reports_dir.glob("eval-step-*.json")]
        for path in stale:
            if _STEP.fullmatch(path.name) and step_of(path) > after_step:
                path.unlink()

    def write_report(self, name: str, obj: Any) -> Path:
        path = self.reports_dir / f"{name}.json"
        atomic_write_json(path, obj)
        return path

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep_last: int | None = None) -> Path:
        """Build `checkpoints/step-N/` atomically: `write(tmp_dir)` fills a temporary folder, which is then
        renamed into place, and only then is `latest` moved to it.

        `keep_last` prunes older checkpoints: of those at steps <= `step`, the newest `keep_last` stay (the new one
        among them, so `latest` never dangles); checkpoints of later steps (left by a run that got further before
        it was resumed from an earlier one) are not counted and are replaced when their step comes again. A full
        disk is a UserError; the half-written folder is removed and the previous checkpoint is intact.
        """
        final = self.checkpoints_dir / f"step-{step}"
        try:
            tmp = Path(tempfile.mkdtemp(dir=self.checkpoints_dir, prefix=f".step-{step}."))
            tmp.chmod(ordinary_mode(folder=True))
        except OSError as e:
            raise self._write_failed(step, e) from None
        try:
            write(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException as e:
            disk_full = isinstance(e, Exception) and _is_disk_full(e, self.checkpoints_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            if disk_full or isinstance(e, OSError):
                raise self._write_failed(step, e, disk_full) from None
            raise
        atomic_write_text(self.checkpoints_dir / LATEST, final.name + "\n")
        if keep_last:
            done = [c for c in self.checkpoints() if step_of(c) <= step]
            for old in done[:-keep_last]:
                shutil.rmtree(old)
        return final

    def _write_failed(self, step: int, error: BaseException, disk_full: bool = False) -> UserError:
        reason = "no space left on device" if disk_full else _reason(error) if isinstance(error, OSError) else str(error)
        previous = self.latest_checkpoint()
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        return UserError(f"{self.checkpoints_dir}: cannot write checkpoint step-{step} ({reason}); {kept}; "
                         "free space, then continue with --resume")

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.exists():
            return []
        done = [p for p in self.checkpoints_dir.glob("step-*") if p.is_dir() and _STEP.fullmatch(p.name)]
        return sorted(done, key=step_of)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names, or None when the run has none yet. Should `latest` be missing while
        complete checkpoints exist (a crash between the rename and the pointer update), the newest is used."""
        pointer = self.checkpoints_dir / LATEST
        if not pointer.exists():
            done = self.checkpoints()
            return done[-1] if done else None
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
