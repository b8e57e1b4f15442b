"""Comparison tolerances by dtype, in one place so that no test picks its own.

The float values are torch.testing's defaults; integer and bool results must match exactly.
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-7, rtol=1e-7),
    torch.float32: dict(atol=1e-5, rtol=1.3e-6),
    torch.float16: dict(atol=1e-5, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2),
}
EXACT: dict[str, float] = dict(atol=0.0, rtol=0.0)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """atol and rtol for results of this dtype; exact for integers and bool."""
    if dtype.is_floating_point:
        return TOLERANCES[dtype]
    return EXACT


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """torch.testing.assert_close with the tolerance of expected's dtype (dtypes must match too)."""
    torch.testing.assert_close(actual, expected, **tolerance(expected.dtype))
