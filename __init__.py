"""ember: a compiler-style graph optimizer for PyTorch.

    fast = torch.compile(model, backend="ember")      # as a torch.compile backend
    program = ember.compile(model, example_inputs)    # offline
    program.save("out/model"); ember.load("out/model") # saved, and loaded without optimizing again
    plan = ember.plan_skip(model, calibration, budget=0.05)  # sublayers to remove; Options(layer_skip=plan)
    placement = ember.plan_placement([ember.record_routing(moe, calls)], gpus=4)  # Options(expert_placement=...)

The names that need torch load on first use, so `import ember` (and `ember --help`) stays light.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import ArtifactError, CompileError, EmberError, ExportError, InputError, PlanError
from .options import Options

try:
    __version__ = version("ember")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

_LAZY = {"compile": ".api", "inspect": ".api", "load": ".api", "plan_skip": ".api", "CompileReport": ".runtime",
         "Program": ".runtime", "LayerSkip": ".optimizer.skip_search", "SkipPlan": ".optimizer.skip_search",
         "FFNGate": ".optimizer.ffn_gate", "Placement": ".optimizer.expert_placement",
         "plan_placement": ".optimizer.expert_placement", "load_trace": ".optimizer.moe_traces",
         "record_routing": ".optimizer.routing_record"}
"""Public names defined in modules that import torch: name -> module, imported when first asked for."""

__all__ = [
    "ArtifactError", "CompileError", "CompileReport", "EmberError", "ExportError", "FFNGate", "InputError", "LayerSkip",
    "Options", "PlanError", "Placement", "Program", "SkipPlan", "compile", "inspect", "load", "load_trace", "plan_placement",
    "plan_skip", "record_routing", "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
