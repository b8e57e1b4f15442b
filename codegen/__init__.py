"""ember's code generation: Triton source per fusion group, a kernel cache on disk, kernel handles."""
from .kernels import PointwiseKernel
from .pointwise import PointwiseSource, emittable, generate

__all__ = ["PointwiseKernel", "PointwiseSource", "emittable", "generate"]
