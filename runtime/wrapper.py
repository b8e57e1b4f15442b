"""Generated wrappers: a run of a program's steps as one straight-line Python function, made once per device.

The executor's loop pays, per step, for an env dict, argument binding and three views per arena slot; a
wrapper does the same work with locals, `del` where values die, each arena typed once per dtype where it is
allocated, one `reinterpret_tensor` per slot, and every op called directly with its constant arguments
written in (as Inductor's generated wrappers do). A view of a value whose strides are known exactly (memory the
wrapper gave it, a generated kernel's result, a weight, or such a view) is one `reinterpret_tensor` with the
sizes, strides and offset worked out at generation time, as Inductor's wrappers write it: torch's alias made
without the dispatcher (1.0 µs of host time against `as_strided`'s 3.3 on a CPU core). A linear layer on such
a row-contiguous value is one `mm` (or `addmm`) of its rows on the weight's transpose made at generation, as
Inductor's wrappers call `extern_kernels.mm`. A generated kernel whose compiled
binary Triton lets us launch directly is launched from the wrapper's own line (its launcher, function and
metadata bound at generation, the stream read once per call) when every pointer is 16-byte aligned, and through
the kernel otherwise: about 3 µs less host time per launch than the kernel's own call. Constants that are not
literals (weights, ops, kernels, dtypes) are the function's globals.
"""
from __future__ import annotations

import builtins
import keyword
import linecache
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..codegen import PYTHON_IMPLEMENTATIONS, GroupKernel
from ..codegen.kernels import raw_stream
from ..ir import ArenaLayout, Graph
from .arena import linear_arguments, slot_view

if TYPE_CHECKING:
    from .executor import Step

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Wrapper:
    """A generated function and its source. It takes the graph's inputs, then the values `carried` in, then
    (when arenas are open on entry) the list of arenas; it returns the list of values asked for, then (when
    arenas are still open on exit) the list of arenas, None where closed."""

    name: str
    source: str
    function: Callable[..., Any]
    carried: tuple[str, ...] = ()
    arenas_in: bool = False
    arenas_out: bool = False


def generate_wrapper(steps: Sequence[Step], graph: Graph, layout: ArenaLayout | None, device: torch.device | None,
                     allocate: Callable[[int, torch.device], torch.Tensor], *, name: str = "program",
                     start: int = 0, stop: int | None = None, carried: tuple[str, ...] = (),
                     returns: tuple[str, ...] | None = None, debug_dir: str | None = None) -> Wrapper:
    """The function that runs `steps[start:stop]` as the executor's loop would, on `device` (arenas made by
    `allocate`), reading the graph's inputs and `carried`, and returning `returns` (the graph's outputs)."""
    stop = len(steps) if stop is None else stop
    arena_count = len(layout.arenas) if layout else 0
    open_in = _open_after(steps[:start], arena_count)
    open_out = _open_after(steps[:stop], arena_count)
    writer = _Writer(graph, layout, device, allocate)
    writer.uses.update(name for step in steps[start:stop] for name in step.inputs)
    writer.uses.update(graph.outputs if returns is None else returns)
    parameters = [writer.local(value.name) for value in graph.inputs] + [writer.local(value) for value in carried]
    if open_in:
        parameters.append("arenas")
    function_name = writer.names.fresh(name)
    writer.line(f"def {function_name}({', '.join(parameters)}):", indent=0)
    for index in open_in:
        writer.line(f"{writer.arena(index)} = arenas[{index}]")
        writer.type_arena(index, steps[start:stop])
    for step in steps[start:stop]:
        for index in step.opens:
            writer.line(f"{writer.arena(index)} = allocate({layout.arenas[index].size_bytes}, device)")
            writer.type_arena(index, steps[start:stop])
        writer.step(step)
        writer.free(step.frees)
        for index in step.closes:
            writer.line(f"del {', '.join(writer.arena_names(index))}")
    results = "[" + ", ".join(writer.value(value) for value in (graph.outputs if returns is None else returns)) + "]"
    if open_out:
        arenas = ", ".join(writer.arena(index) if index in open_out else "None" for index in range(arena_count))
        results += f", [{arenas}]"
    writer.line(f"return {results}")
    if writer.streamed:  # the stream the inline launches go to, read once per call (a capture's, while capturing)
        writer.lines.insert(1, f"    stream = {writer.constant(raw_stream)}({device.index or 0})")
    header = (f"# ember wrapper {name}: steps {start} to {stop - 1} of {len(steps)}"
              + (f", on {device}" if device is not None else "") + "\n")
    source = header + "\n".join(writer.lines) + "\n"
    filename = f"<ember wrapper {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show the line
    namespace = dict(writer.globals)
    exec(compile(source, filename, "exec"), namespace)
    if debug_dir:
        Path(debug_dir).mkdir(parents=True, exist_ok=True)
        (Path(debug_dir) / f"{name}_wrapper.py").write_text(source)
    log.debug("generated %s: %d lines for %d steps", filename, len(writer.lines), stop - start)
    return Wrapper(name, source, namespace[function_name], carried, bool(open_in), bool(open_out))


def _open_after(steps: Sequence[Step], arena_count: int) -> tuple[int, ...]:
    """The arenas open after `steps` run: opened by one of them and not closed since."""
    open_now = [False] * arena_count
    for step in steps:
        for index in step.opens:
            open_now[index] = True
        for index in step.closes:
            open_now[index] = False
    return tuple(index for index, is_open in enumerate(open_now) if is_open)


class _Input:
    """A stand-in for a step's input `index` when its argument builder is run at generation time."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Names:
    """Python identifiers, each given out once, derived from IR names."""

    def __init__(self) -> None:
        self.taken: set[str] = set(dir(builtins)) | {"arenas", "allocate", "device", "stream", "reinterpret_tensor"}

    def fresh(self, hint: str) -> str:
        base = re.sub(r"\W", "_", hint) or "value"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = "_" + base
        candidate, suffix = base, 1
        while candidate in self.taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        self.taken.add(candidate)
        return candidate


class _Writer:
    """The lines of one wrapper, with the identifiers it gave values, arenas and globals."""

    def __init__(self, graph: Graph, layout: ArenaLayout | None, device: torch.device | None,
                 allocate: Callable[[int, torch.device], torch.Tensor]):
        self.layout = layout
        self.device = device
        self.streamed = False
        """Whether a kernel is launched inline (the wrapper then reads the current stream on entry)."""
        self.names = _Names()
        self.lines: list[str] = []
        self.globals: dict[str, Any] = {"allocate": allocate, "device": device, "reinterpret_tensor": reinterpret_tensor}
        self.locals: dict[str, str] = {}
        self.weights: dict[str, str] = {}
        self.constants: dict[tuple[type, Any], str] = {}
        self.typed: dict[tuple[int, torch.dtype], str] = {}
        self.nodes = {node.name: node for node in graph.nodes}
        self.types = graph.types()
        self.exact: set[str] = set()
        """Values whose strides at run time are their type's: a `reinterpret_tensor` of them is exact."""
        self.uses: Counter[str] = Counter()
        """How often each value is read by the wrapper's steps and returned."""
        self.views: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], int]] = {}
        """A view of an exactly strided value read once, written where it is read: its root value (the first that
        is not such a view), sizes, strides and offset from the root. A chain of views is one alias."""
        self.consumed: set[str] = set()
        self.pending: Counter[str] = Counter()
        """Root value -> its views written where they are read and not read yet."""
        self.dead_roots: set[str] = set()
        """Roots whose values have died but whose views are still to be read: deleted after those reads."""
        self.aligned: set[str] = {name for name, tensor in graph.weights.items() if not tensor.data_ptr() % ALIGNED}
        """Values whose data pointer is ALIGNED at run time: weights that are, memory the allocator gives (an arena,
        a fresh result), and views of them at aligned offsets. A kernel reading and writing only these is launched
        directly, with no check of its pointers on each call."""
        self.graph_weights = graph.weights
        self.transposed: dict[str, str] = {}
        """Weight -> the global holding its transpose (made once, for matrix products)."""
        for value_name, tensor in graph.weights.items():
            identifier = self.names.fresh(value_name)
            self.weights[value_name] = identifier
            self.globals[identifier] = tensor
            value_type = self.types.get(value_name)
            if value_type is not None and tuple(tensor.shape) == value_type.shape \
                    and tuple(tensor.stride()) == tuple(value_type.layout):
                self.exact.add(value_name)

    def line(self, text: str, indent: int = 1) -> None:
        self.lines.append("    " * indent + text)

    def local(self, value: str) -> str:
        """The local variable holding IR value `value`."""
        if value not in self.locals:
            self.locals[value] = self.names.fresh(value)
        return self.locals[value]

    def value(self, value: str) -> str:
        """How to read IR value `value`: its weight global, a view written where it is read, else its local."""
        if value in self.views:
            _, shape, stride, _ = self.views[value]
            return self.reinterpret(value, shape, stride)
        return self.weights.get(value) or self.local(value)

    def reinterpret(self, value: str, shape: tuple[int, ...], stride: tuple[int, ...]) -> str:
        """Exactly strided `value` read at `shape` and `stride` from where it starts: one `reinterpret_tensor` of
        its root when it is a view written where it is read."""
        if value not in self.views:
            return f"reinterpret_tensor({self.value(value)}, {shape!r}, {stride!r}, 0)"
        root, _, _, offset = self.views[value]
        if value not in self.consumed:
            self.consumed.add(value)
            self.pending[root] -= 1
        return f"reinterpret_tensor({self.value(root)}, {shape!r}, {stride!r}, {offset})"

    def free(self, names: Sequence[str]) -> None:
        """`del` the locals of values that die here: not a view written where it is read (it has none), nor yet
        the value such a view, still unread, is made from (deleted once that view is read)."""
        dying = []
        for name in names:
            if name in self.views:
                continue
            if self.pending.get(name):
                self.dead_roots.add(name)
            else:
                dying.append(self.local(name))
        released = [root for root in self.dead_roots if not self.pending[root]]
        self.dead_roots.difference_update(released)
        dying += [self.local(root) for root in released]
        if dying:
            self.line(f"del {', '.join(dying)}")

    def constant(self, value: Any, hint: str | None = None) -> str:
        """A constant as a literal when it is one, else as a global (named by `hint`, or after the value)."""
        literal = _literal(value)
        if literal is not None:
            return literal
        key = (type(value), value if _hashable(value) else id(value))
        if key not in self.constants:
            if hint is None and isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
                hint = str(value).removeprefix("torch.")
            elif hint is None and isinstance(value, torch._ops.OpOverload):
                hint = str(value).replace(".", "_")
            self.constants[key] = self.names.fresh(hint or getattr(value, "__name__", "constant"))
            self.globals[self.constants[key]] = _direct(value)
        return self.constants[key]

    def arena(self, index: int) -> str:
        return f"arena_{index}"

    def arena_names(self, index: int) -> list[str]:
        """The arena's variable and its typed views."""
        return [self.arena(index)] + [name for (arena, _), name in self.typed.items() if arena == index]

    def type_arena(self, index: int, steps: Sequence[Step]) -> None:
        """Views of arena `index` as each dtype its slots written by `steps` hold, made once."""
        size_bytes = self.layout.arenas[index].size_bytes
        for dtype in dict.fromkeys(target[2].dtype for step in steps for target in step.targets
                                   if isinstance(target, tuple) and target[0] == index):
            name = f"arena_{index}_{self.constant(dtype)}"
            self.typed[(index, dtype)] = name
            whole = size_bytes - size_bytes % dtype.itemsize
            sliced = "" if whole == size_bytes else f"[:{whole}]"
            self.line(f"{name} = {self.arena(index)}{sliced}.view({self.constant(dtype)})")

    def memory(self, target: Any, inputs: Sequence[str]) -> str | None:
        """The expression for the memory a result is given (see executor.given_memory)."""
        if target is None:
            return None
        if isinstance(target, int):
            return inputs[target]
        index, offset, value_type = target
        if offset % value_type.dtype.itemsize:
            return f"{self.constant(slot_view)}({self.arena(index)}, {offset}, {self.constant(value_type, 'slot_type')})"
        return (f"reinterpret_tensor({self.typed[(index, value_type.dtype)]}, {value_type.shape!r}, "
                f"{value_type.layout!r}, {offset // value_type.dtype.itemsize})")

    def arguments(self, built: tuple[list[Any], dict[str, Any]], inputs: Sequence[str]) -> list[str]:
        """(args, kwargs) built from stand-ins, as call arguments in source."""
        args, kwargs = built
        text = [self.argument(arg, inputs) for arg in args]
        for key, arg in kwargs.items():
            if key.isidentifier() and not keyword.iskeyword(key):
                text.append(f"{key}={self.argument(arg, inputs)}")
            else:
                text.append(f"**{{{key!r}: {self.argument(arg, inputs)}}}")
        return text

    def argument(self, arg: Any, inputs: Sequence[str]) -> str:
        if isinstance(arg, _Input):
            return inputs[arg.index]
        if isinstance(arg, list):
            return "[" + ", ".join("None" if item is None else self.argument(item, inputs) for item in arg) + "]"
        return self.constant(arg)

    def step(self, step: Step) -> None:
        """The lines that run one step and bind its outputs."""
        inputs = [self.value(name) for name in step.inputs]
        outputs = [self.local(name) for name in step.outputs]
        given = [self.memory(target, inputs) for target in step.targets] or [None] * len(outputs)
        targets = step.targets or (None,) * len(outputs)
        self.aligned.update(name for name, target in zip(step.outputs, targets) if self._aligned_memory(step, target))
        if isinstance(step.call, GroupKernel):
            self._launch(step.call, inputs, outputs, given, step)
            self.exact.update(name for name, target in zip(step.outputs, targets)  # fresh at the value's strides,
                              if not isinstance(target, int) or step.inputs[target] in self.exact)  # or given
            return
        call = step.call
        built = call.build([_Input(index) for index in range(len(inputs))])
        self.exact.update(name for name, target in zip(step.outputs, targets) if target is not None and (
            not isinstance(target, int) or step.inputs[target] in self.exact))  # an arena slot, or an exact input
        if call.how == "cast":
            self.line(f"{outputs[0]} = {given[0]}.copy_({inputs[0]})")
            return
        if call.how == "reference" and self._view(step, built, outputs, given):
            return
        if call.how in ("reference", "linear") and self._matrix_product(step, built, outputs, given):
            return
        if call.op in ROW_MAJOR_RESULTS:
            self.exact.update(name for name, memory in zip(step.outputs, given)
                              if memory is None and self.types[name].is_contiguous)
        op = self.constant(call.op)
        if call.how == "in_place":
            self._bind(outputs, step.positions, {0: f"{op}({', '.join(self.arguments(built, inputs))})"})
        elif call.how == "linear":
            x, weight, bias = (self.argument(arg, inputs) if arg is not None else "None"
                               for arg in linear_arguments(*built))
            self._bind(outputs, step.positions, {0: f"{op}({x}, {weight}, {bias}, {given[0]})"})
        elif call.how == "out":
            order = [step.positions.index(position) for position in range(len(step.positions))]
            for output, memory in zip(outputs, given):
                self.line(f"{output} = {memory}")
            written = [f"{name}={outputs[index]}" for name, index in zip(call.out_names, order)]
            self.line(f"{op}({', '.join(self.arguments(built, inputs) + written)})")
        else:  # reference, copy_in: the op allocates its results; those given memory are copied into it
            expression = f"{op}({', '.join(self.arguments(built, inputs))})"
            held = None
            if _returns_one_tensor(call.op) and step.positions == (0,):
                results = {0: expression}
                value_type = self.types[step.outputs[0]]
                if call.op in LAID_OUT_RESULTS and given == [None] and value_type.storage_bytes == value_type.nbytes:
                    results = {0: f"{self.constant(laid_out)}({expression}, {value_type.shape!r}, "
                                  f"{tuple(value_type.layout)!r})"}
                    self.exact.add(step.outputs[0])
            else:
                held = self.names.fresh(f"{step.node}_results")
                self.line(f"{held} = {expression}")
                results = {position: f"{held}[{position}]" for position in step.positions}
            for output, position, memory in zip(outputs, step.positions, given):
                result = results[position]
                self.line(f"{output} = {result if memory is None else f'{memory}.copy_({result})'}")
            if held is not None:
                self.line(f"del {held}")

    def _aligned_memory(self, step: Step, target: Any) -> bool:
        """Whether the result given `target` (see executor.given_memory) starts ALIGNED: an arena slot at an
        aligned offset, an aligned input's memory, or memory allocated for it (by the wrapper, a generated kernel
        or an op returning a fresh tensor; not a view or an alias of an input, found by `_view`)."""
        if isinstance(target, tuple):
            return target[1] % ALIGNED == 0
        if isinstance(target, int):
            return step.inputs[target] in self.aligned
        if isinstance(step.call, GroupKernel):
            return True
        node = self.nodes.get(step.node)
        return (node is not None and not node.returns_view and step.call.how in ("reference", "copy_in", "linear", "out")
                and all(result.alias_info is None for result in node.definition.schema.returns))

    def _view(self, step: Step, built: tuple[list[Any], dict[str, Any]], outputs: Sequence[str],
              given: Sequence[str | None]) -> bool:
        """One view step of an exactly strided value as one `reinterpret_tensor` (its sizes, strides and offset
        found by running the op on a meta tensor of the source's type), of the first value its chain of views
        starts from; written where it is read when read once. False, writing nothing, for any other step."""
        node = self.nodes.get(step.node)
        if node is None or node.definition.kind != "view" or len(step.inputs) != 1 or step.positions != (0,) \
                or given[0] is not None or step.inputs[0] not in self.exact:
            return False
        source_type, result_type = self.types[step.inputs[0]], self.types[step.outputs[0]]
        meta = torch.empty_strided(source_type.shape, source_type.layout, dtype=source_type.dtype, device="meta")
        args, kwargs = built
        try:
            result = step.call.op(*_substitute(args, meta), **_substitute(kwargs, meta))
        except (RuntimeError, TypeError, ValueError):
            return False
        if not isinstance(result, torch.Tensor) or result.dtype != source_type.dtype \
                or tuple(result.shape) != result_type.shape or tuple(result.stride()) != tuple(result_type.layout):
            return False
        root, offset = step.inputs[0], result.storage_offset()
        if root in self.views:
            root, offset = self.views[root][0], self.views[root][3] + offset
        shape, stride = result_type.shape, tuple(result_type.layout)
        if self.uses[step.outputs[0]] == 1:
            self.views[step.outputs[0]] = (root, shape, stride, offset)
            self.pending[root] += 1
        else:
            self.line(f"{outputs[0]} = reinterpret_tensor({self.value(root)}, {shape!r}, {stride!r}, {offset})")
        self.exact.add(step.outputs[0])
        if step.inputs[0] in self.aligned and not result.storage_offset() * result.dtype.itemsize % ALIGNED:
            self.aligned.add(step.outputs[0])
        return True

    def _matrix_product(self, step: Step, built: tuple[list[Any], dict[str, Any]], outputs: Sequence[str],
                        given: Sequence[str | None]) -> bool:
        """A linear layer on an exactly strided, row-contiguous input and a weight as one `mm` (or, with a
        bias, on 2 or 3 dims, one `addmm`) of the rows into the result's rows, with the weight's transpose made
        once at generation: the call ATen's linear makes, without its dispatch through matmul and the views
        around it. False, writing nothing, for any other step."""
        node = self.nodes.get(step.node)
        if (node is None or node.definition.target != torch.ops.aten.linear.default or step.positions != (0,)
                or (step.targets and isinstance(step.targets[0], int))):  # never over an input it reads
            return False
        x, weight, bias = linear_arguments(*built)
        names = {name: step.inputs[arg.index] for name, arg in (("x", x), ("weight", weight), ("bias", bias))
                 if isinstance(arg, _Input)}
        if "x" not in names or (bias is not None and names.get("bias") not in self.graph_weights):
            return False
        x_type, out_type = self.types[names["x"]], self.types[step.outputs[0]]
        weight_tensor = self.graph_weights.get(names.get("weight", ""))
        if (names["x"] not in self.exact or not x_type.is_contiguous or len(x_type.shape) < 2
                or weight_tensor is None or weight_tensor.dim() != 2 or not weight_tensor.is_contiguous()
                or not out_type.is_contiguous or (bias is not None and len(x_type.shape) > 3)):
            return False
        features, rows = x_type.shape[-1], math.prod(x_type.shape[:-1])
        columns = out_type.shape[-1]
        if names["weight"] not in self.transposed:
            self.transposed[names["weight"]] = self.constant(weight_tensor.t(), f"{self.weights[names['weight']]}_t")
        transposed = self.transposed[names["weight"]]
        memory = given[0] or (f"{self.constant(torch.empty_strided)}({out_type.shape!r}, {out_type.layout!r}, "
                              f"dtype={self.constant(out_type.dtype)}, device={self.value(names['x'])}.device)")
        self.line(f"{outputs[0]} = {memory}")
        x_rows = self.reinterpret(names["x"], (rows, features), (features, 1))
        out_rows = f"reinterpret_tensor({outputs[0]}, ({rows}, {columns}), ({columns}, 1), 0)"
        if bias is None:
            self.line(f"{self.constant(torch.mm)}({x_rows}, {transposed}, out={out_rows})")
        else:
            self.line(f"{self.constant(torch.addmm)}({self.value(names['bias'])}, {x_rows}, {transposed}, out={out_rows})")
        self.exact.add(step.outputs[0])
        return True

    def _bind(self, outputs: Sequence[str], positions: Sequence[int], results: Mapping[int, str]) -> None:
        for output, position in zip(outputs, positions):
            self.line(f"{output} = {results[position]}")

    def _launch(self, group: GroupKernel, inputs: Sequence[str], outputs: Sequence[str],
                given: Sequence[str | None], step: Step) -> None:
        """A generated kernel: outputs into the memory given, else fresh tensors on its first input's device."""
        where = f"{inputs[0]}.device" if inputs else "device"
        for output, value, memory in zip(outputs, group.outputs, given):
            if memory is None:
                value_type = value.type
                memory = (f"{self.constant(torch.empty_strided)}({value_type.shape!r}, {value_type.layout!r}, "
                          f"dtype={self.constant(value_type.dtype)}, device={where})")
            self.line(f"{output} = {memory}")
        kernel = self.constant(group.kernel, group.name)
        call = f"{kernel}(({''.join(f'{name}, ' for name in inputs)}), ({''.join(f'{name}, ' for name in outputs)}))"
        dtypes = [self.types[name].dtype for name in group.inputs] + [value.type.dtype for value in group.outputs]
        direct = None if self.device is None else group.kernel.direct_launch(dtypes, self.device)
        if direct is None:
            self.line(call)
            return
        # the binary compiled for aligned pointers, launched as Kernel.__call__ would launch it, without its frame
        self.streamed = True
        tensors = [*inputs, *outputs]
        arguments = ", ".join([str(group.kernel.source.programs), "1", "1", "stream", str(direct.function),
                               self.constant(direct.metadata, f"{group.name}_metadata"), "None", "None", "None",
                               *tensors, *(self.constant(value) for value in direct.tail)])
        launch = f"{self.constant(direct.run, f'{group.name}_launch')}({arguments})"
        unknown = [name for name, value in zip(tensors, (*step.inputs, *step.outputs)) if value not in self.aligned]
        if not unknown:
            self.line(launch)
            return
        self.line(f"if ({' | '.join(f'{name}.data_ptr()' for name in unknown)}) & {ALIGNED - 1}:")
        self.line(call, indent=2)
        self.line("else:")
        self.line(launch, indent=2)


ALIGNED = 16
"""The byte alignment of every pointer a directly launched kernel was compiled for (Triton specializes on it)."""


def _as_strided_from(tensor: torch.Tensor, size: Sequence[int], stride: Sequence[int], offset_increment: int
                     ) -> torch.Tensor:
    return tensor.as_strided(size, stride, tensor.storage_offset() + offset_increment)


reinterpret_tensor: Callable[[torch.Tensor, Sequence[int], Sequence[int], int], torch.Tensor] = getattr(
    torch._C._dynamo.guards, "_reinterpret_tensor", _as_strided_from)
"""A view of `tensor` at these sizes and strides, `offset_increment` elements past its own offset: torch's alias
made without the dispatcher (what Inductor's wrappers call), else the same `as_strided`."""


ROW_MAJOR_RESULTS = frozenset({torch.ops.aten.linear.default, torch.ops.aten.embedding.default,
                               torch.ops.ember.grouped_mm.default, torch.ops.ember.linears.default,
                               torch.ops.ember.gated_linears.default})
"""Ops whose results are always fresh row-major tensors, whatever their inputs' strides (a matrix product's
output, rows gathered from a table): exactly strided when the IR type says row-major."""

LAID_OUT_RESULTS = frozenset({torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.convolution.default})
"""Ops whose result's strides follow the kernel torch picks at run time (a fused attention's are its kernel's
choice; cuDNN returns a convolution channels-last where its input is, whatever tracing said): the wrapper holds
the result at its IR type's strides (`laid_out`), so that generated kernels, views and matrix products after it
read it exactly rather than asking torch (three dispatches a layer on BERT)."""


def laid_out(tensor: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """`tensor` when it has these strides and starts its storage, else a copy of it at them."""
    if tensor.stride() == stride and not tensor.storage_offset():
        return tensor
    return torch.empty_strided(shape, stride, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def _substitute(built: Any, tensor: torch.Tensor) -> Any:
    """`built` (arguments with input stand-ins) with every stand-in replaced by `tensor`."""
    if isinstance(built, _Input):
        return tensor
    if isinstance(built, (list, tuple)):
        return type(built)(_substitute(item, tensor) for item in built)
    if isinstance(built, dict):
        return {key: _substitute(item, tensor) for key, item in built.items()}
    return built


def _returns_one_tensor(op: Any) -> bool:
    """Whether the op returns one tensor (not a tuple or list of them)."""
    return isinstance(op, torch._ops.OpOverload) and [str(r.type) for r in op._schema.returns] == ["Tensor"]


def _direct(value: Any) -> Any:
    """What the wrapper calls for `value`: ember's Python implementation of one of its own ops, an ATen
    overload's own operator (OpOverload.__call__ only forwards to it), else the value itself."""
    if type(value) is not torch._ops.OpOverload:
        return value
    return PYTHON_IMPLEMENTATIONS.get(value, value._op)


def _literal(value: Any) -> str | None:
    """`value` as Python source that evaluates to an equal value of the same type, or None."""
    if value is None or type(value) in (bool, int, str):
        return repr(value)
    if type(value) is float:
        return repr(value) if math.isfinite(value) else None
    if type(value) in (tuple, list):
        items = [_literal(item) for item in value]
        if any(item is None for item in items):
            return None
        text = ", ".join(items) + ("," if type(value) is tuple and len(items) == 1 else "")
        return f"({text})" if type(value) is tuple else f"[{text}]"
    return None


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
