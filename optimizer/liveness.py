"""Buffer lifetimes in execution order: what memory planning and `inspect` measure peaks from.

A buffer is a node output that owns memory; views share their base's buffer and extend its life.
Graph inputs and weights are not buffers (they live outside the program's arena).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..ir import Graph, Value

if TYPE_CHECKING:
    from .fusion import FusionPlan


@dataclass(frozen=True, slots=True)
class Buffer:
    """An intermediate that owns memory, live on the closed step interval [start, end]."""

    name: str
    size_bytes: int
    start: int
    end: int


StepSpec = tuple[str, tuple[str, ...], tuple[Value, ...], bool]
"""One step of execution: (name, values read, values written, whether its results view its first input)."""


def steps_of(graph: Graph, fusion: FusionPlan | None = None) -> list[StepSpec]:
    """The graph's steps in execution order: its nodes, or with a fusion plan, its schedule (a group is one
    step that writes only the values read after it)."""
    nodes = {node.name: node for node in graph.nodes}
    if fusion is None:
        return [(node.name, node.inputs, node.outputs, node.definition.kind == "view") for node in graph.nodes]
    groups = {group.name: group for group in fusion.groups}
    types = graph.types()
    steps: list[StepSpec] = []
    for name in fusion.schedule:
        if name in groups:
            group = groups[name]
            steps.append((name, group.inputs, tuple(Value(v, types[v]) for v in group.outputs), False))
        else:
            node = nodes[name]
            steps.append((name, node.inputs, node.outputs, node.definition.kind == "view"))
    return steps


def base_of(graph: Graph, fusion: FusionPlan | None = None) -> dict[str, str]:
    """Intermediate value -> the owning intermediate whose memory it uses (itself, unless it is a view)."""
    bases: dict[str, str] = {}
    for _, reads, writes, is_view in steps_of(graph, fusion):
        for value in writes:
            if not is_view:
                bases[value.name] = value.name
            elif reads and reads[0] in bases:
                bases[value.name] = bases[reads[0]]
            # else: a view of an input or weight owns nothing of the program's
    return bases


def buffers(graph: Graph, fusion: FusionPlan | None = None) -> tuple[Buffer, ...]:
    """Every owning intermediate of the graph (values inside a fused group own nothing), with its lifetime in
    steps; graph outputs live to the last step."""
    steps = steps_of(graph, fusion)
    bases = base_of(graph, fusion)
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    size: dict[str, int] = {}
    for index, (_, reads, writes, _) in enumerate(steps):
        for name in reads:
            if name in bases:
                end[bases[name]] = index
        for value in writes:
            if bases.get(value.name) == value.name:
                start[value.name] = end[value.name] = index
                size[value.name] = value.type.storage_bytes
    last = len(steps) - 1
    for name in graph.outputs:
        if name in bases:
            end[bases[name]] = last
    return tuple(Buffer(name, size[name], start[name], end[name]) for name in start)


def live_bytes(all_buffers: tuple[Buffer, ...], steps: int) -> list[int]:
    """Bytes live at each step."""
    live = [0] * (steps + 1)
    for buffer in all_buffers:
        live[buffer.start] += buffer.size_bytes
        live[buffer.end + 1] -= buffer.size_bytes
    running, result = 0, []
    for delta in live[:steps]:
        running += delta
        result.append(running)
    return result


def peak_live_bytes(graph: Graph) -> tuple[int, int]:
    """(max over steps of live bytes, the first step reaching it): the lower bound of any arena in this order."""
    per_step = live_bytes(buffers(graph), len(graph.nodes))
    if not per_step:
        return 0, 0
    peak = max(per_step)
    return peak, per_step.index(peak)
