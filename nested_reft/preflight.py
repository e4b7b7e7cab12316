"""Checks that need more than the recipe but less than a model, run by the commands before any model loads.

The recipe validates itself when it loads (`nested_reft.recipe`). What it cannot know alone is checked here,
cheaply: the optional packages its trackers need, whether the device it names exists, the calibration profile
it points to, its reward functions (a user's is imported in a reward worker), and, when the model's `config.json` is at hand (a local folder, a run directory, the embedded
model once converted), the skip settings against the model's depth. What needs the weights themselves is
left to the code that loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from nested_reft.distributed import env_world_size
from nested_reft.errors import UserError
from nested_reft.devices import resolve_device
from nested_reft.models import EMBEDDED_ALIASES, cache_dir
from nested_reft.recipe import Recipe
from nested_reft.rewards.functions import RewardFunctions
from nested_reft.rundir import RunDir
from nested_reft.skip_control import LayerCosts
from nested_reft.skipping import COST_AWARE, SkipSampler
from nested_reft.tracking import check_available


def check_training(recipe: Recipe) -> None:
    """Everything `train` can check about `recipe` before it loads data or a model (UserError otherwise)."""
    check_available(recipe.train.report_to)
    check_parallel(recipe, env_world_size())
    check_skipping(recipe)
    check_rewards(recipe)


def check_rewards(recipe: Recipe, max_completion_length: int | None = None) -> None:
    """The reward functions resolve: built-ins' settings fit the completion limit (`max_completion_length`, default
    the recipe's), and users' files and functions import, in a reward worker (which keeps them loaded for the run)."""
    RewardFunctions.from_config(recipe.reward, max_completion_length or recipe.rollout.max_completion_length)


def check_parallel(recipe: Recipe, world_size: int) -> None:
    """The rollout engine fits the data-parallel strategy. CUDA graphs replay reads of fixed parameter addresses,
    while FSDP gathers each kept layer into new storage for every rollout: the graphs would be recaptured every
    step, with all-gathers inside them. The static cache itself runs under FSDP eagerly."""
    device = resolve_device(recipe.model.device)
    if (world_size > 1 and recipe.train.parallel == "fsdp" and recipe.rollout.kv_cache == "static"
            and recipe.rollout.cuda_graphs == "auto" and device.type == "cuda"):
        raise UserError("rollout.cuda_graphs: auto does not work with train.parallel: fsdp (graphs replay fixed "
                        "parameter addresses; FSDP regathers the layers for every rollout); set "
                        "rollout.cuda_graphs: off (the static cache then runs eagerly) or train.parallel: ddp")


def check_skipping(recipe: Recipe, *, calibrating: bool = False) -> None:
    """The calibration profile is readable, and, when the model's depth can be read from its config, the skip
    settings fit it (`keep_first + keep_last`, `fixed` layer indices, the profile's depth). `calibrating`:
    for calibrate-skips, which writes the profile rather than reads it and needs one eligible layer at least."""
    cfg = recipe.skipping
    num_layers = model_num_layers(recipe.model.name_or_path)
    if calibrating:
        if num_layers is not None and cfg.keep_first + cfg.keep_last >= num_layers:
            raise UserError(f"skipping.keep_first/keep_last: no eligible layer among {num_layers} "
                            f"(keep_first={cfg.keep_first}, keep_last={cfg.keep_last})")
        return
    if cfg.strategy in COST_AWARE and cfg.calibration_file is not None:
        _check_calibration_file(cfg.calibration_file, num_layers)
    if num_layers is not None:
        SkipSampler.from_config(cfg, num_layers, recipe.run.seed)


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


def _check_calibration_file(path: str, num_layers: int | None) -> None:
    """The profile `calibrate-skips` wrote exists and holds per-layer costs (for the model's depth, when known)."""
    if not Path(path).is_file():
        raise UserError(f"skipping.calibration_file: {path}: no such file (write it with `nested-reft calibrate-skips`)")
    if num_layers is None:  # the depth the profile declares, else any: its entries are still checked
        try:
            declared = json.loads(Path(path).read_text(encoding="utf-8")).get("num_layers")
        except (OSError, ValueError, AttributeError):
            declared = None
        num_layers = declared if isinstance(declared, int) and declared > 0 else 1_000_000
    LayerCosts.read(path, num_layers)
