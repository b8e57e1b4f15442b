"""ember's code generation: Triton source per fusion group, a kernel cache on disk, kernel handles."""
from collections.abc import Callable
from typing import Any

import torch

from .kernels import GroupKernel, Kernel, generate_group, lower_schedule, precompile
from .pointwise import generate
from .reduction import generate_rows
from .source import KernelSource
from .grouped_mm import grouped_mm
from .skinny_mm import gated_linears, linears

PYTHON_IMPLEMENTATIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    torch.ops.ember.grouped_mm.default: grouped_mm, torch.ops.ember.linears.default: linears,
    torch.ops.ember.gated_linears.default: gated_linears}
"""ember's own ops written in Python, by overload: a generated wrapper (which runs without autograd) calls the
function itself, not through torch's dispatcher (whose boxing into Python and back cost a Mixtral call about
half a millisecond of host time step by step)."""

__all__ = ["GroupKernel", "Kernel", "KernelSource", "PYTHON_IMPLEMENTATIONS", "generate", "generate_group", "generate_rows", "lower_schedule", "precompile"]
