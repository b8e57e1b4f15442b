"""The reference executor: runs a Graph node by node with the op table's reference implementations.

It is the correctness oracle for every later pass and the fallback when no kernel can be generated.
Each node's call is bound once; a value is dropped right after its last use. Given an arena plan, the
intermediates live in one arena per device, allocated on the first call there and reused after.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..codegen import GroupKernel
from ..ir import ArenaLayout, Graph, Node
from ..ir.ops import Reference
from .arena import bind_into, slot_view
from .cuda_graph import GraphedCall

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Step:
    """One node, ready to run: its bound reference, the values it reads and writes, and those it frees."""

    node: str
    run: Reference
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    positions: tuple[int, ...]
    frees: tuple[str, ...]


def plan_steps(graph: Graph, views: Mapping[str, torch.Tensor] | None = None,
               work: Sequence[Node | GroupKernel] | None = None) -> tuple[Step, ...]:
    """Bind every node, or every item of `work` (nodes and generated kernels in order), writing into `views`
    (by value name) where given, and work out when each value dies."""
    items = tuple(graph.nodes) if work is None else tuple(work)
    last_use: dict[str, int] = {}
    for index, item in enumerate(items):
        for name in item.inputs:
            last_use[name] = index
    keep = set(graph.outputs) | {value.name for value in (*graph.inputs, *graph.params)}
    dies_at: dict[int, list[str]] = {}
    for name, index in last_use.items():
        if name not in keep:
            dies_at.setdefault(index, []).append(name)
    for index, item in enumerate(items):  # outputs that nothing reads die at once
        for value in item.outputs:
            if value.name not in last_use and value.name not in keep:
                dies_at.setdefault(index, []).append(value.name)
    steps = []
    for index, item in enumerate(items):
        if isinstance(item, GroupKernel):
            run, positions = _launch(item, views or {}), tuple(range(len(item.outputs)))
        else:
            run = bind_into(item, views) if views else item.definition.bind(item.attrs)
            positions = item.result_positions
        steps.append(Step(item.name, run, item.inputs, tuple(v.name for v in item.outputs), positions,
                          tuple(dies_at.get(index, ()))))
    return tuple(steps)


def _launch(group: GroupKernel, views: Mapping[str, torch.Tensor]) -> Reference:
    """A generated kernel as a step: its outputs are arena views where planned, fresh tensors otherwise."""
    planned = [views.get(value.name) for value in group.outputs]

    def run(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        device = inputs[0].device
        outputs = tuple(
            view if view is not None else torch.empty_strided(
                value.type.shape, value.type.layout, dtype=value.type.dtype, device=device)
            for view, value in zip(planned, group.outputs))
        group.kernel(inputs, outputs)
        return outputs

    return run


class Executor:
    """Runs one Graph; holds the bound steps so each call is a loop of op calls.

    With an arena layout, the steps are bound per device to views of that device's arena; with `work` (from
    codegen's `lower_schedule`), fused groups run as generated kernels. A call that autograd records (grad
    mode on and an input or weight requiring grad) runs the plain reference steps, since neither `out=` calls
    nor generated kernels are differentiable and the arena's next call would overwrite what backward saved.
    """

    def __init__(self, graph: Graph, layout: ArenaLayout | None = None, work: Sequence[Node | GroupKernel] | None = None,
                 cuda_graphs: bool = False):
        self.graph = graph
        self.cuda_graphs = cuda_graphs
        self.graphed: dict[torch.device, GraphedCall | None] = {}
        self.layout = layout
        self.work = work
        self.reference_steps = plan_steps(graph)
        self.steps = self.reference_steps if work is None else plan_steps(graph, work=work)
        self.input_names = tuple(value.name for value in graph.inputs)
        self.arenas: dict[torch.device, torch.Tensor] = {}
        self._steps_on: dict[torch.device, tuple[Step, ...]] = {}

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if _records_grad(inputs, self.graph.weights):
            return self._run(self.reference_steps, inputs)
        if self.layout is None:
            return self._run(self.steps, inputs)
        device = _device_of(inputs, self.graph)
        if self.cuda_graphs and device.type == "cuda":
            graphed = self._graphed_on(device, inputs)
            if graphed is not None:
                return graphed(inputs)
        return self._run(self.steps_on(device), inputs)

    def _graphed_on(self, device: torch.device, inputs: Sequence[torch.Tensor]) -> GraphedCall | None:
        """This device's captured call, captured on first use; None (and one warning) if it cannot be."""
        if device not in self.graphed:
            steps = self.steps_on(device)
            try:
                self.graphed[device] = GraphedCall(lambda tensors: self._run(steps, tensors), inputs)
            except RuntimeError as error:
                log.warning("running step by step: this program cannot be captured in a CUDA graph (%s)",
                            str(error).splitlines()[0])
                self.graphed[device] = None
        return self.graphed[device]

    def _run(self, steps: Sequence[Step], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        env = dict(self.graph.weights)
        env.update(zip(self.input_names, inputs))
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
            self._steps_on[device] = plan_steps(self.graph, views, self.work)
        return self._steps_on[device]


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
