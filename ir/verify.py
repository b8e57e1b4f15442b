"""The IR verifier: SSA, topological order, known ops, and types that agree with each op's rule.

It never trusts the code that built the graph: every type is recomputed from the op table.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .types import SUPPORTED_DTYPES

if TYPE_CHECKING:
    from .graph import Graph


class VerifyError(ValueError):
    """The graph breaks an IR invariant; the message names the node and the rule."""


def verify(graph: Graph) -> None:
    """Raise VerifyError at the first broken invariant."""
    defined = {}
    for value in (*graph.inputs, *graph.params):
        _define(defined, value.name, value.type, "graph input")
    for value in graph.params:
        if value.name not in graph.weights:
            raise VerifyError(f"param %{value.name} has no weight tensor")
        weight = graph.weights[value.name]
        if tuple(weight.shape) != value.type.shape or weight.dtype != value.type.dtype:
            raise VerifyError(f"param %{value.name}: weight is {tuple(weight.shape)} {weight.dtype}, type says {value.type}")
    for node in graph.nodes:
        for name in node.inputs:
            if name not in defined:
                raise VerifyError(f"node %{node.name} ({node.op}) uses %{name} before it is defined")
        try:
            definition = node.definition
        except (KeyError, LookupError) as error:
            raise VerifyError(f"node %{node.name}: unknown op {node.op!r} ({error})") from None
        input_types = [defined[name] for name in node.inputs]
        if not node.is_extern:
            touched = [*input_types, *(value.type for value in node.outputs)]
            if any(t.dtype not in SUPPORTED_DTYPES for t in touched):
                raise VerifyError(f"node %{node.name} ({node.op}) is native but touches an unsupported dtype")
        try:
            expected = definition.infer(definition, input_types, node.attrs)
        except Exception as error:  # the rule itself rejecting the inputs is the finding
            raise VerifyError(f"node %{node.name} ({node.op}): shape rule failed: {error}") from None
        actual = tuple(value.type for value in node.outputs)
        positions = node.result_positions
        present = tuple(i for i, t in enumerate(expected) if t is not None)
        typed = len(expected) if definition.typed_outputs is None else definition.typed_outputs
        if positions != present or not all(expected[p].same_as(a) for p, a in zip(positions, actual) if p < typed):
            shown = ", ".join("_" if t is None else str(t) for t in expected)
            raise VerifyError(f"node %{node.name} ({node.op}): outputs {', '.join(map(str, actual))}, rule gives {shown}")
        for value in node.outputs:
            _define(defined, value.name, value.type, f"node %{node.name}")
    for name in graph.outputs:
        if name not in defined:
            raise VerifyError(f"graph output %{name} is never defined")


def _define(defined: dict, name: str, type_, where: str) -> None:
    if name in defined:
        raise VerifyError(f"%{name} defined twice (again by {where}): the graph is not SSA")
    defined[name] = type_
