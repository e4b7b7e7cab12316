"""Checks made before any model loads, that need more than the recipe: here, the rollout engine against the
data-parallel strategy."""

import pytest
import torch

from nested_reft import preflight
from nested_reft.errors import UserError
from nested_reft.preflight import check_parallel
from nested_reft.recipe import load_recipe


def test_cuda_graphs_under_fsdp_are_refused_in_one_line(monkeypatch):
    """CUDA graphs replay fixed parameter addresses; FSDP regathers each layer into new storage every rollout, so
    the pairing would recapture graphs (with all-gathers inside) every step. Refused; the eager static cache and
    graphs under ddp are fine. (A CUDA device is simulated: only the resolved device type matters.)"""
    monkeypatch.setattr(preflight, "resolve_device", lambda _device: torch.device("cuda"))
    graphs_fsdp = load_recipe(None, ["train.parallel=fsdp", "rollout.kv_cache=static"])
    with pytest.raises(UserError, match="rollout.cuda_graphs: auto does not work with train.parallel: fsdp"):
        check_parallel(graphs_fsdp, world_size=2)
    check_parallel(graphs_fsdp, world_size=1)  # one process shards nothing
    for fine in (["train.parallel=fsdp", "rollout.kv_cache=static", "rollout.cuda_graphs=off"],
                 ["train.parallel=ddp", "rollout.kv_cache=static"], ["train.parallel=fsdp"]):
        check_parallel(load_recipe(None, fine), world_size=2)
