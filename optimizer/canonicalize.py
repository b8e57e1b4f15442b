"""Canonicalizing transforms that every pipeline runs first."""
from __future__ import annotations

import dataclasses

import torch

from ..ir import Graph, Node
from ..ir.ops import op_name
from .decisions import record


def eliminate_dead_code(graph: Graph) -> Graph:
    """Drop nodes none of whose outputs reach a graph output; ops that mutate their inputs stay."""
    live = set(graph.outputs)
    kept = []
    for node in reversed(graph.nodes):
        if any(value.name in live for value in node.outputs) or node.definition.schema.is_mutable:
            kept.append(node)
            live.update(node.inputs)
    params = tuple(value for value in graph.params if value.name in live)
    weights = {value.name: graph.weights[value.name] for value in params}
    derived = {name: source for name, source in graph.derived.items() if name in weights}
    return dataclasses.replace(graph, nodes=tuple(reversed(kept)), params=params, weights=weights, derived=derived)


def drop_empty_cat_inputs(graph: Graph) -> Graph:
    """Each `cat` without its empty inputs, and one left with a single input as a copy of it.

    transformers' caches start empty: a DynamicCache's first update is `cat([empty, key])`, which torch runs as
    a batched copy kernel that reads a strided key slowly (on an H200, GPT-2's 24 such cats took 0.48 ms a
    call); a plain copy is a pointwise step the fusion pass folds into the kernel that made the key.
    """
    types = graph.types()
    nodes = []
    for node in graph.nodes:
        if not node.definition.concatenates or not any(types[name].numel == 0 for name in node.inputs):
            nodes.append(node)
            continue
        kept = tuple(name for name in node.inputs if types[name].numel != 0)
        value = node.outputs[0]
        dropped = f"a cat of {len(node.inputs)} tensors, {len(node.inputs) - len(kept)} of them empty (a cache's first update)"
        if len(kept) > 1:
            record(f"{dropped}, reads only the others")  # the list argument's slots number the inputs afresh
            nodes.append(dataclasses.replace(node, inputs=kept, attrs={**node.attrs, "tensors": tuple(range(len(kept)))}))
        elif len(kept) == 1 and types[kept[0]].shape == value.type.shape and value.type.is_contiguous:
            record(f"{dropped}: a copy of the one left")
            nodes.append(Node(node.name, op_name(torch.ops.aten.clone.default), kept, {"memory_format": torch.contiguous_format}, node.outputs,
                              source=node.source))
        else:  # all empty, or a legacy 1-D empty beside a tensor of another shape: leave it to torch
            nodes.append(node)
    if all(a is b for a, b in zip(nodes, graph.nodes)):
        return graph
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(nodes)))
