"""The `ember` torch.compile backend: each dynamo graph becomes the same Program `ember.compile` would make.

A graph run without autograd is captured by torch.export, with dynamo's parameters and buffers lifted back
into weights, and goes through exactly the export path's pipeline (so both entry points reach one program).
A graph that autograd records, or that export cannot take, goes through aot_autograd: ember compiles the
forward (parameters still held as weights) and the backward runs eagerly, with one warning. Graphs with
symbolic shapes are compiled once per concrete input shape. Anything ember cannot compile runs eagerly with
one warning: torch.compile(backend="ember") always runs the model.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._guards import TracingContext
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from . import api
from .errors import CompileError
from .frontend.decompositions import ember_decompositions
from .frontend.lower import SymbolicShapeError, lower_fx
from .optimizer.pipeline import checkpoint
from .optimizer.skip_search import SkipPlan
from .options import Options

log = logging.getLogger(__name__)


def ember_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None, mode: str | None = None
) -> Callable[..., Any]:
    """torch.compile backend: `torch.compile(model, backend="ember", options={...})`."""
    opts = Options.from_mapping(options, mode=mode)
    if opts.layer_skip is not None and not isinstance(opts.layer_skip, SkipPlan):
        raise CompileError("Options.layer_skip asks for a plan to be chosen, which needs the model: for torch.compile, "
                           "choose one first (ember.plan_skip or `ember skip --json`) and pass the plan")
    if not _records_grad(example_inputs):
        try:
            return ExportedRunner(gm, list(example_inputs), opts)
        except CompileError as error:
            log.info("compiling a graph through aot_autograd, as torch.export cannot take it: %s", error)
    # What aot_autograd's forward graph takes, in order: the module's own parameters and buffers (none when
    # dynamo inlines modules), then dynamo's inputs, parameters among them. Real tensors, unlike the fakes
    # the forward compiler is handed.
    full_args = [*dict(gm.named_parameters(remove_duplicate=False)).values(),
                 *dict(gm.named_buffers(remove_duplicate=False)).values(), *example_inputs]

    def forward_compiler(fx_gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        return compile_forward(fx_gm, opts, static_weights(fx_gm, full_args))

    def backward_compiler(fx_gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        _warn_once("ember compiles inference only: the backward pass runs eagerly")
        return make_boxed_func(fx_gm)

    return aot_module_simplified(
        gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
        decompositions=ember_decompositions(),
    )


def _records_grad(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(value, torch.Tensor) and value.requires_grad
                                           for value in example_inputs)


def _is_static(value: Any) -> bool:
    """A parameter or a buffer dynamo marked as one (its address is fixed): a weight, not an input."""
    return isinstance(value, torch.nn.Parameter) or (
        isinstance(value, torch.Tensor) and getattr(value, "_dynamo_static_input_type", None) is not None)


class _Lifted(torch.nn.Module):
    """Dynamo's graph with its static inputs held as parameters and buffers, so torch.export lifts them as
    weights (by reference) and the rest stay inputs."""

    def __init__(self, gm: fx.GraphModule, args: Sequence[Any], static: Sequence[int]):
        super().__init__()
        self.gm = gm
        self.slots: list[str | None] = [None] * len(args)
        for position in static:
            name = self.slots[position] = f"static_{position}"
            if isinstance(args[position], torch.nn.Parameter):
                self.register_parameter(name, args[position])
            else:
                self.register_buffer(name, args[position])

        names = [node.name for position, node in enumerate(gm.graph.find_nodes(op="placeholder"))
                 if self.slots[position] is None]
        if len(names) == len(self.slots) - len(static):
            self.__class__ = _named_inputs(names)

    def forward(self, *inputs: Any) -> Any:
        given = iter(inputs)
        return self.gm(*(getattr(self, slot) if slot else next(given) for slot in self.slots))


def _named_inputs(names: Sequence[str]) -> type[_Lifted]:
    """_Lifted whose forward names its inputs after dynamo's placeholders (`l_kwargs_position_ids_`), so that the IR's
    inputs keep the model's names (torch.export names them after the signature) and passes can find one by name."""
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in ("self", *names)]

    def forward(self: _Lifted, *inputs: Any) -> Any:
        return _Lifted.forward(self, *inputs)

    forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return type("_Lifted", (_Lifted,), {"forward": forward})


class ExportedRunner:
    """A dynamo graph compiled as `ember.compile` compiles a model, called with dynamo's flat args.

    Parameters are weights held by reference, checked on every call: one given in new storage (`param.data =
    ...`, a new Parameter), or updated in place under a copy compiling derived from it (a padded weight),
    recompiles, so no call reads a stale weight. A graph with symbolic shapes compiles once per input shape.
    """

    def __init__(self, gm: fx.GraphModule, args: list[Any], options: Options):
        self.gm = gm
        self.options = options
        self.static = [position for position, value in enumerate(args) if _is_static(value)]
        self.input_positions = tuple(position for position in range(len(args)) if position not in self.static)
        self.dynamic = any(_symbolic(node.meta.get("example_value")) for node in gm.graph.nodes if node.op == "placeholder")
        self.tensor_positions = tuple(position for position in self.input_positions
                                      if isinstance(args[position], torch.Tensor))
        self.programs: dict[tuple, Any] = {}
        self.pointers: list[int | None] = []
        self._compile(args)

    def _compile(self, args: Sequence[Any]) -> Any:
        program = api.compile(_Lifted(self.gm, args, self.static),
                              tuple(args[position] for position in self.input_positions), self.options)
        self.programs[self._key(args)] = program
        self.pointers = _pointers(args, self.static)
        return program

    def _key(self, args: Sequence[Any]) -> tuple:
        if not self.dynamic:
            return ()
        return tuple((tuple(args[p].shape), args[p].dtype) if isinstance(args[p], torch.Tensor) else args[p]
                     for p in self.input_positions)

    def __call__(self, *args: Any) -> Any:
        if _moved(args, self.pointers, self.static):
            log.info("a parameter was given in new storage: recompiling")
            self.programs.clear()
        program = self.programs.get(self._key(args))
        if program is None or program.stale_weights():
            program = self._compile(args)
        # dynamo's guards (and the key, for a dynamic graph) already hold every input to the compiled signature
        tensors = [args[position] for position in self.tensor_positions]
        return program.finish(program.executor(tensors), tensors)


def _pointers(args: Mapping[int, Any] | Sequence[Any], static: Sequence[int]) -> list[int | None]:
    """Where each parameter's storage was when a program was compiled for it, by argument position."""
    pointers: list[int | None] = [None] * (max(static, default=-1) + 1)
    for position in static:
        pointers[position] = args[position].data_ptr()
    return pointers


_SAME_POINTERS = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
"""torch's own check (in C++, as CUDA-graph trees use it) that tensors at some positions have the data pointers
recorded for them: builds with CUDA have it."""


def _moved(args: Sequence[Any], pointers: list[int | None], static: list[int]) -> bool:
    """Whether a parameter is handed in other storage than it was compiled with (`param.data = ...`, a new one)."""
    if _SAME_POINTERS is not None:
        return not _SAME_POINTERS(list(args), pointers, static)
    return any(args[position].data_ptr() != pointers[position] for position in static)


def _symbolic(value: Any) -> bool:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape)


def static_weights(fx_gm: fx.GraphModule, full_args: Sequence[Any]) -> dict[int, torch.Tensor]:
    """The forward graph's inputs that are parameters and buffers (aot_autograd's static inputs, as Inductor
    reads them): ember holds them as weights, by reference, instead of taking them as inputs on every call.

    Returns position -> tensor; empty (every input stays an input) when the graph's inputs do not line up one
    to one with `full_args`.
    """
    context = TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    placeholders = [node for node in fx_gm.graph.nodes if node.op == "placeholder"]
    if metadata is None or len(placeholders) != len(full_args):
        log.debug("graph inputs do not line up with dynamo's (%d vs %d): parameters stay inputs",
                  len(placeholders), len(full_args))
        return {}
    static = {}
    for position in metadata.static_input_indices:
        value, fake = full_args[position], placeholders[position].meta.get("val")
        if not (isinstance(value, torch.Tensor) and isinstance(fake, torch.Tensor)
                and tuple(value.shape) == tuple(fake.shape) and value.dtype == fake.dtype):
            log.debug("static input %d does not match its placeholder: parameters stay inputs", position)
            return {}
        static[position] = value
    return static


def compile_forward(fx_gm: fx.GraphModule, options: Options,
                    static: Mapping[int, torch.Tensor] | None = None) -> Callable[..., Any]:
    """An ember-compiled callable for an ATen forward graph, or the graph itself if ember cannot compile it.

    `static`: the graph's inputs that are parameters or buffers (position -> tensor), compiled in as weights.
    """
    static = dict(static or {})
    runner = _WeightedRunner(fx_gm, options, tuple(static))
    try:
        runner.build(static)
    except SymbolicShapeError:
        return _ShapeSpecialized(fx_gm, options, tuple(static))
    except CompileError as error:
        if options.layer_skip is not None or options.ffn_gate is not None:  # eager would run the whole model
            raise CompileError(f"layer skipping or the ffn gate was asked for, and this graph cannot be compiled: "
                               f"{error}") from error
        _warn_once(f"ember could not compile a graph and runs it eagerly: {error}")
        return make_boxed_func(fx_gm)
    return runner


class _WeightedRunner:
    """A Program for one forward graph, with its parameters compiled in as weights held by reference.

    The weights are the tensors the graph was compiled with. Each call checks, as ExportedRunner does, that
    the parameters it is handed still have their storage and that no copy compiling made of one is stale; if
    not, it compiles again. Called with AOT's flat args (tensors and ints).
    """

    _boxed_call = True

    def __init__(self, fx_gm: fx.GraphModule, options: Options, static: tuple[int, ...]):
        self.fx_gm = fx_gm
        self.options = options
        self.static = list(static)
        placeholders = [node for node in fx_gm.graph.nodes if node.op == "placeholder"]
        self.names = tuple(node.name for node in placeholders)
        self.input_positions = tuple(
            position for position, node in enumerate(placeholders)
            if position not in static and isinstance(node.meta.get("val"), torch.Tensor))
        self.program: Any = None
        self.pointers: list[int | None] = []

    def build(self, args: Mapping[int, Any] | Sequence[Any]) -> None:
        """Compile with the parameters found at the static positions of `args`."""
        weights = {self.names[position]: args[position] for position in self.static}
        graph = lower_fx(self.fx_gm, weights=weights)
        checkpoint(graph, "lower", self.options, index=0)
        self.program = api.compile_graph(graph, self.options)
        self.pointers = _pointers(args, self.static)

    def __call__(self, args: list[Any]) -> list[torch.Tensor]:
        if _moved(args, self.pointers, self.static) or self.program.stale_weights():
            log.info("a parameter was given in new storage or updated under a copy made of it: recompiling")
            self.build(args)
        tensors = [args[position] for position in self.input_positions]
        args.clear()  # boxed convention: let AOT's references to the inputs go early
        return self.program.run(tensors)


class _ShapeSpecialized:
    """Compiles a symbolic-shape graph once per concrete input signature, on first use."""

    def __init__(self, fx_gm: fx.GraphModule, options: Options, static: tuple[int, ...]):
        self.fx_gm = fx_gm
        self.options = options
        self.static = static
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
        runner = _WeightedRunner(graph_module, self.options, self.static)
        try:
            runner.build(args)
        except CompileError as error:
            _warn_once(f"ember could not compile a graph and runs it eagerly: {error}")
            return make_boxed_func(self.fx_gm)
        return runner


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)
