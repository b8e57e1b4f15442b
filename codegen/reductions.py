"""Row reductions as Triton code: what a fused reduction kernel computes for a reduction or normalization node.

The Triton spelling of the op table's reductions and normalizations, beside the pointwise expressions. A reduction kernel iterates
over rows × columns, the columns being the trailing dims the ops reduce; a reduction turns a [rows, columns]
block into one value per row, kept as a [rows, 1] block so later expressions broadcast it back over the row.
Values are float32, as in `expressions`. An op, dim or attribute these forms do not cover is not fused.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .expressions import FLOATS, operands
from ..ir.types import TensorType

aten = torch.ops.aten

if TYPE_CHECKING:
    from ..ir.graph import Node


class RowCode(Protocol):
    """What a reduction's emitter can write into the kernel: named values and per-row reductions."""

    columns: int

    def let(self, expression: str) -> str:
        """Bind a value to a new variable (so it is computed once) and return the variable."""

    def sum(self, expression: str) -> str:
        """The row sum of a [rows, columns] value, over the real columns only, as a [rows, 1] variable."""

    def max(self, expression: str) -> str:
        """The row maximum, likewise."""


Emit = Callable[[Mapping[str, Any], RowCode], tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Reduction:
    """How to compute an op over rows: its emitter, which results are per row ("row") or per element ("full"),
    and which of its tensor arguments is reduced."""

    emit: Emit
    results: tuple[str, ...]
    reduced: str = "self"


def _sum(args: Mapping[str, Any], code: RowCode) -> tuple[str, ...]:
    return (code.sum(args["self"]),)


def _mean(args: Mapping[str, Any], code: RowCode) -> tuple[str, ...]:
    return (f"({code.sum(args['self'])} / {float(code.columns)!r})",)


def _softmax(args: Mapping[str, Any], code: RowCode) -> tuple[str, ...]:
    shifted = code.let(f"tl.exp({args['self']} - {code.max(args['self'])})")
    return (f"({shifted} / {code.sum(shifted)})",)


def _safe_softmax(args: Mapping[str, Any], code: RowCode) -> tuple[str, ...]:
    """Softmax that gives 0, not NaN, on a row masked out entirely (every value -inf), as attention's math path."""
    maximum = code.max(args["self"])
    shifted = code.let(f"tl.exp({args['self']} - {maximum})")
    return (f"tl.where({maximum} == float('-inf'), 0.0, {shifted} / {code.sum(shifted)})",)


def _log_softmax(args: Mapping[str, Any], code: RowCode) -> tuple[str, ...]:
    shifted = code.let(f"({args['self']} - {code.max(args['self'])})")
    return (f"({shifted} - tl.log({code.sum(f'tl.exp({shifted})')}))",)


def _layer_norm(args: Mapping[str, Any], code: RowCode) -> tuple[str, ...]:
    """Two passes over the row held in registers: mean, then the mean of squared deviations (no cancellation)."""
    mean = code.let(f"({code.sum(args['input'])} / {float(code.columns)!r})")
    centred = code.let(f"({args['input']} - {mean})")
    variance = f"({code.sum(f'{centred} * {centred}')} / {float(code.columns)!r})"
    rstd = code.let(f"tl.rsqrt({variance} + {float(args['eps'])!r})")
    out = f"({centred} * {rstd})"
    if args.get("weight") is not None:
        out = f"({out} * {args['weight']})"
    if args.get("bias") is not None:
        out = f"({out} + {args['bias']})"
    return out, mean, rstd


REDUCTIONS: dict[torch._ops.OpOverload, Reduction] = {
    aten.sum.dim_IntList: Reduction(_sum, ("row",)),
    aten.mean.dim: Reduction(_mean, ("row",)),
    aten._softmax.default: Reduction(_softmax, ("full",)),
    aten._log_softmax.default: Reduction(_log_softmax, ("full",)),
    aten._safe_softmax.default: Reduction(_safe_softmax, ("full",)),
    aten.native_layer_norm.default: Reduction(_layer_norm, ("full", "row", "row"), reduced="input"),
}


def row_reduction(node: Node) -> Reduction | None:
    """How a row kernel computes the node, when it is a reduction one can."""
    return REDUCTIONS.get(node.definition.target)


def reduced_dims(node: Node, types: Mapping[str, TensorType], read: set[str] | frozenset[str]) -> int | None:
    """How many trailing dims of its input `node` reduces, when a row kernel can compute it; None otherwise.

    `read` names the values read anywhere: a result whose type the op table does not promise (layer norm's
    saved statistics) must be unread.
    """
    spec = row_reduction(node)
    if spec is None:
        return None
    reduced = types[node.inputs[0]]
    if any(types[name].dtype not in FLOATS for name in node.inputs) or node.outputs[0].type.dtype not in FLOATS:
        return None
    typed = node.definition.typed_outputs
    if typed is not None and any(value.name in read for value in node.outputs[typed:]):
        return None
    rank = len(reduced.shape)
    if rank == 0 or node.attrs.get("dtype") not in (None, *FLOATS):
        return None
    dims = node.definition.reduces(node.attrs, rank)
    count = len(dims) if dims == set(range(rank - len(dims), rank)) else 0
    if count == 0 or count > rank or math.prod(reduced.shape[rank - count:]) == 0:
        return None
    return count


def emit_reduction(node: Node, variables: Sequence[str], code: RowCode) -> tuple[str, ...]:
    """The node's results as expressions over the kernel's `variables` (one per tensor input, in order)."""
    return REDUCTIONS[node.definition.target].emit(operands(node.definition.schema, node.attrs, variables), code)
