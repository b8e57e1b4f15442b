"""The `ember` torch.compile backend: aot_autograd lowers each dynamo graph to ATen, ember compiles the forward.

Backward graphs run eagerly (training is not compiled yet), with one warning. Graphs with symbolic
shapes are specialised per concrete input shape at call time. Anything ember cannot compile runs
eagerly with one warning: torch.compile(backend="ember") always runs the model.
"""
from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import CompileError
from ..options import Options
from .decompositions import ember_decompositions
from .lower import SymbolicShapeError, lower_fx

log = logging.getLogger(__name__)


def ember_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None, mode: str | None = None
) -> Callable[..., Any]:
    """torch.compile backend: `torch.compile(model, backend="ember", options={...})`."""
    opts = Options.from_mapping(options, mode=mode)

    def forward_compiler(fx_gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        return compile_forward(fx_gm, opts)

    def backward_compiler(fx_gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        _warn_once("ember compiles inference only: the backward pass runs eagerly")
        return make_boxed_func(fx_gm)

    return aot_module_simplified(
        gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
        decompositions=ember_decompositions(),
    )


def compile_forward(fx_gm: fx.GraphModule, options: Options) -> Callable[..., Any]:
    """An ember-compiled callable for an ATen forward graph, or the graph itself if ember cannot compile it."""
    try:
        return _runner(fx_gm, options)
    except SymbolicShapeError:
        return _ShapeSpecialized(fx_gm, options)
    except CompileError as error:
        _warn_once(f"ember could not compile a graph and runs it eagerly: {error}")
        return make_boxed_func(fx_gm)


def _runner(fx_gm: fx.GraphModule, options: Options) -> Callable[..., Any]:
    """Lower and compile; the runner takes AOT's flat args (tensors and ints) and passes on the tensors."""
    from ..api import checkpoint, compile_graph

    graph = lower_fx(fx_gm, weights={})
    checkpoint(graph, "lower", options, index=0)
    program = compile_graph(graph, options)
    tensor_positions = [
        position for position, node in enumerate(n for n in fx_gm.graph.nodes if n.op == "placeholder")
        if isinstance(node.meta.get("val"), torch.Tensor)
    ]

    def run(args: list[Any]) -> list[torch.Tensor]:
        tensors = [args[position] for position in tensor_positions]
        args.clear()  # boxed convention: let AOT's references to the inputs go early
        return program.run(tensors)

    run._boxed_call = True
    return run


class _ShapeSpecialized:
    """Compiles a symbolic-shape graph once per concrete input signature, on first use."""

    def __init__(self, fx_gm: fx.GraphModule, options: Options):
        self.fx_gm = fx_gm
        self.options = options
        self.compiled: dict[tuple, Callable[..., Any]] = {}

    _boxed_call = True

    def __call__(self, args: list[Any]) -> Any:
        key = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self.compiled:
            self.compiled[key] = self._specialize(args)
        return self.compiled[key](args)

    def _specialize(self, args: Sequence[Any]) -> Callable[..., Any]:
        graph_module = copy.deepcopy(self.fx_gm)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
            FakeTensorProp(graph_module, mode).propagate_dont_convert_inputs(*fakes)
        for node, value in zip((n for n in graph_module.graph.nodes if n.op == "placeholder"), args):
            if not isinstance(value, torch.Tensor):
                node.meta["val"] = value
        try:
            return _runner(graph_module, self.options)
        except CompileError as error:
            _warn_once(f"ember could not compile a graph and runs it eagerly: {error}")
            return make_boxed_func(self.fx_gm)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)
