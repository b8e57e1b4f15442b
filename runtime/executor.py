"""The reference executor: runs a Graph node by node with the op table's reference implementations.

It is the correctness oracle for every later pass and the fallback when no kernel can be generated.
Each node's call is bound once; a value is dropped right after its last use. Given an arena layout, the
intermediates live in arenas that each call allocates as their windows of steps open and frees as they close.
Calls run the steps through a wrapper generated from them (runtime/wrapper.py); the step loop here stays as
the oracle that wrapper is tested against, and runs the calls autograd records.
"""
from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..codegen import GroupKernel
from ..ir import ArenaLayout, Graph, Node, TensorType, Value
from ..ir.schedule import Schedule, schedule_of
from .arena import Call, GivenRun, bind_call, plan_call, slot_view
from .cuda_graph import WARM_UP_CALLS, GraphedCall, PoolInUse
from .wrapper import Wrapper, generate_wrapper

log = logging.getLogger(__name__)


Target = int | tuple[int, int, TensorType] | None
"""Where a step's result goes: over the step's input at this index, into (arena, byte offset, type), or
memory the op allocates (None)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One node or kernel, ready to run: its bound call (and, as data, how it calls: the node's `Call` or the
    kernel), the values it reads and writes, where its results go, the arenas that open before it and close
    after it, and the values that die after it."""

    node: str
    run: GivenRun
    call: Call | GroupKernel
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    positions: tuple[int, ...]
    frees: tuple[str, ...]
    targets: tuple[Target, ...] = ()
    opens: tuple[int, ...] = ()
    closes: tuple[int, ...] = ()


def plan_steps(schedule: Schedule, graph: Graph, layout: ArenaLayout | None = None,
               work: Sequence[Node | GroupKernel] | None = None, device: str | None = None) -> tuple[Step, ...]:
    """Bind every step of `schedule`: the graph's nodes, or the items of `work` (nodes and generated kernels in the
    schedule's order), with their results going where `layout` puts them (for a call on `device`), each value
    freed after the schedule's last read of it."""
    items = tuple(graph.nodes) if work is None else tuple(work)
    if [item.name for item in items] != [step.name for step in schedule.steps]:
        raise ValueError("the steps to bind are not the schedule's: a fused program needs the schedule of its fusion plan")
    keep = set(graph.outputs) | {value.name for value in (*graph.inputs, *graph.params)}
    dies_at: dict[int, list[str]] = {}
    for index, step in enumerate(schedule.steps):  # a value dies after its last read, or at once if nothing reads it
        for value in step.writes:
            if value.name not in keep:
                dies_at.setdefault(schedule.last_read.get(value.name, index), []).append(value.name)
    opens: dict[int, list[int]] = {}
    closes: dict[int, list[int]] = {}
    for index, arena in enumerate(layout.arenas if layout else ()):
        opens.setdefault(arena.first_step, []).append(index)
        closes.setdefault(arena.last_step, []).append(index)
    steps = []
    for index, item in enumerate(items):
        targets = tuple(_target(value, item.inputs, layout, device) if layout else None for value in item.outputs)
        given = [target is not None for target in targets]
        if isinstance(item, GroupKernel):
            run, call, positions = _launch(item), item, tuple(range(len(item.outputs)))
        else:
            over_first = len(targets) == 1 and targets[0] == 0 and not item.is_extern
            call = plan_call(item, given, over_first)
            run, positions = bind_call(item, call), item.result_positions
        steps.append(Step(item.name, run, call, item.inputs, tuple(v.name for v in item.outputs), positions,
                          tuple(dies_at.get(index, ())), targets if any(given) else (), tuple(opens.get(index, ())),
                          tuple(closes.get(index, ()))))
    return tuple(steps)


def _target(value: Value, inputs: tuple[str, ...], layout: ArenaLayout, device: str | None) -> Target:
    if value.name in layout.reuses:
        return inputs.index(layout.reuses[value.name])
    slot = layout.slots.get(value.name)
    if slot is None or slot[2].device != device:
        return None  # allocated by the op (a value made on another device is allocated there)
    return slot


def given_memory(step: Step, arenas: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The memory each of the step's results is written into on this call (None: the op allocates it)."""
    return [target if target is None else inputs[target] if isinstance(target, int)
            else slot_view(arenas[target[0]], target[1], target[2]) for target in step.targets]


def _launch(group: GroupKernel) -> GivenRun:
    """A generated kernel as a step: its outputs go into the memory given, fresh tensors otherwise."""

    def run(inputs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        device = inputs[0].device
        outputs = tuple(
            out if out is not None else torch.empty_strided(
                value.type.shape, value.type.layout, dtype=value.type.dtype, device=device)
            for out, value in zip(outs or (None,) * len(group.outputs), group.outputs))
        group.kernel(inputs, outputs)
        return outputs

    return run


RECAPTURE_AFTER = 8
"""A call handing an input the model updates in place (a static KV cache) in other memory than the capture aliases
is captured again on the new memory when the old capture served at least this many calls (transformers makes a
new static cache per generate and reuses it for every token); sooner, the memory changes too often to capture
each time, and the new capture copies such inputs in on every call instead."""


class Executor:
    """Runs one Graph; holds the bound steps and, per device, the generated wrapper that runs them.

    With an arena layout, each call allocates every arena when its window of steps opens and drops it when
    the window closes (under CUDA graphs, once, at capture); with `work` (from codegen's `lower_schedule`),
    fused groups run as generated kernels. A call runs the steps through a wrapper generated on the device's
    first call (runtime/wrapper.py), which does what the step loop (`interpret`) does at less host cost per
    step. A call that autograd records (grad mode on and an input or weight requiring grad) runs the plain
    reference steps of the `captured` graph (as captured, before any pass), step by step: neither `out=` calls
    nor generated kernels are differentiable, and a weight a pass made at compile time (a padded or folded
    copy) would carry no gradient back to the weight it was made from.
    """

    def __init__(self, graph: Graph, layout: ArenaLayout | None = None, work: Sequence[Node | GroupKernel] | None = None,
                 cuda_graphs: bool = False, *, name: str = "program", debug_dir: str | None = None,
                 written_back: int = 0, updated_inputs: tuple[int, ...] = (), captured: Graph | None = None,
                 schedule: Schedule | None = None):
        self.graph = graph
        self.captured = captured if captured is not None and _same_signature(captured, graph) else graph
        self.written_back = written_back
        self.aliased = frozenset(updated_inputs)
        self.cuda_graphs = cuda_graphs
        self.graphed: dict[torch.device, GraphedCall | None] = {}
        self.layout = layout
        self.work = work
        self.name = name
        self.debug_dir = debug_dir
        self.schedule = schedule_of(graph) if schedule is None else schedule
        self.reference_steps = plan_steps(schedule_of(self.captured), self.captured)
        self.steps = plan_steps(self.schedule, graph, work=work)
        self.input_names = tuple(value.name for value in graph.inputs)
        self._steps_on: dict[str, tuple[Step, ...]] = {}
        self._wrappers: dict[torch.device | None, Wrapper] = {}
        self._split: dict[torch.device, tuple[Wrapper, Wrapper, bool]] = {}
        """Per device, the wrappers of a captured call (the part captured, the tail run after each replay) and
        whether the tail runs any step."""

    def records_grad(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether autograd records a call on `inputs` (it then runs the captured graph's reference steps)."""
        return _records_grad(inputs, self.captured.weights)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if _records_grad(inputs, self.captured.weights):
            return self._run(self.reference_steps, inputs, graph=self.captured)
        device = None if self.layout is None else _device_of(inputs, self.graph)
        if self.cuda_graphs and device is not None and device.type == "cuda":
            try:
                outputs = self._replay(device, inputs)
            except PoolInUse:  # the caller holds a view of the last call's outputs that a replay would overwrite
                outputs = None
            if outputs is not None:
                return outputs
        return self.wrapper_on(device).function(*inputs)

    def _replay(self, device: torch.device, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The call through this device's captured graph (captured again for an updated input handed in other
        memory); None where the program cannot be captured."""
        graphed = self._graphed_on(device, inputs)
        outputs = None if graphed is None else graphed(inputs)
        if outputs is None and graphed is not None:  # an updated input in other memory: capture again
            if graphed.calls < RECAPTURE_AFTER:
                log.info("an input the model updates in place came in other memory after %d calls: capturing "
                         "again, copying such inputs in on every call", graphed.calls)
                self.aliased = frozenset()
            del self.graphed[device], graphed  # its pool is freed before the next capture takes one
            graphed = self._graphed_on(device, inputs)
            outputs = None if graphed is None else graphed(inputs)
        return outputs

    def interpret(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The call, step by step in the executor's loop rather than through the generated wrapper (and never
        captured): the oracle the wrapper is held to."""
        if _records_grad(inputs, self.captured.weights):
            return self._run(self.reference_steps, inputs, graph=self.captured)
        if self.layout is None:
            return self._run(self.steps, inputs)
        device = _device_of(inputs, self.graph)
        return self._run(self.steps_on(device), inputs, device)

    def prepare(self, device: torch.device) -> None:
        """Bind the steps for calls on `device` now, when the program is built, and generate the wrapper that runs
        them uncaptured (a captured program's wrappers are generated when it is captured)."""
        if self.layout is None:
            self.wrapper_on(None)
        elif self.cuda_graphs and device.type == "cuda":
            self.steps_on(device)
        else:
            self.wrapper_on(device)

    def wrapper_on(self, device: torch.device | None) -> Wrapper:
        """The generated function running every step for calls on `device` (None: without an arena)."""
        if device not in self._wrappers:
            self._wrappers[device] = self._generate(device, name=self.name)
        return self._wrappers[device]

    def _generate(self, device: torch.device | None, **range_args) -> Wrapper:
        steps = self.steps if device is None else self.steps_on(device)
        return generate_wrapper(steps, self.graph, self.layout, device, _allocate, debug_dir=self.debug_dir,
                                **range_args)

    def _graphed_on(self, device: torch.device, inputs: Sequence[torch.Tensor]) -> GraphedCall | None:
        """This device's captured call, captured on first use; None (and one warning) if it cannot be."""
        if device not in self.graphed:
            if device not in self._split:
                steps = self.steps_on(device)
                split = tail_start(self.schedule, self.graph)
                carried = _carried(steps[:split], steps[split:], self.graph)
                self._split[device] = (self._generate(device, name=f"{self.name}_captured", stop=split, returns=carried),
                                       self._generate(device, name=f"{self.name}_tail", start=split, carried=carried),
                                       split < len(steps))
                warm_up = WARM_UP_CALLS
            else:  # captured before: what runs lazily once (cuBLAS handles, kernel loads) has run
                warm_up = 0
            prefix, tail, has_tail = self._split[device]

            def run_prefix(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
                # arenas still open are the tail's too
                return prefix.function(*tensors) if prefix.arenas_out else (prefix.function(*tensors), [])

            def run_tail(tensors: Sequence[torch.Tensor], handed: tuple[list[torch.Tensor], list[torch.Tensor | None]]
                         ) -> list[torch.Tensor]:
                values, arenas = handed
                return tail.function(*tensors, *values, *([arenas] if tail.arenas_in else []))

            try:
                self.graphed[device] = GraphedCall(run_prefix, run_tail, inputs, device, written_back=self.written_back,
                                                   staged=_staged_inputs(self.graph, device), aliased=self.aliased,
                                                   unrepeatable=self._unrepeatable(), warm_up=warm_up,
                                                   tail=has_tail)
            except RuntimeError as error:
                log.warning("running step by step: this program cannot be captured in a CUDA graph (%s)%s",
                            str(error).splitlines()[0], _failing_line(error))
                self.graphed[device] = None
        return self.graphed[device]

    def _unrepeatable(self) -> frozenset[int]:
        """Positions of the inputs an update is written over that a second run would change again."""
        names = self.layout.unrepeatable if self.layout else frozenset()
        return frozenset(position for position, value in enumerate(self.graph.inputs) if value.name in names)

    def _run(self, steps: Sequence[Step], inputs: Sequence[torch.Tensor], device: torch.device | None = None,
             graph: Graph | None = None) -> list[torch.Tensor]:
        graph = graph or self.graph
        env = dict(graph.weights)
        env.update(zip(self.input_names, inputs))
        env = self._execute(steps, env, self._arenas(), device)
        return [env[name] for name in graph.outputs]

    def _arenas(self) -> list[torch.Tensor | None]:
        return [None] * (len(self.layout.arenas) if self.layout else 0)

    def _execute(self, steps: Sequence[Step], env: dict[str, torch.Tensor], arenas: list[torch.Tensor | None],
                 device: torch.device | None) -> dict[str, torch.Tensor]:
        """Run `steps` on the values in `env`, opening and closing arenas as they say; returns `env`."""
        for step in steps:
            for index in step.opens:
                arenas[index] = _allocate(self.layout.arenas[index].size_bytes, device)
            args = [env[name] for name in step.inputs]
            results = step.run(args, given_memory(step, arenas, args) if step.targets else ())
            env.update(zip(step.outputs, (results[position] for position in step.positions)))
            for name in step.frees:
                del env[name]
            for index in step.closes:
                arenas[index] = None
        return env

    def steps_on(self, device: torch.device) -> tuple[Step, ...]:
        """The steps bound to put their results where the layout says, for calls on this device."""
        if device.type not in self._steps_on:
            self._steps_on[device.type] = plan_steps(self.schedule, self.graph, self.layout, self.work, device.type)
        return self._steps_on[device.type]


MAX_TAIL_STEPS = 4
"""The most steps after a captured CUDA graph that run on their own, so that the outputs they make need no copy."""

TAIL_MIN_BYTES = 64 << 20
"""Outputs of the last steps that hold fewer bytes in all are made inside the graph too. Lent from its memory,
they cost a copy only where the caller keeps them into the next call (64 MiB: about 20 µs of an H100's or
H200's bandwidth), while each step run after the replay costs the host about 10 µs on every call: a decode
step's logits, an encoder's hidden states. A language model's logits over a long prompt (hundreds of MiB) are
made after the graph."""


def tail_start(schedule: Schedule, graph: Graph, min_bytes: int = TAIL_MIN_BYTES) -> int:
    """Where a captured call's graph ends: before the first step that makes the memory of an output among the
    last few steps, when those outputs hold `min_bytes` or more (outputs made inside a graph live in its memory,
    which the next replay overwrites, so the caller gets copies of those it keeps: a language model's logits
    are made after the graph, while the KV cache its layers made early is lent); else after the last step."""
    steps = len(schedule.steps)
    late = {name: schedule.made_at(name) for name in graph.outputs
            if name in schedule.made and steps - schedule.made_at(name) <= MAX_TAIL_STEPS}
    types = graph.types()
    if sum(types[name].storage_bytes for name in late) < min_bytes:
        return steps
    return min(late.values(), default=steps)


def _failing_line(error: BaseException) -> str:
    """" at `line` of the generated wrapper" for the wrapper line an error came from, else nothing."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename.startswith("<ember wrapper")]
    return f" at `{frames[-1].line.strip()}` in {frames[-1].filename}" if frames and frames[-1].line else ""


def _carried(prefix: Sequence[Step], tail: Sequence[Step], graph: Graph) -> tuple[str, ...]:
    """Values the graph part of a call hands on: those its steps make that the tail reads or the call returns."""
    made = {name for step in prefix for name in step.outputs}
    wanted = [name for step in tail for name in step.inputs] + list(graph.outputs)
    return tuple(dict.fromkeys(name for name in wanted if name in made))


def _same_signature(captured: Graph, graph: Graph) -> bool:
    """Whether two graphs take the same inputs and return the same number of outputs (passes keep both)."""
    return [value.name for value in captured.inputs] == [value.name for value in graph.inputs] and \
        len(captured.outputs) == len(graph.outputs)


def _staged_inputs(graph: Graph, device: torch.device) -> frozenset[int]:
    """Positions of CPU inputs that the graph only copies to `device` (a step counter transformers keeps on the
    CPU): a capture cannot copy from pageable host memory, so their captured buffers live on the device and each
    call's value is copied there before the replay."""
    readers: dict[str, list[Node]] = {value.name: [] for value in graph.inputs}
    for node in graph.nodes:
        for name in node.inputs:
            if name in readers:
                readers[name].append(node)
    return frozenset(position for position, value in enumerate(graph.inputs)
                     if value.type.device == "cpu" and readers[value.name]
                     and all(node.definition.converts and torch.device(node.attrs.get("device", "cpu")).type == device.type
                             for node in readers[value.name]))


def _allocate(size_bytes: int, device: torch.device) -> torch.Tensor:
    """An arena: a plain tensor, writable inside and outside inference mode (made outside it: leaving inference
    mode costs a call a few microseconds per arena, so only a call inside it does)."""
    if not torch.is_inference_mode_enabled():
        return torch.empty(size_bytes, dtype=torch.uint8, device=device)
    with torch.inference_mode(False):
        return torch.empty(size_bytes, dtype=torch.uint8, device=device)


def _records_grad(inputs: Sequence[torch.Tensor], weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether autograd would record this call."""
    return torch.is_grad_enabled() and (any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
                                        or any(t.requires_grad for t in weights.values()))


def _device_of(inputs: Sequence[torch.Tensor], graph: Graph) -> torch.device:
    """Where this call runs: its first tensor input's device, else the weights', else the CPU."""
    for tensor in (*inputs, *graph.weights.values()):
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")
