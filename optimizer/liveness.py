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


def buffers(graph: Graph) -> tuple[Buffer, ...]:
    """Every owning intermediate of the graph, with its lifetime; graph outputs live to the last step."""
    base_of: dict[str, str] = {}
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    size: dict[str, int] = {}
    for step, node in enumerate(graph.nodes):
        for name in node.inputs:
            if name in base_of:
                end[base_of[name]] = step
        is_view = node.definition.kind == "view"
        for value in node.outputs:
            if is_view and node.inputs and node.inputs[0] in base_of:
                base_of[value.name] = base_of[node.inputs[0]]
            elif is_view:
                continue  # a view of an input or weight owns nothing of the program's
            else:
                base_of[value.name] = value.name
                start[value.name] = end[value.name] = step
                size[value.name] = value.type.nbytes
    last = len(graph.nodes) - 1
    for name in graph.outputs:
        if name in base_of:
            end[base_of[name]] = last
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
