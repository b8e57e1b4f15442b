"""Triton source for a fused pointwise group: one program per block of the output's elements.

Every value the group reads is loaded through its own strides, broadcast to the iteration shape (the
shape all the group's results share); floating values are computed in float32 and rounded once,
when stored. A value is computed where it is needed: through a move (a view, cat, gather or short sum,
see ir.moves) the kernel reads the operand at the coordinates the move maps to, masked to the
piece it comes from, so whatever feeds a move is computed there. The group's IR is a comment at the top of
the source, so a dumped kernel says what it is.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

from ..ir import Graph, Node, TensorType
from ..ir.moves import summed_dims
from .expressions import INDEX_TYPES, STORED_TYPES, expression, literal
from ..ir.plans import reads_of
from .source import IDENTIFIER, KernelSource, check_dtypes, coordinates, header, load, memory_order, offset, spread

BLOCK = 1024

Coordinates = tuple[str, ...]
ValueAt = Callable[[str, Coordinates, str], str]
"""(value, its coordinates, where to load) -> the kernel variable holding it there."""


def generate(name: str, nodes: Sequence[Node], graph: Graph, outputs: Sequence[str]) -> KernelSource:
    """The kernel computing `nodes` (in order) and storing the values named in `outputs`."""
    types = graph.types()
    shape = types[outputs[0]].shape
    inputs = reads_of(nodes)
    check_dtypes(types, inputs, INDEX_TYPES)
    check_dtypes(types, outputs, INDEX_TYPES)
    lines = header(name, nodes, graph, inputs, len(outputs), "numel, BLOCK: tl.constexpr")
    lines += ["    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
              "    mask = index < numel"]
    lines += coordinates("index", shape, "c", memory_order(types[outputs[0]]))
    pointer = {value: f"in{i}_ptr" for i, value in enumerate(inputs)}
    made_by = {value.name: node for node in nodes for value in node.outputs}
    computed: dict[tuple[str, Coordinates, str], str] = {}

    scalars: set[str] = set()
    """Variables computed from numbers alone: an address made of them reaches no coordinate."""

    def fresh(expression: str, comment: str = "") -> str:
        variable = f"t{len(lines)}"
        lines.append(f"    {variable} = {expression}{comment}")
        if all(name in scalars for name in IDENTIFIER.findall(expression)):
            scalars.add(variable)
        return variable

    def value_at(value: str, at: Coordinates, where: str) -> str:
        key = (value, at, where)
        if key not in computed:
            node = made_by.get(value)
            if node is None:
                variable = f"t{len(lines)}"
                lines.append(load(variable, pointer[value], types[value], offset(types[value], at), where, scalars))
            elif node.definition.move is None:
                computed_here = expression(node, [value_at(n, at, where) for n in node.inputs])
                variable = fresh(computed_here, f"  # %{value} = {node.op}")
            else:
                local = tuple("0" if size == 1 else at[len(at) - len(types[value].shape) + dim]
                              for dim, size in enumerate(types[value].shape))
                variable = _read_through(node, value, local, where, types, value_at, fresh)
            computed[key] = variable
        return computed[key]

    names = tuple(f"c{dim}" for dim in range(len(shape)))
    for position, value in enumerate(outputs):
        lines.append(f"    tl.store(out{position}_ptr + {spread(offset(types[value], names), 'mask')}, "
                     f"{value_at(value, names, 'mask')}.to({STORED_TYPES[types[value].dtype]}), mask=mask)")
    numel = math.prod(shape)
    return KernelSource(name, "\n".join(lines) + "\n", inputs, tuple(outputs), -(-numel // BLOCK), (numel,),
                        (("BLOCK", BLOCK),))


def _read_through(node: Node, value: str, at: Coordinates, where: str, types: dict[str, TensorType],
                  value_at: ValueAt, fresh: Callable[[str], str]) -> str:
    """The move `node`'s result `value` at coordinates `at` (one per dim of its own shape), read from its operand."""
    shape, source, move = types[value].shape, node.inputs[0], node.definition.move
    rank = len(shape)
    if move.kind == "pieces":
        return _read_pieces(node, value, at, where, types, value_at, fresh)
    if move.kind == "insert":
        dim = node.attrs["dim"] % rank
        return value_at(source, at[:dim] + at[dim + 1:], where)
    if move.kind == "broadcast":
        kept = types[source].shape
        return value_at(source, tuple("0" if size == 1 else at[rank - len(kept) + dim] for dim, size in enumerate(kept)),
                        where)
    if move.kind == "permute":
        source_at = [""] * rank
        for dim, taken in enumerate(move.order(node.attrs, rank)):
            source_at[taken] = at[dim]
        return value_at(source, tuple(source_at), where)
    if move.kind == "gather":
        return _read_index(node, at, where, types, value_at, fresh)
    if move.kind == "sum":
        return _read_sum(node, at, where, types, value_at, fresh)
    if move.kind == "pad":
        return _read_padded(node, at, where, types, value_at, fresh)
    flat = " + ".join(f"{coordinate} * {stride}" for coordinate, stride in zip(at, _row_major(shape)) if coordinate != "0")
    flat = fresh(flat or "0")  # a reshape keeps the row-major order of elements
    kept = types[source].shape
    return value_at(source, tuple("0" if size == 1 else f"(({flat} // {stride}) % {size})"
                                  for size, stride in zip(kept, _row_major(kept))), where)


def _read_index(node: Node, at: Coordinates, where: str, types: dict[str, TensorType], value_at: ValueAt,
                fresh: Callable[[str], str]) -> str:
    """Indices of adjacent dims `first`.. of the operand, broadcast against each other to the result's dims
    `first`..`first + len(broadcast)`: the operand read at each index's value there (negative ones from the end)."""
    source, slots = node.inputs[0], node.attrs["indices"]
    taken = [(dim, slot) for dim, slot in enumerate(slots) if slot is not None]
    first = taken[0][0]
    broadcast = len(types[node.outputs[0].name].shape) - (len(types[source].shape) - len(taken))
    inside, rows = where, []
    for dim, slot in taken:
        index_shape = types[node.inputs[slot]].shape
        lead = first + broadcast - len(index_shape)
        raw = value_at(node.inputs[slot], tuple("0" if size == 1 else at[lead + d] for d, size in enumerate(index_shape)),
                       where)
        size = types[source].shape[dim]
        rows.append(fresh(f"tl.where({raw} < 0, {raw} + {size}, {raw})"))
        inside = fresh(f"{inside} & ({rows[-1]} >= 0) & ({rows[-1]} < {size})")  # no read outside the operand
    return value_at(source, (*at[:first], *rows, *at[first + broadcast:]), inside)


def _read_pieces(node: Node, value: str, at: Coordinates, where: str, types: dict[str, TensorType],
                 value_at: ValueAt, fresh: Callable[[str], str]) -> str:
    """A slice, split or cat: along one dim, result coordinates first <= c < end read an operand at c + shift."""
    dim, pieces = node.definition.move.pieces(node, value, types)
    result = None
    for source, first, end, shift in reversed(pieces):
        inside = fresh(f"({at[dim]} >= {first}) & ({at[dim]} < {end})") if len(pieces) > 1 else None
        guard = fresh(f"{where} & {inside}") if inside else where
        shifted = (*at[:dim], f"({at[dim]} + {shift})" if shift else at[dim], *at[dim + 1:])
        piece = value_at(source, shifted, guard)
        result = piece if result is None else fresh(f"tl.where({inside}, {piece}, {result})")
    return result


def _read_padded(node: Node, at: Coordinates, where: str, types: dict[str, TensorType], value_at: ValueAt,
                 fresh: Callable[[str], str]) -> str:
    """A constant pad: along each padded dim (the last first, as `pad` lists them), result coordinate c reads the
    operand at c - low where that lies inside it, and the fill value elsewhere (a negative pad crops)."""
    source, pads = node.inputs[0], node.attrs["pad"]
    kept = types[source].shape
    shifted, inside = list(at), []
    for pair in range(len(pads) // 2):
        dim, low, high = len(kept) - 1 - pair, pads[2 * pair], pads[2 * pair + 1]
        if low == 0 and high == 0:
            continue
        shifted[dim] = fresh(f"{at[dim]} - {low}") if low else at[dim]
        inside.append(f"({shifted[dim]} >= 0) & ({shifted[dim]} < {kept[dim]})")
    if not inside:
        return value_at(source, at, where)
    within = fresh(" & ".join(inside))
    read = value_at(source, tuple(shifted), fresh(f"{where} & {within}"))
    return fresh(f"tl.where({within}, {read}, {literal(node.attrs.get('value', 0))})")


def _read_sum(node: Node, at: Coordinates, where: str, types: dict[str, TensorType], value_at: ValueAt,
              fresh: Callable[[str], str]) -> str:
    """A sum over a few elements: each result coordinate adds its operand at every combination of the summed dims."""
    kept = types[node.inputs[0]].shape
    dims = summed_dims(node.attrs, kept)
    keepdim = node.attrs.get("keepdim", False)
    outer = iter(at)
    base = []
    for dim in range(len(kept)):
        if dim in dims:
            base.append(None)
            if keepdim:
                next(outer)
        else:
            base.append(next(outer))
    terms = []
    for combination in itertools.product(*(range(kept[dim]) for dim in dims)):
        chosen = dict(zip(dims, combination))
        terms.append(value_at(node.inputs[0], tuple(str(chosen[dim]) if dim in chosen else base[dim]
                                                     for dim in range(len(kept))), where))
    return fresh(" + ".join(terms))


def _row_major(shape: Sequence[int]) -> list[int]:
    """The strides of a contiguous tensor of `shape`, in elements."""
    strides, inner = [], 1
    for size in reversed(shape):
        strides.append(inner)
        inner *= size
    return strides[::-1]
