"""The IR graph: typed inputs and weights, nodes in topological order, outputs.

Graphs are immutable; passes build new ones. Weights are held by reference, never copied.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from .ops import OP_TABLE, OpDef, extern_def
from .schema import _tensor_kind, copies_out, out_overload
from .types import TensorType
from .verify import verify


@dataclass(frozen=True, slots=True)
class Value:
    """A named, typed SSA value."""

    name: str
    type: TensorType


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One op application. `op` is a key of the op table, or "extern" with `target` naming the torch op."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    outputs: tuple[Value, ...]
    target: str | None = None
    source: str | None = None
    positions: tuple[int, ...] | None = None
    """Where each output sits in the op's result; None means 0, 1, … Results the op leaves empty (None,
    e.g. convolution_backward's unrequested gradients) have no output."""

    @property
    def result_positions(self) -> tuple[int, ...]:
        return self.positions if self.positions is not None else tuple(range(len(self.outputs)))

    @property
    def definition(self) -> OpDef:
        """The op-table entry (or the extern wrapper) that gives this node its meaning."""
        return extern_def(self.target) if self.op == "extern" else OP_TABLE[self.op]

    @property
    def is_extern(self) -> bool:
        return self.op == "extern"

    @property
    def is_cast(self) -> bool:
        """A dtype conversion on the same device (a `copy_` into memory of the result's type)."""
        return self.op == "_to_copy" and set(self.attrs) <= {"dtype", "memory_format", "non_blocking"}

    @property
    def returns_view(self) -> bool:
        """Whether the node's results view its first input's memory: a view op, or an extern op whose schema says
        its result aliases an input (view_as_complex)."""
        return self.definition.kind == "view" or any(
            result.alias_info is not None for result in self.definition.schema.returns)

    @property
    def fills_given_memory(self) -> bool:
        """Whether the node can write its results into memory it is handed (an ATen out= overload of a fully
        typed op that writes there directly, or a cast) rather than return memory of its own: only such results
        can live in an arena without being copied in."""
        target = self.definition.target
        return self.is_cast or (out_overload(target) is not None and self.definition.typed_outputs is None
                                and not copies_out(target))


@dataclass(frozen=True, slots=True, eq=False)
class Graph:
    """A whole program: user inputs, weights (held by reference), nodes in topological order, outputs."""

    inputs: tuple[Value, ...]
    params: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    derived: Mapping[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    """Weights a pass made from others at compile time (a padded copy, a folded constant): name -> the source
    tensors. A runtime checks the sources' versions, since an in-place update of a source leaves them stale."""
    written: frozenset[str] = frozenset()
    """Weights the program writes after each call (a buffer the model updates in place, written back from an
    output): they change between calls, so no pass may treat them as constants."""

    def types(self) -> dict[str, TensorType]:
        """Every value's type by name."""
        table = {value.name: value.type for value in (*self.inputs, *self.params)}
        for node in self.nodes:
            table.update((value.name, value.type) for value in node.outputs)
        return table

    def readers(self) -> dict[str, list[Node]]:
        """Value name -> the nodes that read it, in graph order, each once (values nothing reads are absent)."""
        table: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in dict.fromkeys(node.inputs):
                table.setdefault(name, []).append(node)
        return table

    def verify(self) -> None:
        """Raise ember.ir.VerifyError unless the graph is well formed (see ir/verify.py)."""
        verify(self)

    def to_networkx(self) -> nx.MultiDiGraph:
        """Nodes and graph inputs/params as vertices; an edge per distinct value read, keyed by the value's name.

        A multigraph, because a node may read several outputs of one producer (cat of a split).
        """
        graph = nx.MultiDiGraph()
        for value in (*self.inputs, *self.params):
            graph.add_node(value.name, op="param" if value in self.params else "input", type=value.type)
        defined_by = {value.name: value.name for value in (*self.inputs, *self.params)}
        for node in self.nodes:
            graph.add_node(node.name, op=node.op, node=node)
            for name in dict.fromkeys(node.inputs):
                graph.add_edge(defined_by[name], node.name, key=name, value=name)
            defined_by.update((value.name, node.name) for value in node.outputs)
        return graph

    def __str__(self) -> str:
        return format_graph(self)


def format_graph(graph: Graph) -> str:
    """The readable text form tests compare against: one line per node."""
    params = {value.name for value in graph.params}
    header = ", ".join(
        f"%{value.name}: {value.type}{' param' if value.name in params else ''}"
        for value in (*graph.inputs, *graph.params)
    )
    lines = [f"graph({header}) {{"]
    for node in graph.nodes:
        named = dict(zip(node.result_positions, node.outputs))
        results = ", ".join(f"%{named[i].name}: {named[i].type}" if i in named else "_"
                            for i in range(max(named, default=-1) + 1))
        op = f"extern[{node.target}]" if node.is_extern else node.op
        operands = ", ".join(f"%{name}" for name in node.inputs)
        attrs = format_attrs(node)
        lines.append(f"  {results} = {op}({operands}){f' {{{attrs}}}' if attrs else ''}")
    lines.append(f"  return ({', '.join(f'%{name}' for name in graph.outputs)})")
    lines.append("}")
    return "\n".join(lines)


def format_attrs(node: Node) -> str:
    """`key=value` pairs; tensor-list attrs show the values they refer to, unless they are just the operands."""
    kinds = {argument.name: _tensor_kind(argument.type) for argument in node.definition.schema.arguments}
    parts = []
    for key, value in node.attrs.items():
        if kinds.get(key) == "list":
            if value == tuple(range(len(node.inputs))):
                continue  # the operand list already says it
            value = "[" + ", ".join("None" if slot is None else f"%{node.inputs[slot]}" for slot in value) + "]"
        elif isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        parts.append(f"{key}={value}")
    return ", ".join(parts)
