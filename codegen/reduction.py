"""Triton source for a fused reduction group: each program holds whole rows in registers.

The iteration space is rows × columns, the columns being the trailing dims the group reduces (a layer norm's
features, a softmax's last dim). Pointwise nodes before a reduction work on [rows, columns] blocks; a
reduction leaves one value per row, a [rows, 1] block that later nodes broadcast back over the row, so a
residual add, the norm and its scale and cast run as one kernel reading each input once. An embedding lookup in
the group is read from its table, row by row, at each row's index. Values are float32 until stored, as in
pointwise kernels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..ir import Graph, Node, TensorType
from .expressions import INDEX_TYPES, STORED_TYPES, expression, gathered_rows
from .reductions import emit_reduction, row_reduction
from ..ir.plans import reads_of
from .source import KernelSource, check_dtypes, coordinates, header, load, offset, spread

ELEMENTS_PER_PROGRAM = 4096
"""Rows per program are chosen so a program holds about this many elements of each [rows, columns] value."""


class _Rows:
    """The statements of a kernel body, with the per-row reductions a `Reduction` emitter asks for."""

    def __init__(self, lines: list[str], columns: int) -> None:
        self.lines, self.columns, self.count = lines, columns, 0

    def let(self, expression: str, comment: str = "") -> str:
        if expression.isidentifier():  # a cast to float32 or a clone: already a variable
            return expression
        self.count += 1
        name = f"t{self.count}"
        self.lines.append(f"    {name} = {expression}{f'  # {comment}' if comment else ''}")
        return name

    def sum(self, expression: str) -> str:
        return self.let(f"tl.sum(tl.where(mask, {expression}, 0.0), axis=1)[:, None]")

    def max(self, expression: str) -> str:
        return self.let(f"tl.max(tl.where(mask, {expression}, float('-inf')), axis=1)[:, None]")


def _power_of_two(count: int) -> int:
    """The smallest power of two at least `count` (and at least 1)."""
    return 1 << max(count - 1, 0).bit_length()


def launch_shape(rows: int, columns: int) -> tuple[int, int, int]:
    """(rows per program, columns padded to a power of two, warps) of a row kernel: a whole row per program,
    about ELEMENTS_PER_PROGRAM elements in all, and more warps for wider blocks."""
    block_columns = _power_of_two(columns)
    block_rows = min(_power_of_two(rows), max(1, ELEMENTS_PER_PROGRAM // block_columns))
    elements = block_rows * block_columns
    return block_rows, block_columns, 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def generate_rows(name: str, nodes: Sequence[Node], graph: Graph, outputs: Sequence[str],
                  shape: tuple[int, ...], reduced: int) -> KernelSource:
    """The kernel computing `nodes` over `shape`, whose last `reduced` dims are the columns, storing `outputs`."""
    types = graph.types()
    inputs = reads_of(nodes)
    check_dtypes(types, inputs, INDEX_TYPES)
    check_dtypes(types, outputs, INDEX_TYPES)
    rows_shape, columns_shape = shape[:len(shape) - reduced], shape[len(shape) - reduced:]
    rows, columns = math.prod(rows_shape), math.prod(columns_shape)
    block_rows, block_columns, warps = launch_shape(rows, columns)
    row_names = [f"r{dim}" for dim in range(len(rows_shape))]
    full_names = row_names + [f"k{dim}" for dim in range(len(columns_shape))]
    lines = header(name, nodes, graph, inputs, len(outputs), "rows, ROWS: tl.constexpr, COLUMNS: tl.constexpr")
    lines += ["    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]",
              "    column = tl.arange(0, COLUMNS)[None, :]",
              "    row_mask = row < rows",
              f"    mask = row_mask & (column < {columns})"]
    lines += coordinates("row", rows_shape, "r") + coordinates("column", columns_shape, "k")
    loads: list[str] = []
    code = _Rows([], columns)
    pointer = {value: f"in{i}_ptr" for i, value in enumerate(inputs)}
    loaded: dict[tuple[str, str], str] = {}

    def address(value_type: TensorType, per_row: bool, target: tuple[int, ...]) -> tuple[str, str]:
        names = row_names + ["0"] * (len(target) - len(rows_shape)) if per_row else full_names
        return offset(value_type, names), "row_mask" if per_row else "mask"

    def read(value: str, per_row: bool, target: tuple[int, ...]) -> str:
        if value in gathered:
            return gather(gathered[value])
        if value not in pointer:
            return variable[value]
        place, mask = address(types[value], per_row, target)
        if (value, place) not in loaded:
            loaded[value, place] = f"x{len(loaded)}"
            loads.append(load(loaded[value, place], pointer[value], types[value], place, mask))
        return loaded[value, place]

    def gather(node: Node) -> str:
        """An embedding's rows read from its table: each kernel row's index, then that row of the table (an index
        outside the table reads nothing, where eager would raise)."""
        table, indices = node.inputs
        if (table, node.name) not in loaded:
            index = read(indices, True, types[indices].shape)
            inside = f"g{len(loaded)}"
            loads.append(f"    {inside} = mask & ({index} >= 0) & ({index} < {types[table].shape[0]})")
            rows_stride, columns_stride = types[table].layout
            loaded[table, node.name] = f"x{len(loaded)}"
            loads.append(load(loaded[table, node.name], pointer[table], types[table],
                              f"{index}.to(tl.int64) * {rows_stride} + k0 * {columns_stride}", inside))
        return loaded[table, node.name]

    gathered = {node.outputs[0].name: node for node in nodes if gathered_rows(node, types, shape, reduced)}
    variable: dict[str, str] = {}
    per_row: dict[str, bool] = {value: False for value in gathered}
    for node in nodes:
        if node.outputs[0].name in gathered:
            continue
        reduction = row_reduction(node)
        if reduction is not None:
            results = emit_reduction(node, [read(n, False, shape) for n in node.inputs], code)
            kinds = reduction.results
            for value, position in zip(node.outputs, node.result_positions):
                variable[value.name] = code.let(results[position], f"%{value.name} = {node.op}")
                per_row[value.name] = kinds[position] == "row"
            continue
        target = node.outputs[0]
        row = target.type.shape != shape
        arguments = [read(n, row, target.type.shape) for n in node.inputs]
        variable[target.name] = code.let(expression(node, arguments), f"%{target.name} = {node.op}")
        per_row[target.name] = row
    lines += loads + code.lines
    for position, value in enumerate(outputs):
        value_type = types[value]
        place, mask = address(value_type, per_row[value], value_type.shape)
        result = read(value, False, shape) if value in gathered else variable[value]
        result = result if per_row[value] else f"tl.broadcast_to({result}, (ROWS, COLUMNS))"
        lines.append(f"    tl.store(out{position}_ptr + {spread(place, mask)}, {result}.to({STORED_TYPES[value_type.dtype]}), mask={mask})")
    return KernelSource(name, "\n".join(lines) + "\n", inputs, tuple(outputs), -(-rows // block_rows), (rows,),
                        (("ROWS", block_rows), ("COLUMNS", block_columns)), warps)
