"""ember's runtime: the reference executor and the compiled Program."""
from .executor import Executor
from .program import CompileReport, Program

__all__ = ["CompileReport", "Executor", "Program"]
