"""Buffer lifetimes in execution order: what memory planning and `inspect` measure peaks from.

A buffer is a node output that owns memory; views share their base's buffer and extend its life.
Graph inputs and weights are not buffers (they live outside the program's arena).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph


@dataclass(frozen=True, slots=True)
class Buffer:
    """An intermediate that owns memory, live on the closed step interval [start, end]."""

    name: str
    size_bytes: int
    start: int
    end: int


def base_of(graph: Graph) -> dict[str, str]:
    """Intermediate value -> the owning intermediate whose memory it uses (itself, unless it is a view)."""
    bases: dict[str, str] = {}
    for node in graph.nodes:
        is_view = node.definition.kind == "view"
        for value in node.outputs:
            if not is_view:
                bases[value.name] = value.name
            elif node.inputs and node.inputs[0] in bases:
                bases[value.name] = bases[node.inputs[0]]
            # else: a view of an input or weight owns nothing of the program's
    return bases


def buffers(graph: Graph) -> tuple[Buffer, ...]:
    """Every owning intermediate of the graph, with its lifetime; graph outputs live to the last step."""
    bases = base_of(graph)
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    size: dict[str, int] = {}
    for step, node in enumerate(graph.nodes):
        for name in node.inputs:
            if name in bases:
                end[bases[name]] = step
        for value in node.outputs:
            if bases.get(value.name) == value.name:
                start[value.name] = end[value.name] = step
                size[value.name] = value.type.storage_bytes
    last = len(graph.nodes) - 1
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
