"""Layer skipping, the rewrite: a transformer's residual sublayers found in the IR by structure, and the graph with
chosen ones removed (the residual stream passes through them). What to remove is chosen in skip_search.

A sublayer is a residual add `h + f(h)` whose branch `f` holds a matrix product: attention when the branch holds
an attention op, else a feed-forward (dense or mixture of experts). No model class is named: any decoder or encoder
ember captures is searched the same way. In a post-norm model (BERT) the norm after the add belongs to the
sublayer, since removing the sublayer must hand the next one the stream it would have read.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from ..errors import CompileError
from ..ir import Graph, Node
from .canonicalize import eliminate_dead_code
from .decisions import record

PRODUCT_KINDS = frozenset({"matmul", "convolution", "attention"})
"""Op-table kinds that make a residual branch a layer (a matrix product; aten.matmul, an extern, too); an add of two
elementwise results is not one."""

ATTENTION = frozenset({"scaled_dot_product_attention", "_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_flash_attention"})
"""Ops that make a sublayer attention rather than a feed-forward; so does a product of two activations (attention
written out as matmul and softmax). A softmax alone does not: a mixture of experts' router has one."""

ACTIVATION_PRODUCTS = frozenset({"bmm", "matmul", "baddbmm"})

KINDS = ("attention", "ffn")


@dataclass(frozen=True, slots=True)
class Sublayer:
    """One residual sublayer: the stream value it reads and the one it hands on, and the nodes of its branch."""

    index: int
    kind: str
    """"attention" or "ffn"."""
    block: int
    """The transformer block it belongs to: an attention sublayer opens a block, a feed-forward closes it."""
    stream_in: str
    stream_out: str
    add: str
    """The residual add's node."""
    branch: tuple[str, ...]
    """Nodes computing the branch (from the stream to the add), in graph order."""
    label: str
    """Where its weights live (their names' common prefix, e.g. `model_layers_3_self_attn`)."""


def find_sublayers(graph: Graph) -> tuple[Sublayer, ...]:
    """The residual sublayers of `graph` in the order they run (empty for a graph without a residual stream)."""
    flow = _value_flow(graph)
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    adds = [(node, stream) for node in graph.nodes if (stream := _residual_stream(node, flow, producer)) is not None]
    sublayers = []
    gap: list[tuple[str, int]] = []
    for position, (node, stream) in enumerate(adds):
        result = node.outputs[0].name
        if position + 1 < len(adds):
            following = adds[position + 1][1]
            between = _gap(result, following, producer, flow)
            gap = gap if between is None else between
            out = result if between is None else following
        else:
            out = _follow(result, gap, graph)
        branch = _branch(node, stream, flow, producer, graph)
        kind = "attention" if any(_attends(branch_node, graph) for branch_node in branch) else "ffn"
        sublayers.append(Sublayer(position, kind, 0, stream, out, node.name, tuple(n.name for n in branch),
                                  _label(branch, graph)))
    return _numbered_blocks(sublayers)


def blocks(sublayers: Sequence[Sublayer]) -> tuple[tuple[int, ...], ...]:
    """Sublayer indices of each block, in order."""
    grouped: dict[int, list[int]] = {}
    for sublayer in sublayers:
        grouped.setdefault(sublayer.block, []).append(sublayer.index)
    return tuple(tuple(indices) for _, indices in sorted(grouped.items()))


def skip_sublayers(graph: Graph, removed: Collection[int], sublayers: Sequence[Sublayer] | None = None) -> Graph:
    """`graph` with the sublayers `removed` (indices into `find_sublayers(graph)`) cut out: what read a removed
    sublayer's output reads its input, and the branch, now dead, is dropped."""
    sublayers = find_sublayers(graph) if sublayers is None else sublayers
    unknown = sorted(set(removed) - set(range(len(sublayers))))
    if unknown:
        raise CompileError(f"sublayer(s) {unknown} do not exist: the graph has {len(sublayers)} residual sublayers")
    if not removed:
        return graph
    passed = passed_through(removed, sublayers)
    nodes = tuple(node if not set(node.inputs) & passed.keys() else
                  dataclasses.replace(node, inputs=tuple(passed.get(name, name) for name in node.inputs))
                  for node in graph.nodes)
    outputs = tuple(passed.get(name, name) for name in graph.outputs)
    return eliminate_dead_code(dataclasses.replace(graph, nodes=nodes, outputs=outputs))


def passed_through(removed: Collection[int], sublayers: Sequence[Sublayer]) -> dict[str, str]:
    """Stream value a removed sublayer handed on -> the value read in its place (a run of removed sublayers hands
    on the stream the first of them read)."""
    passed: dict[str, str] = {}
    for index in sorted(removed):
        sublayer = sublayers[index]
        passed[sublayer.stream_out] = passed.get(sublayer.stream_in, sublayer.stream_in)
    return passed


def removed_nodes(graph: Graph, removed: Collection[int], sublayers: Sequence[Sublayer] | None = None) -> set[str]:
    """Names of the nodes that skipping `removed` drops from `graph`."""
    kept = {node.name for node in skip_sublayers(graph, removed, sublayers).nodes}
    return {node.name for node in graph.nodes} - kept


def apply_skip(graph: Graph, removed: Sequence[int], expected: int) -> Graph:
    """The skip plan's rewrite on a graph of the model it was planned on: refused (CompileError) when the graph
    does not have the `expected` number of sublayers, since indices would then name other layers."""
    sublayers = find_sublayers(graph)
    if len(sublayers) != expected:
        raise CompileError(f"the skip plan was made for a model with {expected} residual sublayers; this graph has "
                           f"{len(sublayers)}: plan again for this model")
    skipped = skip_sublayers(graph, removed, sublayers)
    record(f"{len(removed)} of {len(sublayers)} sublayers removed ({', '.join(sublayers[i].label for i in removed)}): "
           f"{len(graph.nodes) - len(skipped.nodes)} nodes fewer")
    return skipped


# ---------------------------------------------------------------------------------------------
# Structure

def _value_flow(graph: Graph) -> nx.DiGraph:
    """Values as vertices, an edge from each node input to each of its outputs."""
    flow = nx.DiGraph()
    for node in graph.nodes:
        for value in node.outputs:
            flow.add_node(value.name)
            flow.add_edges_from((name, value.name) for name in node.inputs)
    return flow


def is_product(node: Node) -> bool:
    """Whether the node is a matrix product (a linear, a convolution, attention, aten.matmul)."""
    return node.definition.kind in PRODUCT_KINDS or _op(node) == "matmul"


def _op(node: Node) -> str:
    """The op's name without its overload (`add.Tensor` -> `add`; an extern op's target likewise)."""
    name = node.target if node.is_extern and node.target else node.op
    return name.removeprefix("aten::").split(".")[0]


def _residual_stream(node: Node, flow: nx.DiGraph, producer: Mapping[str, Node]) -> str | None:
    """For a residual add `h + f(h)` (either order) whose branch holds a matrix product, `h`; else None."""
    if node.op != "add.Tensor" or len(node.inputs) != 2 or node.attrs.get("alpha", 1) != 1:
        return None
    left, right = node.inputs
    if left == right or not node.outputs[0].type.dtype.is_floating_point:
        return None
    for stream, other in ((left, right), (right, left)):
        if other in producer and stream in flow and nx.has_path(flow, stream, other):
            between = nx.descendants(flow, stream) & (nx.ancestors(flow, other) | {other})
            if any(is_product(producer[name]) for name in between if name in producer):
                return stream
    return None


def _gap(result: str, following: str, producer: Mapping[str, Node], flow: nx.DiGraph) -> list[tuple[str, int]] | None:
    """The ops (with the output each hands on) between a residual add's result and the stream the next sublayer
    reads (a post-norm's norm), walking back from the latter; None when the stream does not run between them
    without a matrix product."""
    steps: list[tuple[str, int]] = []
    current = following
    while current != result:
        node = producer.get(current)
        if node is None or is_product(node):
            return None
        on_path = [name for name in node.inputs if name == result or nx.has_path(flow, result, name)]
        if not on_path:
            return None
        steps.append((node.op, [value.name for value in node.outputs].index(current)))
        current = on_path[0]
    return steps[::-1]


def _follow(result: str, gap: Sequence[tuple[str, int]], graph: Graph) -> str:
    """The last residual add's stream out: its result carried through the ops the other sublayers' gaps hold,
    where the graph has them (a post-norm model's last norm), else the add's result."""
    current = result
    for op, position in gap:
        consumers = [node for node in graph.nodes if node.op == op and node.inputs and node.inputs[0] == current]
        if len(consumers) != 1:
            return result
        current = consumers[0].outputs[position].name
    return current


def _attends(node: Node, graph: Graph) -> bool:
    """Whether the node is attention: an attention op, or a product of two activations."""
    op = _op(node)
    if op in ATTENTION:
        return True
    weights = {value.name for value in graph.params}
    return op in ACTIVATION_PRODUCTS and not weights & set(node.inputs)


def _branch(add: Node, stream: str, flow: nx.DiGraph, producer: Mapping[str, Node], graph: Graph) -> list[Node]:
    other = next(name for name in add.inputs if name != stream)
    values = (nx.descendants(flow, stream) & nx.ancestors(flow, other)) | {other}
    names = {producer[name].name for name in values if name in producer}
    return [node for node in graph.nodes if node.name in names]


def _label(branch: Sequence[Node], graph: Graph) -> str:
    """The common prefix of the names of the weights the branch's matrix products read."""
    params = {value.name for value in graph.params}
    names = sorted({name.removeprefix("p_") for node in branch if is_product(node)
                    for name in node.inputs if name in params})
    if not names:
        return branch[-1].name if branch else "?"
    prefix = os.path.commonprefix(names)
    if len(names) == 1 or not prefix.endswith("_") and any(name[len(prefix):][:1] not in ("", "_") for name in names):
        prefix = prefix.rsplit("_", 1)[0]  # back to a whole word
    return prefix.rstrip("_")


def _numbered_blocks(sublayers: list[Sublayer]) -> tuple[Sublayer, ...]:
    numbered, block = [], -1
    for position, sublayer in enumerate(sublayers):
        previous = sublayers[position - 1] if position else None
        if previous is None or sublayer.kind == "attention" or previous.kind == "ffn":
            block += 1
        numbered.append(dataclasses.replace(sublayer, block=block))
    return tuple(numbered)


__all__ = ["ACTIVATION_PRODUCTS", "ATTENTION", "KINDS", "PRODUCT_KINDS", "Sublayer", "apply_skip", "blocks", "find_sublayers", "is_product", "passed_through", "removed_nodes",
           "skip_sublayers"]
