"""Tolerances by dtype, in one place: the CLI, the tests and the benchmarks all compare with these.

They are torch.testing's defaults; integer and bool results must match exactly.
"""
from __future__ import annotations

from typing import Any

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 1.6e-2),
}
"""dtype -> (atol, rtol)."""


def tolerance_for(dtype: torch.dtype, *, scale: float = 1.0) -> float:
    """The absolute error allowed for values of magnitude `scale`: atol + rtol·scale (0 for exact dtypes)."""
    atol, rtol = TOLERANCES.get(dtype, (0.0, 0.0))
    return atol + rtol * abs(scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """torch.testing.assert_close with the tolerance of expected's dtype (exact for ints and bool)."""
    atol, rtol = TOLERANCES.get(expected.dtype, (0.0, 0.0))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def result_tolerance(expected: Any) -> float:
    """The absolute error allowed for a model's result (any pytree of tensors): by the dtype of its first
    floating tensor, scaled by the largest magnitude among them; exact when it has no floating tensor."""
    floats = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return 0.0
    return tolerance_for(floats[0].dtype, scale=max((t.abs().max().item() for t in floats if t.numel()), default=1.0))
