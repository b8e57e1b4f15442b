"""ember's code generation: Triton source per fusion group, a kernel cache on disk, kernel handles."""
from .kernels import GroupKernel, PointwiseKernel, lower_schedule
from .pointwise import PointwiseSource, generate

__all__ = ["GroupKernel", "PointwiseKernel", "PointwiseSource", "generate", "lower_schedule"]
