"""Checks that need more than the recipe but less than a model, run by the commands before any model loads.

The recipe validates itself when it loads (`nested_reft.recipe`). What it cannot know alone is checked here,
cheaply: the optional packages its trackers need, whether the device it names exists, the calibration profile
it points to, and, when the model's `config.json` is at hand (a local folder, a run directory, the embedded
model once converted), the skip settings against the model's depth. What needs the weights themselves is
left to the code that loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from nested_reft.errors import UserError
from nested_reft.models import EMBEDDED_ALIASES, cache_dir, resolve_device
from nested_reft.recipe import Recipe
from nested_reft.rundir import RunDir
from nested_reft.skipping import CALIBRATION_WEIGHTS_KEY, SkipSampler
from nested_reft.tracking import check_available


def check_training(recipe: Recipe) -> None:
    """Everything `train` can check about `recipe` before it loads data or a model (UserError otherwise)."""
    check_available(recipe.train.report_to)
    resolve_device(recipe.model.device)
    check_skipping(recipe)


def check_skipping(recipe: Recipe, ratios: list[float] | None = None) -> None:
    """The calibration profile is readable, and, when the model's depth can be read from its config, the skip
    settings fit it (`keep_first + keep_last`, `fixed` layer indices, the profile's depth). `ratios` (bench)
    replace the recipe's."""
    cfg = recipe.skipping
    if cfg.strategy == "calibrated":
        _check_calibration_file(cfg.calibration_file)
    num_layers = model_num_layers(recipe.model.name_or_path)
    if num_layers is None:
        return
    if ratios is None:
        SkipSampler.from_config(cfg, num_layers, recipe.run.seed)
    for ratio in ratios or []:
        SkipSampler(num_layers, ratio=ratio, keep_first=cfg.keep_first, keep_last=cfg.keep_last)


def model_num_layers(name_or_path: str) -> int | None:
    """The number of decoder layers from the model's `config.json`, or None when there is none at hand
    (a `.gguf` file, a hub id, the embedded model before its first conversion, a run without a checkpoint)."""
    folder = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_ALIASES:
        folder = cache_dir() / name_or_path
    elif (folder / "recipe.yaml").is_file() and (folder / "checkpoints").is_dir():
        latest = RunDir(folder).latest_checkpoint()
        if latest is None:
            return None
        folder = latest
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for section in (config, config.get("text_config")):  # multimodal configs nest the language model's
        if isinstance(section, dict) and isinstance(section.get("num_hidden_layers"), int):
            return section["num_hidden_layers"]
    return None


def _check_calibration_file(path: str | None) -> None:
    """The profile `calibrate-skips` wrote exists and has its per-layer weights (the depth is checked later)."""
    try:
        data = json.loads(Path(str(path)).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"skipping.calibration_file: {path}: no such file (write it with `nested-reft calibrate-skips`)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"skipping.calibration_file: cannot read '{path}' as JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get(CALIBRATION_WEIGHTS_KEY), dict):
        raise UserError(f"skipping.calibration_file: '{path}' has no \"{CALIBRATION_WEIGHTS_KEY}\" object "
                        "(expected the report written by `nested-reft calibrate-skips`)")
