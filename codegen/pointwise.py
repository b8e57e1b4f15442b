"""Triton source for a fused pointwise group: one program per block of the output's elements.

Every value the group reads is loaded through its own strides, broadcast to the iteration shape (the
shape all the group's results share); floating values are computed in float32 and rounded once,
when stored. The group's IR is a comment at the top of the source, so a dumped kernel says what it is.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..ir import Graph, Node
from ..ir.expressions import EXPRESSIONS, TRITON_TYPES, operands
from ..optimizer.fusion import reads_of
from .source import KernelSource, check_dtypes, coordinates, header, load, offset

BLOCK = 1024


def generate(name: str, nodes: Sequence[Node], graph: Graph, outputs: Sequence[str]) -> KernelSource:
    """The kernel computing `nodes` (in order) and storing the values named in `outputs`."""
    types = graph.types()
    shape = types[outputs[0]].shape
    inputs = reads_of(nodes)
    check_dtypes(types, (*inputs, *outputs))
    names = [f"c{dim}" for dim in range(len(shape))]
    lines = header(name, nodes, graph, inputs, len(outputs), "numel, BLOCK: tl.constexpr")
    lines += ["    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
              "    mask = index < numel"]
    lines += coordinates("index", shape, "c")
    variable = {value: f"in{i}" for i, value in enumerate(inputs)}
    lines += [load(variable[value], f"{variable[value]}_ptr", types[value], offset(types[value], names), "mask")
              for value in inputs]
    for node in nodes:
        target = node.outputs[0].name
        expression = EXPRESSIONS[node.op](operands(node.definition.schema, node.attrs, [variable[n] for n in node.inputs]))
        variable[target] = f"t{len(variable)}"
        lines.append(f"    {variable[target]} = {expression}  # %{target} = {node.op}")
    for position, value in enumerate(outputs):
        lines.append(f"    tl.store(out{position}_ptr + {offset(types[value], names)}, "
                     f"{variable[value]}.to({TRITON_TYPES[types[value].dtype]}), mask=mask)")
    numel = math.prod(shape)
    return KernelSource(name, "\n".join(lines) + "\n", inputs, tuple(outputs), -(-numel // BLOCK), (numel,),
                        (("BLOCK", BLOCK),))
