"""Triton source for a fused pointwise group: one program per block of the output's elements.

Every value the group reads is loaded through its own strides, broadcast to the iteration shape (the
shape all the group's results share); floating values are computed in float32 and rounded once,
when stored. A value is computed where it is needed: through a slice, split or cat the kernel reads its
operand at shifted coordinates (masked to the piece it comes from), so what feeds a move is computed there.
The group's IR is a comment at the top of the source, so a dumped kernel says what it is.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..ir import Graph, Node
from ..ir.expressions import EXPRESSIONS, TRITON_TYPES, moved, operands
from ..optimizer.fusion import reads_of
from .source import KernelSource, check_dtypes, coordinates, header, load, offset

BLOCK = 1024


def generate(name: str, nodes: Sequence[Node], graph: Graph, outputs: Sequence[str]) -> KernelSource:
    """The kernel computing `nodes` (in order) and storing the values named in `outputs`."""
    types = graph.types()
    shape = types[outputs[0]].shape
    inputs = reads_of(nodes)
    check_dtypes(types, (*inputs, *outputs))
    lines = header(name, nodes, graph, inputs, len(outputs), "numel, BLOCK: tl.constexpr")
    lines += ["    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
              "    mask = index < numel"]
    lines += coordinates("index", shape, "c")
    pointer = {value: f"in{i}_ptr" for i, value in enumerate(inputs)}
    made_by = {value.name: node for node in nodes for value in node.outputs}
    computed: dict[tuple[str, tuple[str, ...], str], str] = {}

    def fresh(expression: str, comment: str = "") -> str:
        variable = f"t{len(lines)}"
        lines.append(f"    {variable} = {expression}{comment}")
        return variable

    def value_at(value: str, at: tuple[str, ...], where: str) -> str:
        """The variable holding `value` at coordinates `at` (right-aligned), loading only where `where` holds."""
        key = (value, at, where)
        if key in computed:
            return computed[key]
        node = made_by.get(value)
        if node is None:
            variable = f"t{len(lines)}"
            lines.append(load(variable, pointer[value], types[value], offset(types[value], at), where))
        elif moves := moved(node, types):
            variable = read_through(value, moves[value], at, where)
        else:
            expression = EXPRESSIONS[node.op](operands(node.definition.schema, node.attrs,
                                                        [value_at(n, at, where) for n in node.inputs]))
            variable = fresh(expression, f"  # %{value} = {node.op}")
        computed[key] = variable
        return variable

    def read_through(value: str, move: tuple, at: tuple[str, ...], where: str) -> str:
        dim, pieces = move
        rank = len(types[value].shape)
        axis = len(at) - rank + dim
        local = tuple("0" if size == 1 else at[len(at) - rank + i] for i, size in enumerate(types[value].shape))
        coordinate = local[dim]
        result = None
        for source, first, end, shift in reversed(pieces):
            inside = fresh(f"({coordinate} >= {first}) & ({coordinate} < {end})") if len(pieces) > 1 else None
            guard = fresh(f"{where} & {inside}") if inside else where
            shifted = (*local[:dim], f"({coordinate} + {shift})" if shift else coordinate, *local[dim + 1:])
            piece = value_at(source, (*at[:axis - dim], *shifted), guard)
            result = piece if result is None else fresh(f"tl.where({inside}, {piece}, {result})")
        return result

    names = tuple(f"c{dim}" for dim in range(len(shape)))
    for position, value in enumerate(outputs):
        lines.append(f"    tl.store(out{position}_ptr + {offset(types[value], names)}, "
                     f"{value_at(value, names, 'mask')}.to({TRITON_TYPES[types[value].dtype]}), mask=mask)")
    numel = math.prod(shape)
    return KernelSource(name, "\n".join(lines) + "\n", inputs, tuple(outputs), -(-numel // BLOCK), (numel,),
                        (("BLOCK", BLOCK),))
