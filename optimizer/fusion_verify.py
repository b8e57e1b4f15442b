"""The fusion-plan verifier: it never saw the planner. From the graph and the op table alone it re-derives what a
plan must satisfy for its kernels to compute what the nodes compute, and raises FusionError at the first breach.

- every node runs exactly once: in at most one group, and the schedule holds each group and each other node once;
- the schedule respects every dependency (no step reads a value a later step computes);
- each group reads exactly what its nodes read from outside it, and writes every value it computes that anything
  outside it reads or the graph returns (and nothing it does not compute);
- each group's iteration space fits: every node is one a generated kernel can compute (an expression, a move, a
  row reduction, or in a row kernel an embedding lookup of its rows), each reduction reduces exactly the group's trailing `reduced` dims of an input of the group's
  shape, a pointwise group reduces nothing, and every value written is either a full tensor of the group's shape or
  one value per row.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from ..ir import Graph, Node, TensorType
from ..codegen.expressions import fusible, gathered_rows, movable
from ..ir.plans import FusionError, FusionGroup, FusionPlan
from ..codegen.reductions import reduced_dims, row_reduction


def verify_fusion(plan: FusionPlan, graph: Graph) -> None:
    """Raise FusionError unless `plan` computes what `graph` computes (see the module docstring)."""
    nodes = {node.name: node for node in graph.nodes}
    types = graph.types()
    read = frozenset(name for node in graph.nodes for name in node.inputs) | frozenset(graph.outputs)
    group_of: dict[str, str] = {}
    for group in plan.groups:
        if not group.nodes:
            raise FusionError(f"group {group.name} holds no node")
        for name in group.nodes:
            if name not in nodes:
                raise FusionError(f"group {group.name} holds {name}, which is not a node of the graph")
            if name in group_of:
                raise FusionError(f"node {name} is in both {group_of[name]} and {group.name}")
            group_of[name] = group.name
        members = [nodes[name] for name in group.nodes]
        _check_boundary(group, members, graph)
        _check_space(group, members, types, read)
    _check_schedule(plan, graph, group_of)


def _check_boundary(group: FusionGroup, members: list[Node], graph: Graph) -> None:
    computed = {value.name for node in members for value in node.outputs}
    reads = {name for node in members for name in node.inputs if name not in computed}
    if set(group.inputs) != reads:
        raise FusionError(f"group {group.name} says it reads {sorted(group.inputs)}; its nodes read {sorted(reads)}")
    inside = {node.name for node in members}
    needed = {name for node in graph.nodes if node.name not in inside for name in node.inputs if name in computed}
    needed |= computed & set(graph.outputs)
    if not needed <= set(group.outputs):
        raise FusionError(f"group {group.name} does not write {sorted(needed - set(group.outputs))}, "
                          "which is read after it")
    if not set(group.outputs) <= computed:
        raise FusionError(f"group {group.name} writes {sorted(set(group.outputs) - computed)}, which it does not compute")


def _check_space(group: FusionGroup, members: list[Node], types: Mapping[str, TensorType], read: frozenset[str]) -> None:
    cannot = f"group {group.name}: its {group.kind} kernel over {group.shape} (reducing {group.reduced} dims) cannot compute"
    if not 0 <= group.reduced <= len(group.shape):
        raise FusionError(cannot + " anything")
    for node in members:
        dims = reduced_dims(node, types, read)
        if group.reduced and dims == group.reduced and types[node.inputs[0]].shape == group.shape:
            continue  # the row reduction the kernel is built around
        if fusible(node, types) or movable(node, types) or gathered_rows(node, types, group.shape, group.reduced):
            continue
        if row_reduction(node) is not None:
            raise FusionError(f"{cannot} {node.name} ({node.op}), which reduces {dims} dims of "
                              f"{types[node.inputs[0]].shape}")
        raise FusionError(f"{cannot} {node.name} ({node.op}): no expression, move or row reduction")
    full, rows = math.prod(group.shape), math.prod(group.shape[:len(group.shape) - group.reduced])
    for name in group.outputs:
        if types[name].numel not in (full, rows if group.reduced else full):
            raise FusionError(f"{cannot} %{name} of shape {types[name].shape}: neither the whole space nor one "
                              "value per row")


def _check_schedule(plan: FusionPlan, graph: Graph, group_of: Mapping[str, str]) -> None:
    expected = {group_of.get(node.name, node.name) for node in graph.nodes}
    if set(plan.schedule) != expected or len(plan.schedule) != len(expected):
        raise FusionError("the schedule does not run every node or group exactly once")
    position = {step: index for index, step in enumerate(plan.schedule)}
    made_at = {value.name: position[group_of.get(node.name, node.name)] for node in graph.nodes for value in node.outputs}
    for node in graph.nodes:
        here = position[group_of.get(node.name, node.name)]
        for name in node.inputs:
            if made_at.get(name, -1) > here:
                raise FusionError(f"{node.name} reads %{name} before the step that computes it")
