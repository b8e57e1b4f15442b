"""ember's code generation: Triton source per fusion group, a kernel cache on disk, kernel handles."""
from .kernels import GroupKernel, Kernel, generate_group, lower_schedule, precompile
from .pointwise import generate
from .reduction import generate_rows
from .source import KernelSource
from .grouped_mm import PYTHON_IMPLEMENTATIONS

__all__ = ["GroupKernel", "Kernel", "KernelSource", "PYTHON_IMPLEMENTATIONS", "generate", "generate_group", "generate_rows", "lower_schedule", "precompile"]
