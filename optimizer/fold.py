"""Constant folding: values computed from weights and literals alone are worked out once, at compile time.

transformers models compute tables on every call from buffers and shapes that never change between calls:
Llama's rotary cos/sin from `inv_freq` and an arange of the (static) sequence length is ten nodes and three
kernels per call. Worked out here, each such value becomes a weight (a derived one: the runtime checks its
sources' versions, so an in-place update of `inv_freq` recompiles rather than reads a stale table).

Only small values fold (FOLDED_ELEMENTS), so a copy of a large weight (`weight.to(bfloat16)`) is never made
and held beside the original; pure views of weights stay views; values that any node mutates, or that view
memory a node mutates (a KV cache), or are made from a buffer written back after each call, never fold; nor do
values made from a tensor that requires grad (a parameter, by default): one a training step updates would leave
its folded value stale after every step (the backend would compile again each time).

A value the graph returns is made afresh on every call (its caller may write to it), except one a node copies
from another device (transformers' caches move a CPU `torch.tensor(...)` to the GPU and hand it back): that one
folds where it is going and is handed out as a copy made there, so no call copies from the host (which a CUDA
graph cannot capture).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..ir import Graph, Node, TensorType, Value
from .canonicalize import eliminate_dead_code
from ..units import format_bytes
from .decisions import record

FOLDED_ELEMENTS = 1 << 20
"""The most elements of a value worked out at compile time (a rotary table of 8,192 positions × 128 is 1M)."""

log = logging.getLogger(__name__)

_FOLDABLE_KINDS = ("pointwise", "view", "data", "reduction", "routing")


def fold_constants(graph: Graph) -> Graph:
    """The graph with every small value that depends only on weights and literals held as a weight."""
    values = {name: tensor for name, tensor in graph.weights.items()
              if name not in graph.written and not tensor.requires_grad}
    sources: dict[str, set[str]] = {name: {name} for name in values}
    computes: set[str] = set()  # constants that took a kernel to make, not only views of weights
    folded: dict[str, Node] = {}
    frozen = mutated_memory(graph)
    with unset_fake_temporarily(), torch.no_grad():  # the backend runs under fake tensors; the weights are real
        for node in graph.nodes:
            results = _evaluate(node, values, frozen)
            if results is None:
                continue
            values.update(results)
            sources.update((name, set().union(*(sources[read] for read in node.inputs))) for name in results)
            if node.definition.kind != "view" or any(name in computes for name in node.inputs):
                computes.update(results)
                folded[node.name] = node
        frontier = _frontier(graph, folded, values)
    if not frontier:
        return graph
    handed, held = _hand_out(graph, folded, frontier)
    weights, derived, params = dict(graph.weights), dict(graph.derived), list(graph.params)
    for value in frontier:
        name = held.get(value.name, value.name)
        weights[name] = values[value.name]
        derived[name] = tuple({id(tensor): tensor for source in sources[value.name]
                               for tensor in derived.get(source, (graph.weights[source],))}.values())
        params.append(Value(name, value.type))
    record(f"{len(folded)} nodes computed from weights and constants alone, worked out at compile time: "
           f"{len(frontier)} constants of {format_bytes(sum(value.type.nbytes for value in frontier))} kept instead"
           + (f"; {len(held)} of them returned after a copy to another device ({', '.join(held)}), held there and "
              "returned as copies made there, so no call copies from the host" if held else ""))
    nodes = []
    for node in graph.nodes:
        if node.name not in folded:
            nodes.append(renamed_inputs(node, held))
        nodes.extend(handed.get(node.name, ()))
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(nodes), params=tuple(params), weights=weights,
                                                   derived=derived))


def may_fold(node: Node) -> bool:
    """Whether the node's results may be worked out at compile time from known inputs: an op of the table of a
    kind with no side effects (no extern, nothing mutated, no uninitialized `empty`)."""
    return not node.is_extern and node.definition.kind in _FOLDABLE_KINDS and not node.definition.schema.is_mutable \
        and not node.op.startswith("empty")


def _evaluate(node: Node, values: Mapping[str, torch.Tensor], frozen: set[str]) -> dict[str, torch.Tensor] | None:
    """`node`'s results by the op table's reference when every input is known and the node may fold: a small,
    deterministic op of the table that mutates nothing, whose results come out as the IR types them (None
    otherwise, and where the reference cannot run here: a CUDA arange on a machine without a GPU)."""
    if not may_fold(node) or any(name not in values for name in node.inputs) \
            or any(value.name in frozen or value.type.numel > FOLDED_ELEMENTS for value in node.outputs):
        return None
    try:
        results = node.definition.bind(node.attrs)([values[name] for name in node.inputs])
    except (RuntimeError, ValueError) as error:
        log.debug("%s not folded: its reference raised %s", node.name, error)
        return None
    out = {}
    for value, position in zip(node.outputs, node.result_positions):
        result = results[position]
        if tuple(result.shape) != value.type.shape or result.dtype != value.type.dtype:
            return None
        out[value.name] = result
    return out


def mutated_memory(graph: Graph) -> set[str]:
    """Values whose memory some node writes in place: the written value, every view it was made from, and
    every view of those."""
    base = {value.name: value.name for value in (*graph.inputs, *graph.params)}
    for node in graph.nodes:
        for value in node.outputs:
            base[value.name] = base.get(node.inputs[0], node.inputs[0]) if node.returns_view and node.inputs \
                else value.name
    written = {base.get(node.inputs[0]) for node in graph.nodes if node.inputs and node.definition.schema.is_mutable}
    return {name for name, root in base.items() if root in written}


def _frontier(graph: Graph, folded: dict[str, Node], values: dict[str, torch.Tensor]) -> list[Value]:
    """The folded values that a node that stays reads or the graph returns, each laid out as the IR types it.
    A value the graph returns (a caller may write to it) unfolds its node, which then reads folded values in
    turn, unless that node copies it from another device (it is then returned as a copy, `_hand_out`); so does
    one no dense tensor can hold (an `expand`)."""
    types = graph.types()
    returned = set(graph.outputs)
    while True:
        produced = {value.name: node for node in folded.values() for value in node.outputs}
        read = {name for node in graph.nodes if node.name not in folded for name in node.inputs}
        unfold = {produced[name].name for name in produced
                  if (name in returned and not _crosses_devices(produced[name], types))
                  or ((name in read or name in returned) and not _dense(produced[name], name))}
        if not unfold:
            break
        for name in unfold:
            del folded[name]
    frontier = [value for node in folded.values() for value in node.outputs if value.name in read | returned]
    for value in frontier:
        result = values[value.name]
        if result.stride() != value.type.layout:
            values[value.name] = torch.empty_strided(value.type.shape, value.type.layout, dtype=value.type.dtype,
                                                     device=result.device).copy_(result)
    return frontier


def _dense(node: Node, name: str) -> bool:
    """Whether the value's strides lay its elements out without overlap or gaps (a permutation of contiguous)."""
    value_type = next(value.type for value in node.outputs if value.name == name)
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(value_type.shape, value_type.layout) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _crosses_devices(node: Node, types: Mapping[str, TensorType]) -> bool:
    """Whether the node reads a value on one device and makes one on another (a `_to_copy` to the GPU)."""
    made = {value.type.device for value in node.outputs}
    return any(types[name].device not in made for name in node.inputs)


def _hand_out(graph: Graph, folded: Mapping[str, Node], frontier: list[Value]) -> tuple[dict[str, list[Node]], dict[str, str]]:
    """For the folded values the graph returns (each made on another device than its node read: `_frontier`),
    the copies that hand them out, by the name of the folded node they replace, and the name each one's folded
    value is held under. The copy keeps the returned value's name, so the graph's outputs stay as they were; a
    node that stays reads the held value itself."""
    returned = set(graph.outputs) & {value.name for value in frontier}
    taken = {value.name for value in (*graph.inputs, *graph.params)}
    taken |= {name for node in graph.nodes for name in (node.name, *(value.name for value in node.outputs))}
    handed: dict[str, list[Node]] = {}
    held: dict[str, str] = {}
    for node in folded.values():
        for value in (value for value in node.outputs if value.name in returned):
            held[value.name] = fresh_name(f"{value.name}_folded", taken)
            name = node.name if len(node.outputs) == 1 else fresh_name(f"{value.name}_copy", taken)
            handed.setdefault(node.name, []).append(Node(name, "clone", (held[value.name],), {}, (value,),
                                                         source=node.source))
    return handed, held


def fresh_name(name: str, taken: set[str]) -> str:
    """`name`, or it with a number after it, not among `taken` (which it joins)."""
    fresh, number = name, 1
    while fresh in taken:
        fresh, number = f"{name}_{number}", number + 1
    taken.add(fresh)
    return fresh


def renamed_inputs(node: Node, renamed: Mapping[str, str]) -> Node:
    """`node` reading each renamed value under its new name."""
    if not any(name in renamed for name in node.inputs):
        return node
    return dataclasses.replace(node, inputs=tuple(renamed.get(name, name) for name in node.inputs))
