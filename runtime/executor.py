"""The reference executor: runs a Graph node by node with the op table's reference implementations.

It is the correctness oracle for every later pass and the fallback when no kernel can be generated.
Each node's call is bound once; a value is dropped right after its last use. Given an arena plan, the
intermediates live in one arena per device, allocated on the first call there and reused after.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..ir import ArenaLayout, Graph
from ..ir.ops import Reference
from .arena import bind_into, slot_view


@dataclass(frozen=True, slots=True)
class Step:
    """One node, ready to run: its bound reference, the values it reads and writes, and those it frees."""

    node: str
    run: Reference
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    positions: tuple[int, ...]
    frees: tuple[str, ...]


def plan_steps(graph: Graph, views: Mapping[str, torch.Tensor] | None = None) -> tuple[Step, ...]:
    """Bind every node (writing into `views`, by value name, where given) and work out when each value dies."""
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
        Step(node.name, bind_into(node, views) if views else node.definition.bind(node.attrs), node.inputs, tuple(v.name for v in node.outputs),
             node.result_positions, tuple(dies_at.get(index, ())))
        for index, node in enumerate(graph.nodes)
    )


class Executor:
    """Runs one Graph; holds the bound steps so each call is a loop of op calls.

    With an arena layout, the steps are bound per device to views of that device's arena. A call that
    autograd records (grad mode on and an input or weight requiring grad) runs without it, since `out=`
    calls are not differentiable and the arena's next call would overwrite what backward saved.
    """

    def __init__(self, graph: Graph, layout: ArenaLayout | None = None):
        self.graph = graph
        self.layout = layout
        self.steps = plan_steps(graph)
        self.input_names = tuple(value.name for value in graph.inputs)
        self.arenas: dict[torch.device, torch.Tensor] = {}
        self._steps_on: dict[torch.device, tuple[Step, ...]] = {}

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        env = dict(self.graph.weights)
        env.update(zip(self.input_names, inputs))
        steps = self.steps if self.layout is None or _records_grad(inputs, env) else self.steps_on(_device_of(inputs, self.graph))
        for step in steps:
            results = step.run([env[name] for name in step.inputs])
            env.update(zip(step.outputs, (results[position] for position in step.positions)))
            for name in step.frees:
                del env[name]
        return [env[name] for name in self.graph.outputs]

    def steps_on(self, device: torch.device) -> tuple[Step, ...]:
        """The steps bound to this device's arena, allocating it on first use."""
        if device not in self._steps_on:
            with torch.inference_mode(False):  # a normal tensor, writable inside and outside inference mode
                arena = torch.empty(self.layout.arena_bytes, dtype=torch.uint8, device=device)
                views = {name: slot_view(arena, offset, value_type)
                         for name, (offset, value_type) in self.layout.slots.items()
                         if value_type.device == device.type}  # a value made on another device is allocated there
            self.arenas[device] = arena
            self._steps_on[device] = plan_steps(self.graph, views)
        return self._steps_on[device]


def _records_grad(inputs: Sequence[torch.Tensor], env: Mapping[str, torch.Tensor]) -> bool:
    """Whether autograd would record this call."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (*inputs, *env.values()))


def _device_of(inputs: Sequence[torch.Tensor], graph: Graph) -> torch.device:
    """Where this call runs: its first tensor input's device, else the weights', else the CPU."""
    for tensor in (*inputs, *graph.weights.values()):
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")
