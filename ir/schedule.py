"""The schedule: a program's steps in execution order and the lifetimes they imply, worked out once from the graph
and its fusion plan, and read by memory planning, the executor, reordering and inspection.

A buffer is a node output that owns memory; views share their base's buffer and extend its life. An elementwise
step (a fused pointwise or row kernel, an ATen pointwise op with out=) writes a result over an input it reads for
the last time when both have the same type, as Inductor does: the result then shares the input's buffer. Graph
inputs and weights are not buffers (they live outside the program's arena).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from .graph import Graph, Node, Value
from .plans import FusionPlan
from .schema import inplace_overload
from .types import TensorType


class Writes(enum.Enum):
    """How a step writes its results."""

    VIEW = "view"
    """Its results view its first input."""
    ELEMENTWISE = "elementwise"
    """Each result element is computed, in one program, from input elements at its own index or row, so a result
    may overwrite any input of its type."""
    IN_PLACE = "in_place"
    """Elementwise, or overwriting positions of its first input, but only over its first input, through the op's
    in-place variant."""
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ScheduleStep:
    """One step of execution: a node, or a fusion group run as one kernel (which writes only the values read after
    it or returned)."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[Value, ...]
    how: Writes


@dataclass(frozen=True, slots=True)
class Buffer:
    """An intermediate that owns memory, live on the closed step interval [start, end]."""

    name: str
    size_bytes: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Schedule:
    """The steps in order and what they imply for memory.

    bases: intermediate -> the owning intermediate whose memory it uses (itself, unless it is a view or a result
    written over an input); views: the same through views only (what a reordering keeps); reused: result -> the
    input its step writes it over; last_read: value -> the last step reading it (returned values: len(steps));
    buffers: every owning intermediate with its lifetime (graph outputs live to the last step)."""

    steps: tuple[ScheduleStep, ...]
    bases: Mapping[str, str]
    views: Mapping[str, str]
    reused: Mapping[str, str]
    last_read: Mapping[str, int]
    buffers: tuple[Buffer, ...]
    made: Mapping[str, int]
    """Value -> the step writing it."""

    def made_at(self, name: str) -> int:
        """The step that writes the memory `name` lives in: its base's (an owning intermediate's, or for a view of
        an input or weight, the view's own)."""
        return self.made[self.bases.get(name, name)]


def schedule_of(graph: Graph, fusion: FusionPlan | None = None) -> Schedule:
    """The graph's schedule: its nodes in order, or with a fusion plan, the plan's order of groups and nodes."""
    steps = _steps(graph, fusion)
    kept = set(graph.outputs)
    last_read: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.reads:
            last_read[name] = index
    last_read.update((name, len(steps)) for name in kept)
    bases, views, reused = _bases(steps, last_read, kept, graph.types())
    return Schedule(steps, bases, views, reused, last_read, _buffers(steps, bases, graph.outputs),
                    {value.name: index for index, step in enumerate(steps) for value in step.writes})


def _steps(graph: Graph, fusion: FusionPlan | None) -> tuple[ScheduleStep, ...]:
    if fusion is None:
        return tuple(ScheduleStep(node.name, node.inputs, node.outputs, _writes(node)) for node in graph.nodes)
    nodes = {node.name: node for node in graph.nodes}
    groups = {group.name: group for group in fusion.groups}
    types = graph.types()
    steps = []
    for name in fusion.schedule:
        if name in groups:
            group = groups[name]
            steps.append(ScheduleStep(name, group.inputs, tuple(Value(v, types[v]) for v in group.outputs),
                                      Writes.ELEMENTWISE))
        else:
            node = nodes[name]
            steps.append(ScheduleStep(name, node.inputs, node.outputs, _writes(node)))
    return tuple(steps)


def _writes(node: Node) -> Writes:
    if node.returns_view:
        return Writes.VIEW
    if node.definition.overwrites and inplace_overload(node.definition.target) is not None:
        return Writes.IN_PLACE  # its first input with positions written: written over it where it dies, not copied
    if node.definition.kind != "pointwise" or node.is_cast or node.is_extern:
        return Writes.OTHER
    if node.fills_given_memory:
        return Writes.ELEMENTWISE
    return Writes.IN_PLACE if inplace_overload(node.definition.target) is not None else Writes.OTHER


def _bases(steps: tuple[ScheduleStep, ...], last_read: Mapping[str, int], kept: set[str],
           types: Mapping[str, TensorType]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(bases, views, reused) as `Schedule` describes them: a result is written over an input of its type, dense,
    in an intermediate's memory that nothing reads later nor through another value in that step, the input not a
    graph output. A returned result may be, over an input that owns its memory (not itself written over another,
    so that runtime.executor.tail_start still finds a late output late): that memory is then allocated on each call
    outside the arenas, as every returned value's is, and a returned softcap over the logits needs no second
    logits buffer."""
    bases: dict[str, str] = {}
    views: dict[str, str] = {}
    base_last: dict[str, int] = {}  # owning value -> the last step reading it or anything sharing its memory
    reused: dict[str, str] = {}
    for index, step in enumerate(steps):
        taken: set[str] = set()
        for value in step.writes:
            name = value.name
            if step.how is Writes.VIEW:
                if not step.reads or step.reads[0] not in bases:
                    continue  # a view of an input or weight owns nothing of the program's
                bases[name], views[name] = bases[step.reads[0]], views[step.reads[0]]
            else:
                bases[name] = views[name] = name
                if step.how in (Writes.ELEMENTWISE, Writes.IN_PLACE):
                    candidates = step.reads[:1] if step.how is Writes.IN_PLACE else step.reads
                    if name in kept:
                        candidates = tuple(source for source in candidates if bases.get(source) == source)
                    source = _overwritable(name, candidates, step.reads, index, bases, base_last, types, kept | taken)
                    if source is not None:
                        reused[name], bases[name] = source, bases[source]
                        taken.add(bases[source])
            base = bases[name]
            base_last[base] = max(base_last.get(base, index), last_read.get(name, index))
    return bases, views, reused


def _overwritable(name: str, candidates: tuple[str, ...], reads: tuple[str, ...], step: int, bases: Mapping[str, str],
                  base_last: Mapping[str, int], types: Mapping[str, TensorType], excluded: set[str]) -> str | None:
    """The input among `candidates` that result `name` may be written over, if any: an intermediate or a dense
    view of one, laid out as the result is, whose memory nothing reads later or through another input here."""
    for source in candidates:
        base = bases.get(source)
        source_type = types[source]
        if (base is not None and base not in excluded and base_last[base] == step
                and same_memory_type(source_type, types[name]) and dense(source_type)
                and all(other == source or bases.get(other) != base for other in reads)):
            return source
    return None


def _buffers(steps: tuple[ScheduleStep, ...], bases: Mapping[str, str], outputs: tuple[str, ...]) -> tuple[Buffer, ...]:
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    size: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.reads:
            if name in bases:
                end[bases[name]] = index
        for value in step.writes:
            if bases.get(value.name) == value.name:
                start[value.name] = end[value.name] = index
                size[value.name] = value.type.storage_bytes
    for name in outputs:
        if name in bases:
            end[bases[name]] = len(steps) - 1
    return tuple(Buffer(name, size[name], start[name], end[name]) for name in start)


def dense(type_: TensorType) -> bool:
    """Whether the type's elements fill its storage, without gaps."""
    return type_.storage_bytes == math.prod(type_.shape) * type_.dtype.itemsize


def same_memory_type(a: TensorType, b: TensorType) -> bool:
    """Whether element i of one lives where element i of the other does."""
    return (a.shape, a.dtype, a.layout, a.device) == (b.shape, b.dtype, b.layout, b.device)
