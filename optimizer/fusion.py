"""Kernel fusion, planned: which nodes run together as one generated kernel, and in what order.

Kinds so far: pointwise chains (every node an op with a Triton expression, all results of one shape,
broadcast inputs allowed). A node joins the group of one of its producers when that keeps the graph
acyclic (no path leaves the group and comes back into the node) and the shapes agree. Each group of
two or more nodes is then priced by the cost model, fused and unfused, and kept only when fusing is
predicted faster; both numbers are recorded for `inspect`. The plan is plain data; the graph is untouched.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from ..ir import Graph, Node
from ..ir.expressions import fusible
from .cost import CostModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FusionGroup:
    """Nodes run as one kernel; `inputs` are the values it reads from outside, `outputs` the values it writes
    (read after it, or returned)."""

    name: str
    kind: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    unfused_us: float
    fused_us: float


@dataclass(frozen=True, slots=True)
class FusionPlan:
    """Groups kept, groups the cost model turned down, and the order of steps (a group's or a node's name)."""

    groups: tuple[FusionGroup, ...]
    rejected: tuple[FusionGroup, ...]
    schedule: tuple[str, ...]


class FusionError(ValueError):
    """A fusion plan that would compute something else: a cycle, a node twice, a shape mismatch."""


def plan_fusion(graph: Graph, cost: CostModel) -> FusionPlan:
    """Group pointwise chains of `graph` and keep the groups the cost model predicts faster."""
    types = graph.types()
    dag = _dag(graph)
    group_id: dict[str, int] = {}
    members: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if not fusible(node, types):
            continue
        shape = node.outputs[0].type.shape
        joined = None
        for producer in dict.fromkeys(dag.predecessors(node.name)):
            candidate = group_id.get(producer)
            if candidate is None or members[candidate][0].outputs[0].type.shape != shape:
                continue
            if _closes_a_cycle(dag, {n.name for n in members[candidate]}, node.name):
                continue
            joined = candidate
            break
        if joined is None:
            joined = len(members)
            members[joined] = []
        members[joined].append(node)
        group_id[node.name] = joined
    kept, rejected = [], []
    for nodes in members.values():
        if len(nodes) < 2:
            continue
        group = _priced(f"fused_{len(kept) + len(rejected)}", nodes, graph, cost)
        (kept if group.fused_us < group.unfused_us else rejected).append(group)
    plan = FusionPlan(tuple(kept), tuple(rejected), _schedule(graph, dag, kept))
    log.info("fusion: %d groups kept (%d nodes), %d turned down", len(kept), sum(len(g.nodes) for g in kept), len(rejected))
    return plan


def verify_fusion(plan: FusionPlan, graph: Graph) -> None:
    """Raise FusionError unless every node runs exactly once, groups are pointwise of one shape, and the
    schedule respects every dependency."""
    types = graph.types()
    nodes = {node.name: node for node in graph.nodes}
    seen: dict[str, str] = {}
    for group in plan.groups:
        shapes = {nodes[name].outputs[0].type.shape for name in group.nodes}
        if len(shapes) != 1 or not all(fusible(nodes[name], types) for name in group.nodes):
            raise FusionError(f"group {group.name} mixes shapes {sorted(shapes)} or holds a node codegen cannot emit")
        for name in group.nodes:
            if name in seen:
                raise FusionError(f"node {name} is in both {seen[name]} and {group.name}")
            seen[name] = group.name
    step_of = {name: group for name, group in seen.items()}
    expected = {step_of.get(node.name, node.name) for node in graph.nodes}
    if set(plan.schedule) != expected or len(plan.schedule) != len(expected):
        raise FusionError("the schedule does not run every node or group exactly once")
    position = {step: index for index, step in enumerate(plan.schedule)}
    produced_at = {value.name: position[step_of.get(node.name, node.name)] for node in graph.nodes for value in node.outputs}
    for node in graph.nodes:
        here = position[step_of.get(node.name, node.name)]
        for name in node.inputs:
            if name in produced_at and produced_at[name] > here:
                raise FusionError(f"{node.name} reads %{name} before the step that computes it")


def _dag(graph: Graph) -> nx.DiGraph:
    """Node -> node edges of `graph` (who reads whose result)."""
    producer = {value.name: node.name for node in graph.nodes for value in node.outputs}
    dag = nx.DiGraph()
    dag.add_nodes_from(node.name for node in graph.nodes)
    dag.add_edges_from((producer[name], node.name) for node in graph.nodes for name in node.inputs if name in producer)
    return dag


def _closes_a_cycle(dag: nx.DiGraph, group: set[str], node: str) -> bool:
    """Whether adding `node` to `group` makes a cycle: some path leaves the group and reaches the node."""
    outside = [p for p in dag.predecessors(node) if p not in group]
    return any(group & nx.ancestors(dag, p) for p in outside)


def reads_of(nodes: Sequence[Node]) -> tuple[str, ...]:
    """The values a group of nodes reads from outside itself, in order of first read."""
    inside = {value.name for node in nodes for value in node.outputs}
    return tuple(dict.fromkeys(name for node in nodes for name in node.inputs if name not in inside))


def _priced(name: str, nodes: list[Node], graph: Graph, cost: CostModel) -> FusionGroup:
    types = graph.types()
    inside = {node.name for node in nodes}
    written = {value.name for node in nodes for value in node.outputs}
    read_after = {n for other in graph.nodes if other.name not in inside for n in other.inputs} | set(graph.outputs)
    outputs = tuple(value.name for node in nodes for value in node.outputs if value.name in read_after & written)
    unfused = sum(cost.node(node, types).predicted_us for node in nodes)
    fused = cost.group(nodes, graph).predicted_us
    return FusionGroup(name, "pointwise", tuple(node.name for node in nodes), reads_of(nodes), outputs, unfused, fused)


def _schedule(graph: Graph, dag: nx.DiGraph, groups: list[FusionGroup]) -> tuple[str, ...]:
    """Steps in a topological order of the graph with each group contracted, closest to the original order."""
    step_of: Mapping[str, str] = {node: group.name for group in groups for node in group.nodes}
    first: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        first.setdefault(step_of.get(node.name, node.name), index)
    condensed = nx.DiGraph()
    condensed.add_nodes_from(first)
    condensed.add_edges_from((step_of.get(a, a), step_of.get(b, b)) for a, b in dag.edges
                             if step_of.get(a, a) != step_of.get(b, b))
    return tuple(nx.lexicographical_topological_sort(condensed, key=lambda step: first[step]))


def fusion_summary(plan: FusionPlan | None) -> dict[str, object]:
    """Plain numbers for reports: groups kept and turned down, with each decision's predicted times."""
    if plan is None:
        return {}
    decisions = [{"group": group.name, "nodes": len(group.nodes), "unfused_us": group.unfused_us,
                  "fused_us": group.fused_us, "kept": kept}
                 for kept, groups in ((True, plan.groups), (False, plan.rejected)) for group in groups]
    return {"groups": len(plan.groups), "fused_nodes": sum(len(g.nodes) for g in plan.groups),
            "rejected": len(plan.rejected), "steps": len(plan.schedule), "decisions": decisions}
