"""How a move maps its result's coordinates to its operands': the op table's `move` attribute.

A move computes nothing: each element of its result is an element of an operand (or, for a short sum, a few of
them added). Code generators read through a move by asking its entry which kind of map it is and, where the op's
attrs decide the map, for the numbers (a permutation's order, the pieces a slice or cat reads); how that is
spelled in a kernel is theirs (codegen.pointwise).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .types import TensorType

if TYPE_CHECKING:
    from .graph import Node

Piece = tuple[str, int, int, int]
"""(operand, first, end, shift): result coordinates first <= c < end along the move's dim read the operand at c + shift."""


@dataclass(frozen=True, slots=True)
class Move:
    """kind: "pieces" (slice, split, cat: `pieces` along one dim), "insert" (unsqueeze: a new size-1 dim), "broadcast"
    (expand), "permute" (`order`), "reshape" (view: the row-major order of elements kept), "gather" (index with
    tensors of adjacent dims), "sum" (a sum over a few elements of some dims) or "pad" (constant_pad_nd: the operand
    shifted by the low pads, the fill value outside it). `stored`: the result is a new dense
    tensor, which a kernel may store (a view's may not be)."""

    kind: str
    stored: bool = False
    order: Callable[[Mapping[str, Any], int], list[int]] | None = None
    """(attrs, rank) -> for each result dim, the operand dim it reads."""
    pieces: Callable[[Node, str, Mapping[str, TensorType]], tuple[int, list[Piece]]] | None = None
    """(node, result value, types) -> (the dim, the pieces the result reads along it)."""


def _permutation(attrs: Mapping[str, Any], rank: int) -> list[int]:
    return [dim % rank for dim in attrs["dims"]]


def _transposition(attrs: Mapping[str, Any], rank: int) -> list[int]:
    order = list(range(rank))
    if rank == 2 or "dim0" in attrs:
        first, second = (attrs["dim0"] % rank, attrs["dim1"] % rank) if "dim0" in attrs else (0, 1)
        order[first], order[second] = order[second], order[first]
    return order


def _cat_pieces(node: Node, value: str, types: Mapping[str, TensorType]) -> tuple[int, list[Piece]]:
    dim = node.attrs.get("dim", 0) % len(types[value].shape)
    pieces, first = [], 0
    for name in node.inputs:
        pieces.append((name, first, first + types[name].shape[dim], -first))
        first += types[name].shape[dim]
    return dim, pieces


def _slice_pieces(node: Node, value: str, types: Mapping[str, TensorType]) -> tuple[int, list[Piece]]:
    dim = node.attrs.get("dim", 0) % len(types[value].shape)
    size = types[node.inputs[0]].shape[dim]
    start = node.attrs.get("start") or 0
    start = min(max(start + size if start < 0 else start, 0), size)
    return dim, [(node.inputs[0], 0, types[value].shape[dim], start)]


def _split_pieces(node: Node, value: str, types: Mapping[str, TensorType]) -> tuple[int, list[Piece]]:
    dim = node.attrs.get("dim", 0) % len(types[value].shape)
    size = types[node.inputs[0]].shape[dim]
    split = node.attrs.get("split_sizes") or [node.attrs["split_size"]] * -(-size // node.attrs["split_size"])
    position = node.result_positions[[v.name for v in node.outputs].index(value)]
    return dim, [(node.inputs[0], 0, types[value].shape[dim], sum(split[:position]))]


MOVES: Mapping[str, Move] = {
    "slice.Tensor": Move("pieces", pieces=_slice_pieces),
    "split.Tensor": Move("pieces", pieces=_split_pieces),
    "split_with_sizes": Move("pieces", pieces=_split_pieces),
    "cat": Move("pieces", stored=True, pieces=_cat_pieces),
    "unsqueeze": Move("insert"),
    "expand": Move("broadcast"),
    "view": Move("reshape"),
    "_unsafe_view": Move("reshape"),
    "reshape": Move("reshape"),
    "permute": Move("permute", order=_permutation),
    "transpose.int": Move("permute", order=_transposition),
    "t": Move("permute", order=_transposition),
    "index.Tensor": Move("gather", stored=True),
    "sum.dim_IntList": Move("sum", stored=True),
    "constant_pad_nd": Move("pad", stored=True),
}
"""The op table's moves, by IR name (ir.ops gives each entry its own)."""


def summed_dims(attrs: Mapping[str, Any], shape: Sequence[int]) -> list[int]:
    """The dims a sum adds over (all of them when none are named)."""
    return sorted({dim % len(shape) for dim in attrs.get("dim") or range(len(shape))}) if shape else []
