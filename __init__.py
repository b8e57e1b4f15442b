"""ember: a compiler-style graph optimizer for PyTorch.

    fast = torch.compile(model, backend="ember")      # as a torch.compile backend
    program = ember.compile(model, example_inputs)    # offline
"""
from importlib.metadata import PackageNotFoundError, version

from .api import compile, inspect
from .errors import ArtifactError, CompileError, EmberError, InputError, PlanError
from .options import Options
from .runtime import CompileReport, Program

try:
    __version__ = version("ember")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

__all__ = [
    "ArtifactError", "CompileError", "CompileReport", "EmberError", "InputError", "Options", "PlanError", "Program",
    "compile", "inspect", "__version__",
]
