"""The reference executor: runs a Graph node by node with the op table's reference implementations.

It is the correctness oracle for every later pass and the fallback when no kernel can be generated.
Each node's call is bound once; a value is dropped right after its last use.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ir import Graph
from ..ir.ops import Reference


@dataclass(frozen=True, slots=True)
class Step:
    """One node, ready to run: its bound reference, the values it reads and writes, and those it frees."""

    node: str
    run: Reference
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    positions: tuple[int, ...]
    frees: tuple[str, ...]


def plan_steps(graph: Graph) -> tuple[Step, ...]:
    """Bind every node and work out when each intermediate value dies."""
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            last_use[name] = index
    keep = set(graph.outputs) | {value.name for value in (*graph.inputs, *graph.params)}
    dies_at: dict[int, list[str]] = {}
    for name, index in last_use.items():
        if name not in keep:
            dies_at.setdefault(index, []).append(name)
    for index, node in enumerate(graph.nodes):  # outputs that nothing reads die at once
        for value in node.outputs:
            if value.name not in last_use and value.name not in keep:
                dies_at.setdefault(index, []).append(value.name)
    return tuple(
        Step(node.name, node.definition.bind(node.attrs), node.inputs, tuple(v.name for v in node.outputs),
             node.result_positions, tuple(dies_at.get(index, ())))
        for index, node in enumerate(graph.nodes)
    )


class Executor:
    """Runs one Graph; holds the bound steps so each call is a loop of op calls."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.steps = plan_steps(graph)
        self.input_names = tuple(value.name for value in graph.inputs)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        env = dict(self.graph.weights)
        env.update(zip(self.input_names, inputs))
        for step in self.steps:
            results = step.run([env[name] for name in step.inputs])
            env.update(zip(step.outputs, (results[position] for position in step.positions)))
            for name in step.frees:
                del env[name]
        return [env[name] for name in self.graph.outputs]
