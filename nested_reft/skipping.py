"""Layer skipping: the behavior model is the target model with some decoder layers bypassed.

`skip_layers(model, S)` turns the model, for the duration of a `with` block, into exactly the model whose
decoder layers S were physically deleted: `model.model.layers` is swapped for a list of the *kept* layer
objects (the same modules, so no parameter is copied and the weights stay shared with training), each kept
layer's `layer_idx` is renumbered 0..K-1 and the config's layer count and per-layer list (`layer_types`)
shrink to match. A skipped layer therefore passes the residual stream unchanged, and a KV cache created
inside the block has one slot per kept layer, as transformers expects.

`SkipSampler` draws the skipped set per batch (`random`, `contiguous`, `fixed`, `calibrated` or `adaptive`;
the last two choose cheap layers by their measured cost, see `skip_control`).
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from nested_reft.errors import UserError
from nested_reft.skip_bridges import SkipBridges, bridged
from nested_reft.skip_control import AdaptiveController, LayerCosts

# Causal-LM families whose decoder is `model.model.layers` and whose forward loops over
# `layers[:config.num_hidden_layers]`, with `config.layer_types` as the only per-layer config list.
# tests/test_skipping.py checks each of them against a physically truncated copy.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

STRATEGIES = ("random", "contiguous", "fixed", "calibrated", "adaptive")
COST_AWARE = ("calibrated", "adaptive")  # strategies that need per-layer skip costs

_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # decoders currently inside skip_layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM; UserError naming the class otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not isinstance(layers, nn.ModuleList):
        raise UserError(
            f"model: layer skipping supports the {', '.join(SUPPORTED_MODEL_TYPES)} families, "
            f"found {type(model).__name__} (model_type '{model_type}')"
        )
    if getattr(config, "is_heterogeneous", False):
        raise UserError(
            f"model: layer skipping does not support heterogeneous per-layer configs ({type(model).__name__})"
        )
    return layers


def validate_skip_set(layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """Sorted skip set; UserError for non-integers, out-of-range or duplicate indices, or skipping every layer."""
    skip = list(layers)
    for index in skip:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
            raise UserError(f"skip set: layer indices must be integers in [0, {num_layers - 1}], found {index!r}")
    if len(set(skip)) != len(skip):
        raise UserError(f"skip set: duplicate layer indices in {sorted(skip)}")
    if len(skip) == num_layers and num_layers > 0:
        raise UserError(f"skip set: cannot skip all {num_layers} decoder layers")
    return tuple(sorted(skip))


@contextmanager
def skip_layers(model: nn.Module, layers: Iterable[int], bridges: SkipBridges | None = None) -> Iterator[nn.Module]:
    """Run `model` with the given decoder layers bypassed; everything is restored on exit (also on errors).

    Inside the block the model is indistinguishable from a physically truncated copy with renumbered layers, or,
    with `bridges`, from one whose skipped layers are replaced by their bridges (`skip_bridges`). An empty set is
    a no-op. Not re-entrant: a non-empty set inside another skip_layers block is an error.
    """
    all_layers = decoder_layers(model)
    skip = validate_skip_set(layers, len(all_layers))
    if not skip:
        yield model
        return
    decoder = model.model
    if decoder in _ACTIVE:
        raise RuntimeError("skip_layers is not re-entrant: this model is already running with layers skipped")
    config = model.config
    kept = [(index, layer) for index, layer in enumerate(all_layers) if index not in skip]
    indexed = [(old_index, _indexed_modules(layer, old_index)) for old_index, layer in kept]
    saved_num_layers = config.num_hidden_layers
    saved_layer_types = getattr(config, "layer_types", None)
    _ACTIVE.add(decoder)
    try:
        decoder.layers = nn.ModuleList(layer for _, layer in kept)
        for new_index, (_, modules) in enumerate(indexed):
            for module in modules:
                module.layer_idx = new_index
        config.num_hidden_layers = len(kept)
        if saved_layer_types is not None:
            config.layer_types = [saved_layer_types[index] for index, _ in kept]
        with bridged(list(all_layers), decoder.norm, skip, bridges):
            yield model
    finally:
        decoder.layers = all_layers
        for old_index, modules in indexed:
            for module in modules:
                module.layer_idx = old_index
        config.num_hidden_layers = saved_num_layers
        if saved_layer_types is not None:
            config.layer_types = saved_layer_types
        _ACTIVE.discard(decoder)


def _indexed_modules(layer: nn.Module, index: int) -> list[nn.Module]:
    """The modules of decoder layer `index` that carry a `layer_idx` (attention; the layer itself in some families).

    `layer_idx` is the slot a module reads and writes in the KV cache, so each must be renumbered. A value
    other than `index` means an architecture we do not understand: stop rather than corrupt the cache.
    """
    modules = [module for module in layer.modules() if isinstance(getattr(module, "layer_idx", None), int)]
    for module in modules:
        if module.layer_idx != index:
            raise RuntimeError(f"decoder layer {index}: {type(module).__name__}.layer_idx is {module.layer_idx}")
    if not modules:
        raise RuntimeError(f"decoder layer {index} ({type(layer).__name__}) has no layer_idx to renumber")
    return modules


class SkipSampler:
    """Draws `(ratio, skipped layers)` once per batch from a private, seedable RNG.

    k = round(ratio * num_layers) (halves up), clipped to the eligible layers: those outside the first
    `keep_first` and last `keep_last`. `ratio` is one value or a list (one drawn uniformly per batch);
    `ratio_range=(lo, hi)` draws it uniformly instead. Strategies:
    - `random`: k eligible layers, uniformly without replacement;
    - `contiguous`: a uniformly placed block of k eligible layers;
    - `fixed`: exactly `layers` (ratio ignored);
    - `calibrated`: k layers drawn uniformly from the cheapest ~1.5k by their skip cost, so that draws vary
      from batch to batch yet cost close to the cheapest set;
    - `adaptive`: the cheapest `count` layers, where `AdaptiveController` sets `count` after each batch from
      the measured KL(mu || pi) (`observe`) to stay at `target_kl`, within `ratio_range` when one is given.
    The cost-aware strategies read per-layer costs from `calibration_file`; without one, `needs_costs` is true,
    `sample` returns the empty set, and the caller measures costs on that batch and hands them to `set_costs`.
    """

    def __init__(
        self,
        num_layers: int,
        *,
        strategy: str = "random",
        ratio: float | list[float] = 0.0,
        ratio_range: tuple[float, float] | None = None,
        layers: list[int] | None = None,
        keep_first: int = 1,
        keep_last: int = 1,
        calibration_file: str | Path | None = None,
        target_kl: float = 0.1,
        seed: int = 0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise UserError(f"skip.strategy: expected one of {', '.join(STRATEGIES)}, found '{strategy}'")
        if keep_first < 0 or keep_last < 0 or keep_first + keep_last > num_layers:
            raise UserError(
                f"skip.keep_first/keep_last: expected non-negative values summing to at most {num_layers}, "
                f"found {keep_first} and {keep_last}"
            )
        if not target_kl > 0:
            raise UserError(f"skip.target_kl: expected a number > 0, found {target_kl}")
        self.num_layers = num_layers
        self.strategy = strategy
        self.ratios = _check_ratios(ratio, ratio_range)
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None
        self.eligible = list(range(keep_first, num_layers - keep_last))
        self.fixed = self._check_fixed(layers)
        self.target_kl = target_kl
        self.costs: LayerCosts | None = None
        self.controller: AdaptiveController | None = None
        self._rng = random.Random(seed)
        if strategy in COST_AWARE and calibration_file is not None:
            self.set_costs(LayerCosts.read(calibration_file, num_layers))

    @classmethod
    def from_config(cls, cfg: Any, num_layers: int, seed: int) -> SkipSampler:
        """Build from any object carrying __init__'s keyword arguments as attributes (the recipe's skipping section)."""
        names = ("strategy", "ratio", "ratio_range", "layers", "keep_first", "keep_last", "calibration_file",
                 "target_kl")
        return cls(num_layers, seed=seed, **{name: getattr(cfg, name) for name in names})

    @property
    def needs_costs(self) -> bool:
        """Whether the strategy still waits for per-layer costs (then `sample` skips nothing)."""
        return self.strategy in COST_AWARE and self.costs is None

    def set_costs(self, costs: LayerCosts) -> None:
        """Use these per-layer skip costs from now on (the adaptive controller starts from them)."""
        if costs.num_layers != self.num_layers:
            raise ValueError(f"costs are for {costs.num_layers} layers, the model has {self.num_layers}")
        self.costs = costs
        if self.strategy == "adaptive":
            lo, hi = self.ratio_range or (0.0, 1.0)
            self.controller = AdaptiveController(costs, self._costed(), self.target_kl, self._count(lo),
                                                 self._count(hi))

    def sample(self, ratio: float | None = None) -> tuple[float, tuple[int, ...]]:
        """Draw this batch's (ratio, sorted skipped layers); `ratio` overrides the configured one."""
        if self.strategy == "fixed":
            return len(self.fixed) / self.num_layers, self.fixed
        if self.needs_costs:
            return 0.0, ()
        if self.controller is not None and ratio is None:
            skipped = self.controller.layers()
            return len(skipped) / self.num_layers, skipped
        if ratio is None:
            ratio = self._draw_ratio()
        elif not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        k = self._count(ratio)
        if self.strategy == "random":
            skipped = self._rng.sample(self.eligible, k)
        elif self.strategy == "contiguous":
            start = self._rng.randint(self.eligible[0], self.eligible[-1] - k + 1) if k else 0
            skipped = list(range(start, start + k))
        elif self.strategy == "adaptive":  # an explicit ratio: the layers the controller would pick at that count
            skipped = list(self.costs.cheapest(k, self._costed()))
        else:  # calibrated: the pool of the cheapest ~1.5k layers that have a measured cost
            costed = self._costed()
            k = min(k, len(costed))
            pool = list(self.costs.cheapest(min(len(costed), k + max(1, math.ceil(k / 2))), costed))
            skipped = self._rng.sample(pool, k)
        return ratio, tuple(sorted(skipped))

    def next_layers(self, skipped: tuple[int, ...]) -> tuple[int, ...]:
        """The set worth making cheaper after a batch sampled with `skipped`: under `adaptive`, the one its controller
        would try next (one layer more, the cheapest); otherwise the batch's own."""
        return self.controller.next_layers() if self.controller is not None else skipped

    def observe(self, skipped: tuple[int, ...], kl_mu_pi: float,
                candidate: tuple[tuple[int, ...], float] | None = None) -> dict[str, Any]:
        """Report the KL(mu || pi) measured on a batch sampled with `skipped` (and, as `candidate`, the KL of the
        `next_layers` set measured on it); returns the controller's target and decision for the metrics row
        (empty for strategies without a controller)."""
        if self.controller is None:
            return {}
        self.controller.update(len(skipped), kl_mu_pi, (len(candidate[0]), candidate[1]) if candidate else None)
        return {"target_kl": self.target_kl, "skip_decision": self.controller.last["decision"],
                "next_num_skipped": self.controller.count,
                "kl_predicted_next": self.controller.last["kl_predicted_next"]}

    def state_dict(self) -> dict[str, Any]:
        """The RNG and controller state (JSON-serialisable), so a resumed run redraws the same skip sets."""
        version, internal, gauss_next = self._rng.getstate()
        state: dict[str, Any] = {"rng_state": [version, list(internal), gauss_next]}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss_next = state["rng_state"]
        self._rng.setstate((version, tuple(internal), gauss_next))
        if "controller" in state:
            if self.controller is None:
                raise ValueError("the saved state has an adaptive controller; set the layer costs before loading")
            self.controller.load_state_dict(state["controller"])

    def _costed(self) -> list[int]:
        """Eligible layers whose skip cost is known (a profile may leave layers out: those are never skipped)."""
        return [i for i in self.eligible if i in self.costs.kl]

    def _draw_ratio(self) -> float:
        if self.ratio_range is not None:
            return self._rng.uniform(*self.ratio_range)
        if len(self.ratios) == 1:
            return self.ratios[0]
        return self._rng.choice(self.ratios)

    def _count(self, ratio: float) -> int:
        """Layers skipped at `ratio`: rounded half up, at most the eligible layers and never every layer."""
        return min(math.floor(ratio * self.num_layers + 0.5), len(self.eligible), self.num_layers - 1)

    def _check_fixed(self, layers: list[int] | None) -> tuple[int, ...]:
        if self.strategy != "fixed":
            return ()
        if not layers:
            raise UserError("skip.layers: strategy 'fixed' needs a non-empty list of layer indices")
        return validate_skip_set(layers, self.num_layers)


def _check_ratios(ratio: float | list[float], ratio_range: tuple[float, float] | None) -> list[float]:
    """The candidate ratios; each must be in [0, 1). A ratio_range replaces `ratio` (which must then stay 0)."""
    ratios = [float(r) for r in ratio] if isinstance(ratio, (list, tuple)) else [float(ratio)]
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
        raise UserError(f"skip.ratio: expected a value or non-empty list of values in [0, 1), found {ratio!r}")
    if ratio_range is not None:
        if ratios != [0.0]:
            raise UserError("skip: give either ratio or ratio_range, not both")
        if len(ratio_range) != 2 or not 0.0 <= ratio_range[0] <= ratio_range[1] < 1.0:
            raise UserError(f"skip.ratio_range: expected [lo, hi] with 0 <= lo <= hi < 1, found {ratio_range!r}")
    return ratios
