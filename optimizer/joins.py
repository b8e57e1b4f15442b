"""Linear layers that read the same single row (a decode step's query, key and value) become one `linears` node.

With one row of input, a linear layer's time is its weight's bytes over the memory bandwidth plus a fixed cost per
kernel, and the fixed cost dominates small weights: on an H200, cuBLAS takes 16.6 µs for Llama's query, key and
value projections, one kernel each, and ember's `linears` 5.4 µs for the three in one kernel (codegen.skinny_mm;
bench/results/skinny_mm.*), reading each weight where the model keeps it, never copying them into one. Joined
results appear where the first of them did; the rest only become ready earlier.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..ir import Graph, Node
from ..ir.ops import op_name
from ..units import format_bytes
from .decisions import record

MAX_JOINED = 4
"""The most linears one `linears` node takes (the kernel's weight arguments)."""


def join_vector_products(graph: Graph) -> Graph:
    """The graph with each set of two or more joinable linears of one input (see `_joinable`) as one `linears`."""
    types = graph.types()
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if _joinable(node, graph, types):
            readers.setdefault(node.inputs[0], []).append(node)
    joined: dict[str, Node] = {}
    dropped: set[str] = set()
    for members in readers.values():
        for start in range(0, len(members) - 1, MAX_JOINED):
            chunk = members[start: start + MAX_JOINED]
            if len(chunk) > 1:
                weight_bytes = sum(types[node.inputs[1]].nbytes for node in chunk)
                record(f"{len(chunk)} linears of one row ({', '.join(str(types[node.inputs[1]].shape[0]) for node in chunk)} "
                       f"features) read their {format_bytes(weight_bytes)} of weights in one kernel")
                joined[chunk[0].name] = _joined(chunk)
                dropped.update(node.name for node in chunk[1:])
    if not joined:
        return graph
    nodes = tuple(joined.get(node.name, node) for node in graph.nodes if node.name not in dropped)
    return dataclasses.replace(graph, nodes=nodes)


def _joinable(node: Node, graph: Graph, types: dict) -> bool:
    """A `linear` of one row whose weight (and bias) are the graph's own, the weight's rows contiguous (read
    along them), and no bias given as a number."""
    if not node.definition.linear or len(node.outputs) != 1 or any(value is not None for value in node.attrs.values()):
        return False
    x, weight = types[node.inputs[0]], types[node.inputs[1]]
    return (math.prod(x.shape[:-1]) == 1 and all(name in graph.weights for name in node.inputs[1:])
            and len(weight.shape) == 2 and weight.strides[1] == 1)


def _joined(members: list[Node]) -> Node:
    """One `linears` node computing every member's result, under the members' own value names."""
    weights = tuple(node.inputs[1] for node in members)
    biases = [node.inputs[2] if len(node.inputs) > 2 else None for node in members]
    present = [name for name in biases if name is not None]
    slots = iter(range(1 + len(weights), 1 + len(weights) + len(present)))
    return Node(f"{members[0].name}_joined", op_name(torch.ops.ember.linears.default), (members[0].inputs[0], *weights, *present),
                {"weights": tuple(range(1, 1 + len(weights))),
                 "biases": tuple(None if name is None else next(slots) for name in biases)},
                tuple(node.outputs[0] for node in members), source=members[0].source)
