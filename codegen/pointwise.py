"""Triton source for a fused pointwise group: one program per block of the output's elements.

Every value the group reads is loaded through its own strides, broadcast to the iteration shape (the
shape all the group's results share); floating values are computed in float32 and rounded once,
when stored. The group's IR is a comment at the top of the source, so a dumped kernel says what it is.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..ir import Graph, Node, TensorType
from ..ir.expressions import EXPRESSIONS, FLOATS, TRITON_TYPES, operands
from ..optimizer.fusion import reads_of

BLOCK = 1024


@dataclass(frozen=True, slots=True)
class PointwiseSource:
    """A group's kernel source and calling convention: pointers to `inputs`, then to `outputs`."""

    name: str
    source: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    numel: int
    block: int = BLOCK


def generate(name: str, nodes: Sequence[Node], graph: Graph, outputs: Sequence[str]) -> PointwiseSource:
    """The kernel computing `nodes` (in order) and storing the values named in `outputs`."""
    types = graph.types()
    shape = types[outputs[0]].shape
    inputs = reads_of(nodes)
    for value in (*inputs, *outputs):
        if types[value].dtype not in TRITON_TYPES:
            raise ValueError(f"pointwise codegen handles {', '.join(map(str, TRITON_TYPES))}, not {types[value]}")
    variable = {value: f"in{i}" for i, value in enumerate(inputs)}
    lines = [f"# {str(node_line)}" for node_line in _ir_lines(nodes, graph)]
    lines += [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {name}({', '.join([f'{variable[v]}_ptr' for v in inputs] + [f'out{i}_ptr' for i in range(len(outputs))])}, "
        "numel, BLOCK: tl.constexpr):",
        "    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = index < numel",
    ]
    lines += _coordinates(shape)
    for value in inputs:
        offset = _offset(types[value], shape)
        cast = ".to(tl.float32)" if types[value].dtype in FLOATS else ""
        lines.append(f"    {variable[value]} = tl.load({variable[value]}_ptr + {offset}, mask=mask, other=0){cast}")
    for node in nodes:
        target = node.outputs[0].name
        expression = EXPRESSIONS[node.op](operands(node.definition.schema, node.attrs, [variable[n] for n in node.inputs]))
        variable[target] = f"t{len(variable)}"
        lines.append(f"    {variable[target]} = {expression}  # %{target} = {node.op}")
    for position, value in enumerate(outputs):
        result = variable[value]
        lines.append(f"    tl.store(out{position}_ptr + {_offset(types[value], shape)}, "
                     f"{result}.to({TRITON_TYPES[types[value].dtype]}), mask=mask)")
    return PointwiseSource(name, "\n".join(lines) + "\n", inputs, tuple(outputs), math.prod(shape))


def _ir_lines(nodes: Sequence[Node], graph: Graph) -> list[str]:
    types = graph.types()
    return [f"%{node.outputs[0].name}: {node.outputs[0].type} = {node.op}("
            f"{', '.join(f'%{n}: {types[n]}' for n in node.inputs)}){f' {dict(node.attrs)}' if node.attrs else ''}"
            for node in nodes]


def _coordinates(shape: tuple[int, ...]) -> list[str]:
    """c0, c1, … : the index of each dimension of `shape` for the flat element index."""
    lines, inner = [], 1
    for dim in reversed(range(len(shape))):
        lines.append(f"    c{dim} = (index // {inner}) % {shape[dim]}" if shape[dim] != 1 else f"    c{dim} = 0")
        inner *= shape[dim]
    return lines


def _offset(value_type: TensorType, shape: tuple[int, ...]) -> str:
    """Element offset of a value broadcast to `shape` (aligned from the right; broadcast dims stride 0)."""
    strides = value_type.layout
    skip = len(shape) - len(value_type.shape)
    terms = [f"c{skip + dim} * {stride}" for dim, (size, stride) in enumerate(zip(value_type.shape, strides))
             if size != 1 and stride != 0]
    return " + ".join(terms) if terms else "0"
