"""Canonicalizing transforms that every pipeline runs first."""
from __future__ import annotations

import dataclasses

from ..ir import Graph


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
