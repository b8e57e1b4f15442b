"""Ops whose first argument is a Python number run through both entry points and match eager.

logspace decomposes to pow.Scalar(base, exponents); `torch.sub(2, x)` and friends keep the 2 as the op's `self`.
The result written over a dying input must not call the in-place variant on the number (`pow_(10, t)`).
Each case feeds the op an intermediate that dies there and uses its result, so its memory is reused.
"""
from __future__ import annotations

import pytest
import torch

import ember
from ember.tolerance import assert_close

CASES = {
    "logspace": lambda x: x * torch.logspace(0, 2, steps=x.shape[-1]),
    "logspace_base_2": lambda x: x * torch.logspace(-1, 1, steps=x.shape[-1], base=2.0),
    "pow_number_base": lambda x: torch.pow(2.0, x.abs()) + 1,
    "rsub": lambda x: torch.rsub(x.exp(), 1.5) * 2,
    "one_minus": lambda x: (1 - x.exp()) * 2,
    "where_number_first": lambda x: torch.where(x > 0, 1.0, x.exp()) * 3,
    "sub_number_first": lambda x: torch.sub(2, x.exp(), alpha=3) * 3,
    "add_number_first": lambda x: torch.add(2, x.exp()) * 3,
    "div_number_first": lambda x: torch.div(1, x.abs() + 1) * 3,
}
PARAMS = list(CASES)


class Function(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def odd_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A (3, 7) example and a fresh non-contiguous input of the same shape."""
    return torch.randn(3, 7), torch.randn(7, 3).t()


@pytest.mark.parametrize("name", PARAMS)
def test_ember_compile_runs_scalar_first_ops(name):
    function = CASES[name]
    example, fresh = odd_inputs()
    program = ember.compile(Function(function), (example,))
    assert_close(program(example), function(example))
    assert_close(program(fresh), function(fresh))


@pytest.mark.parametrize("name", PARAMS)
def test_torch_compile_backend_runs_scalar_first_ops(name, compiled_programs):
    function = CASES[name]
    example, fresh = odd_inputs()
    compiled = torch.compile(function, backend="ember")
    assert_close(compiled(example), function(example))
    assert_close(compiled(fresh), function(fresh))
    assert compiled_programs, "ember compiled nothing: the backend fell back to eager"
