"""Kernel fusion, planned: which nodes run together as one generated kernel, and in what order.

Kinds so far:
- pointwise chains: every node an op with a Triton expression, all results of one shape, broadcast inputs allowed;
  a pointwise group also reads through moves (views, cats, a 1-D gather, short sums; codegen.expressions.movable) that
  only it reads, taking in the groups whose results only those moves read;
- reductions over trailing dims (sum, mean, softmax, log-softmax, layer norm) with their pointwise producers
  and consumers: results either of the reduced input's shape ("full") or one value per row, so a residual
  add, an RMS norm written out op by op, or add + layer norm becomes one kernel holding whole rows; such a
  kernel also reads the embedding lookups it sums straight from their tables.
A node joins the group of one of its producers when that keeps the graph acyclic (no path leaves the group
and comes back into the node) and its shapes fit the group's iteration space. Each group of two or more
nodes (or a lone node reading a permuted view, which ATen copies slowly) is then priced by the cost model,
fused and unfused, and kept only when fusing is predicted faster; both numbers are recorded for `inspect`.
The plan is plain data; the graph is untouched.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from ..ir import Graph, Node, TensorType
from ..ir.plans import FusionGroup, FusionPlan, reads_of
from ..codegen.expressions import fusible, gathered_rows, materialized, movable, viewing_move
from ..codegen.reductions import reduced_dims, row_reduction
from .cost import CostModel
from .cost.model import permuted

log = logging.getLogger(__name__)

MAX_ROW_COLUMNS = 16384
"""A reduction group holds whole rows in registers; longer rows are left to ATen."""


@dataclass(slots=True)
class _Space:
    """A group being formed: its iteration shape, how many trailing dims it reduces, and for each value it
    computes whether the value is per row (True) or per element (False)."""

    shape: tuple[int, ...]
    reduced: int
    per_row: dict[str, bool]

    def row_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A per-row value's two possible shapes: reduced dims dropped, or kept as 1."""
        rows = self.shape[:len(self.shape) - self.reduced]
        return rows, rows + (1,) * self.reduced


def _place(node: Node, space: _Space, types: Mapping[str, TensorType], read: frozenset[str]) -> _Space | None:
    """The space after `node` joins a group with `space`, or None if the group's kernel cannot compute it there."""
    reduced = reduced_dims(node, types, read)
    if reduced is not None:
        source, others = node.inputs[0], node.inputs[1:]
        if (types[source].shape != space.shape or space.reduced not in (0, reduced) or space.per_row.get(source)
                or any(name in space.per_row for name in others)
                or math.prod(space.shape[len(space.shape) - reduced:]) > MAX_ROW_COLUMNS):
            return None
        results = row_reduction(node).results
        added = {value.name: results[position] == "row" for value, position in zip(node.outputs, node.result_positions)}
        return _Space(space.shape, reduced, {**space.per_row, **added})
    if not fusible(node, types):
        return None
    shape, rows, kept = node.outputs[0].type.shape, *space.row_shapes()
    internal = [name for name in node.inputs if name in space.per_row]
    if shape == space.shape:  # per element: a per-row operand broadcasts over its row only when its dims are kept
        if any(space.per_row[name] and types[name].shape != kept for name in internal):
            return None
        per_row = False
    elif space.reduced and shape in (rows, kept) and all(space.per_row[name] for name in internal):
        per_row = True
    else:
        return None
    return _Space(space.shape, space.reduced, {**space.per_row, node.outputs[0].name: per_row})


def _open(node: Node, types: Mapping[str, TensorType], read: frozenset[str]) -> _Space | None:
    """The space of a group that `node` starts, or None if no kernel can compute it."""
    if reduced_dims(node, types, read) is not None:
        return _place(node, _Space(types[node.inputs[0]].shape, 0, {}), types, read)
    if fusible(node, types):
        return _Space(node.outputs[0].type.shape, 0, {node.outputs[0].name: False})
    return None


def plan_fusion(graph: Graph, cost: CostModel) -> FusionPlan:
    """Group pointwise chains and row reductions of `graph`; keep the groups the cost model predicts faster."""
    types = graph.types()
    read = _read_values(graph)
    dag = _dag(graph)
    group_id: dict[str, int] = {}
    members: dict[int, list[Node]] = {}
    spaces: dict[int, _Space] = {}
    for node in graph.nodes:
        opened = _open(node, types, read)
        if opened is None:
            continue
        joined = None
        for producer in dict.fromkeys(dag.predecessors(node.name)):
            candidate = group_id.get(producer)
            if candidate is None:
                continue
            placed = _place(node, spaces[candidate], types, read)
            if placed is None or _closes_a_cycle(dag, {n.name for n in members[candidate]}, node.name):
                continue
            joined, spaces[candidate] = candidate, placed
            break
        if joined is None:
            joined = len(members)
            members[joined], spaces[joined] = [], opened
        members[joined].append(node)
        group_id[node.name] = joined
    _merge_along_edges(graph, dag, members, spaces, group_id, types, read)
    readers = _readers(graph)
    _fuse_through_moves(graph, dag, members, spaces, group_id, types, readers)
    _gather_into_rows(graph, dag, members, spaces, group_id, types, readers)
    kept, rejected = [], []
    for index, nodes in members.items():
        if len(nodes) < 2 and not any(permuted(types[name]) for name in nodes[0].inputs):
            continue
        group = _priced(group_name(nodes, len(kept) + len(rejected)), nodes, spaces[index], graph, cost, readers)
        (kept if group.fused_us < group.unfused_us else rejected).append(group)
    plan = FusionPlan(tuple(kept), tuple(rejected), _schedule(graph, dag, kept))
    log.info("fusion: %d groups kept (%d nodes), %d turned down", len(kept), sum(len(g.nodes) for g in kept), len(rejected))
    return plan


NAMED_OPS = 4
"""The most op names a group's name carries (the rest are counted)."""


def group_name(nodes: Sequence[Node], index: int) -> str:
    """A name that says what the group holds, as Inductor names its kernels: its ops sorted (the first
    NAMED_OPS, then how many more), and its number: `fused_add_mean_mul_pow_and_2_more_0`."""
    ops = sorted({node.op.split(".")[0].lstrip("_") for node in nodes})
    more = f"_and_{len(ops) - NAMED_OPS}_more" if len(ops) > NAMED_OPS else ""
    return f"fused_{'_'.join(ops[:NAMED_OPS])}{more}_{index}"


def _replay(nodes: Sequence[Node], types: Mapping[str, TensorType], read: frozenset[str]) -> _Space | None:
    """The space of a group holding `nodes` in this order, or None if its kernel cannot compute them."""
    space = _open(nodes[0], types, read)
    for node in nodes[1:]:
        space = space and _place(node, space, types, read)
    return space


def _merge_along_edges(graph: Graph, dag: nx.DiGraph, members: dict[int, list[Node]], spaces: dict[int, _Space],
                       group_id: dict[str, int], types: Mapping[str, TensorType], read: frozenset[str]) -> None:
    """Merge a producer's group into its consumer's wherever one kernel can compute both and no path leaves
    and re-enters them: a node reading two groups (an RMS norm's statistics and a second cast of its input)
    joins only one of them at first."""
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    merged_any = True
    while merged_any:
        merged_any = False
        for producer, consumer in dag.edges:
            source, target = group_id.get(producer), group_id.get(consumer)
            if source is None or target is None or source == target:
                continue
            nodes = sorted(members[source] + members[target], key=lambda node: order[node.name])
            space = _replay(nodes, types, read)
            names = [node.name for node in nodes]
            if space is None or _closes_a_cycle(dag, set(names), *names):
                continue
            members[target], spaces[target] = nodes, space
            for node in members.pop(source):
                group_id[node.name] = target
            del spaces[source]
            merged_any = True


def _fuse_through_moves(graph: Graph, dag: nx.DiGraph, members: dict[int, list[Node]], spaces: dict[int, _Space],
                        group_id: dict[str, int], types: Mapping[str, TensorType],
                        readers: Mapping[str, set[str]]) -> None:
    """A move (a view, cat, gather or short sum) read only by one pointwise group joins it, with the pointwise
    groups whose results only it reads: their elements are computed where the group reads them (a rotary
    embedding's `cat(-x2, x1)`, a split of a masked expert matmul into SwiGLU's halves, the repeat of rotated
    keys for grouped-query attention, the weighted sum of each token's experts gathered back in order)."""
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    for node in reversed(graph.nodes):  # a chain of moves joins from the group reading its last one
        results = [value.name for value in node.outputs]
        if node.name in group_id or not movable(node, types):
            continue
        targets = {group_id.get(reader) for name in results for reader in readers.get(name, ())}
        target = targets.pop() if len(targets) == 1 and not any(name in graph.outputs for name in results) else None
        if target is None and materialized(node):  # its result is stored: it can head a kernel of its own
            target = max(members, default=-1) + 1
            members[target], spaces[target] = [], _Space(node.outputs[0].type.shape, 0, {})
        if target is None or spaces[target].reduced:
            continue
        absorbed: list[int] = []
        for name in node.inputs:
            source = group_id.get(producer[name].name) if name in producer else None
            if source is None or source == target or source in absorbed or spaces[source].reduced:
                continue
            inside = {member.name for member in members[source]} | {node.name}
            if all(readers.get(value.name, set()) <= inside and value.name not in graph.outputs
                   for member in members[source] for value in member.outputs):
                absorbed.append(source)
        nodes = sorted([*members[target], node, *(m for source in absorbed for m in members[source])],
                       key=lambda member: order[member.name])
        names = {member.name for member in nodes}
        space = _through_moves(nodes, types, _outputs_of(nodes, readers, graph.outputs))
        if space is None or _closes_a_cycle(dag, names, *names):
            if not members[target]:
                del members[target], spaces[target]
            continue
        members[target], spaces[target] = nodes, space
        for source in absorbed:
            del members[source], spaces[source]
        for name in names:
            group_id[name] = target
    for nodes in members.values():
        for view in _views_of_inputs(nodes, types):
            nodes.remove(view)
            del group_id[view.name]


def _gather_into_rows(graph: Graph, dag: nx.DiGraph, members: dict[int, list[Node]], spaces: dict[int, _Space],
                      group_id: dict[str, int], types: Mapping[str, TensorType], readers: Mapping[str, set[str]]) -> None:
    """An embedding lookup read by a row kernel over its result's shape joins the first such kernel, which reads
    the table's rows where it needs them and stores the result only if something else reads it (BERT's three
    embeddings summed into a layer norm, a decoder's tokens into its first norm and its residual). One that
    broadcasts along the rows (positions shared by a batch) joins only a kernel that is its one reader."""
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.name in group_id or node.is_extern or not node.definition.gathers:
            continue
        groups = sorted({group_id[reader] for value in node.outputs for reader in readers.get(value.name, ())
                         if reader in group_id}, key=lambda index: order[members[index][0].name])
        for index in groups:
            space = spaces[index]
            nodes = sorted([*members[index], node], key=lambda member: order[member.name])
            names = {member.name for member in nodes}
            whole = node.outputs[0].type.shape == space.shape or all(group_id.get(reader) == index
                                                                     for reader in readers[node.outputs[0].name])
            if (gathered_rows(node, types, space.shape, space.reduced) and whole
                    and not _closes_a_cycle(dag, names, *names)):
                members[index] = nodes
                spaces[index] = _Space(space.shape, space.reduced, {**space.per_row, node.outputs[0].name: False})
                group_id[node.name] = index
                break


def _views_of_inputs(nodes: list[Node], types: Mapping[str, TensorType]) -> list[Node]:
    """The views in a group that only re-address what it reads from outside, found from its inputs inward:
    the kernel reads such a view through its strides, cheaper than computing coordinates through it."""
    views: list[Node] = []
    made = {value.name for node in nodes for value in node.outputs}
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if (node not in views and viewing_move(node) and movable(node, types)
                    and not any(name in made for name in node.inputs)):
                views.append(node)
                made -= {value.name for value in node.outputs}
                changed = True
    return views


def _through_moves(nodes: Sequence[Node], types: Mapping[str, TensorType], outputs: Sequence[str]) -> _Space | None:
    """The space of a pointwise group that reads through moves: every node an expression or a move, its outputs
    of one shape, none a view's (whose type may be strided)."""
    made_by = {value.name: node for node in nodes for value in node.outputs}
    shapes = {types[name].shape for name in outputs}
    if (len(shapes) != 1 or any(viewing_move(made_by[name]) for name in outputs)
            or not all(fusible(node, types) or movable(node, types) for node in nodes)):
        return None
    return _Space(shapes.pop(), 0, {value.name: False for node in nodes for value in node.outputs})


def _readers(graph: Graph) -> dict[str, set[str]]:
    """Value -> the nodes that read it."""
    readers: dict[str, set[str]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers.setdefault(name, set()).add(node.name)
    return readers


def _outputs_of(nodes: Sequence[Node], readers: Mapping[str, set[str]], returned: Sequence[str]) -> tuple[str, ...]:
    """The values `nodes` compute that something else reads or the graph returns, in order."""
    inside = {node.name for node in nodes}
    return tuple(value.name for node in nodes for value in node.outputs
                 if readers.get(value.name, set()) - inside or value.name in returned)


def _read_values(graph: Graph) -> frozenset[str]:
    """Every value some node reads or the graph returns."""
    return frozenset(name for node in graph.nodes for name in node.inputs) | frozenset(graph.outputs)


def _dag(graph: Graph) -> nx.DiGraph:
    """Node -> node edges of `graph` (who reads whose result)."""
    producer = {value.name: node.name for node in graph.nodes for value in node.outputs}
    dag = nx.DiGraph()
    dag.add_nodes_from(node.name for node in graph.nodes)
    dag.add_edges_from((producer[name], node.name) for node in graph.nodes for name in node.inputs if name in producer)
    return dag


def _closes_a_cycle(dag: nx.DiGraph, group: set[str], *nodes: str) -> bool:
    """Whether `nodes` in one kernel with `group` make a cycle: some path leaves the group and reaches them."""
    outside = {p for node in nodes for p in dag.predecessors(node) if p not in group}
    return any(group & nx.ancestors(dag, p) for p in outside)


def _priced(name: str, nodes: list[Node], space: _Space, graph: Graph, cost: CostModel,
            readers: Mapping[str, set[str]]) -> FusionGroup:
    types = graph.types()
    outputs = _outputs_of(nodes, readers, graph.outputs)
    unfused = sum(cost.node(node, types).kernel_us for node in nodes)
    fused = cost.group(nodes, graph).kernel_us
    return FusionGroup(name, tuple(node.name for node in nodes), reads_of(nodes), outputs, space.shape,
                       space.reduced, unfused, fused)


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
    decisions = [{"group": group.name, "kind": group.kind, "nodes": len(group.nodes), "unfused_us": group.unfused_us,
                  "fused_us": group.fused_us, "kept": kept}
                 for kept, groups in ((True, plan.groups), (False, plan.rejected)) for group in groups]
    return {"groups": len(plan.groups), "fused_nodes": sum(len(g.nodes) for g in plan.groups),
            "rejected": len(plan.rejected), "steps": len(plan.schedule), "decisions": decisions}
