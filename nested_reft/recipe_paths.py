"""Where a recipe's paths point: the files a recipe reads are relative to the recipe's own folder.

A recipe names inputs (data files, a calibration profile, reward-function files, a model folder) that live beside
it, in a repository or a shared folder; it must mean the same files whichever folder it is run from. So, in a
recipe file, a relative path to an input is relative to the recipe's folder, and `load_recipe` makes it absolute
(the run's `recipe.yaml` records the absolute path, so a run directory resumes from anywhere). Two things stay
relative to the current folder: `run.output_dir` (outputs go where the command runs, as every training tool does)
and any value given with `--set` (typed in a shell, so relative to the shell's folder).

Which values are paths:
- `data.train`, `data.eval` (or their `source`): a name ending in .jsonl/.json/.csv/.parquet, or starting with
  `./` or `../`; presets, `arithmetic` and hub ids are names, not paths;
- `skipping.calibration_file`: always a path;
- `reward.functions[].name`: the file of `path/to/file.py:function`;
- `model.name_or_path`: a `.gguf` file, a name starting with `./` or `../`, or a folder that exists beside the
  recipe (else an alias, a hub id or a folder relative to the current folder, as before).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nested_reft.data import LOCAL_SUFFIXES
from nested_reft.rewards.user import is_file_ref, split_ref

_EXPLICIT = ("./", "../")


def resolve_recipe_paths(raw: dict[str, Any], folder: Path) -> None:
    """Make the input paths of a recipe file's raw mapping absolute against `folder`, in place. Values of the wrong
    shape are left for validation to report."""
    data = _section(raw, "data")
    for key in ("train", "eval"):
        spec = data.get(key)
        if isinstance(spec, dict):
            spec["source"] = _data_path(spec.get("source"), folder)
        else:
            data[key] = _data_path(spec, folder)
    skipping = _section(raw, "skipping")
    if isinstance(skipping.get("calibration_file"), str):
        skipping["calibration_file"] = _absolute(skipping["calibration_file"], folder)
    functions = _section(raw, "reward").get("functions")
    for function in functions if isinstance(functions, list) else []:
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and is_file_ref(name):
            file, attribute = split_ref(name)
            function["name"] = f"{_absolute(file, folder)}:{attribute}"
    model = _section(raw, "model")
    name = model.get("name_or_path")
    if isinstance(name, str) and (name.startswith(_EXPLICIT) or name.endswith(".gguf") or (folder / name).exists()):
        model["name_or_path"] = _absolute(name, folder)


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    section = raw.get(name)
    return section if isinstance(section, dict) else {}


def _data_path(spec: Any, folder: Path) -> Any:
    if isinstance(spec, str) and (spec.startswith(_EXPLICIT) or Path(spec).suffix.lower() in LOCAL_SUFFIXES):
        return _absolute(spec, folder)
    return spec


def _absolute(path: str, folder: Path) -> str:
    """`path` against `folder` (`~` expanded; an absolute path stays as it is), normalised."""
    return str((folder / Path(path).expanduser()).resolve())
