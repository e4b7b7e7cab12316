"""Non-finite guard: finiteness checks, the consecutive-step limit, and no checkpoint of non-finite weights."""

import math

import pytest
import torch

from nested_reft.errors import UserError
from nested_reft.guards import NonFiniteError, NonFiniteGuard, check_finite_parameters, finite, first_nonfinite_parameter


@pytest.mark.parametrize(
    "values, expected",
    [
        ((0.5, 1.0), True),
        ((torch.tensor(2.0), 3), True),
        ((torch.ones(3, 2), torch.tensor(0.0)), True),
        ((), True),
        ((math.nan,), False),
        ((1.0, math.inf), False),
        ((torch.tensor(-math.inf),), False),
        ((1.0, torch.tensor([1.0, math.nan])), False),
        ((torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(math.nan, dtype=torch.float16)), False),
    ],
)
def test_finite(values, expected):
    assert finite(*values) is expected


def test_guard_stops_after_max_consecutive_nonfinite_steps():
    guard = NonFiniteGuard(max_consecutive=3)
    for step, skipped in enumerate([0, 1, 1, 0, 2, 1], start=1):  # a finite step resets the count
        guard.step_done(step, skipped)
    assert guard.consecutive == 2
    with pytest.raises(NonFiniteError) as e:
        guard.step_done(7, 1)
    message = str(e.value)
    assert message.startswith("steps 5-7: the loss or gradient norm was not finite") and "\n" not in message
    assert "train.max_nonfinite_steps=3" in message and "last checkpoint is intact" in message
    assert isinstance(e.value, UserError) and e.value.exit_code == 3


def test_guard_with_limit_one_stops_at_the_first():
    with pytest.raises(NonFiniteError, match=r"^step 4: .*1 step\(s\) in a row"):
        NonFiniteGuard(1).step_done(4, 1)
    with pytest.raises(ValueError):
        NonFiniteGuard(0)


def test_nonfinite_parameters_are_never_checkpointed(tiny_llama):
    assert first_nonfinite_parameter(tiny_llama) is None
    check_finite_parameters(tiny_llama, step=1)
    with torch.no_grad():
        tiny_llama.model.layers[2].mlp.up_proj.weight[3, 5] = math.nan
    assert first_nonfinite_parameter(tiny_llama) == "model.layers.2.mlp.up_proj.weight"
    with pytest.raises(NonFiniteError, match=r"step 9: parameter model\.layers\.2\.mlp\.up_proj\.weight holds NaN/inf"):
        check_finite_parameters(tiny_llama, step=9)
