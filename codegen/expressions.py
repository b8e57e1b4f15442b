"""Pointwise ops as Triton expressions: what a fused pointwise kernel computes for each node.

The Triton spelling of the op table's elementwise ops, kept beside the code generator (the fusion pass asks
which nodes a kernel can compute, codegen how to write them). Expressions take and give float32 for floating values (ATen's "opmath":
half and bfloat16 ops compute in float32), and 0/1 booleans for comparisons; the kernel casts at the
loads and stores. Integer arithmetic (add, subtract, multiply, divide by a number, casts) computes in
integers. An op missing here, or an attribute these forms do not cover, is not fused.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..ir.moves import summed_dims
from ..ir.schema import _tensor_kind
from ..ir.types import TensorType

if TYPE_CHECKING:
    from ..ir.graph import Node

aten = torch.ops.aten
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TRITON_TYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
                torch.bool: "tl.int1"}
"""The dtypes a fused pointwise kernel reads and writes (integers stay reference steps)."""
INDEX_TYPES = (torch.int32, torch.int64)
"""The integer dtypes a pointwise kernel reads: the index tensor it gathers with, or an integer it casts."""

Emit = Callable[[Mapping[str, Any]], str | None]
"""Named operands (schema argument name -> a kernel variable for a tensor, or the number or attribute value)
-> expression, or None if unsupported."""


def operands(schema: Any, attrs: Mapping[str, Any], variables: Sequence[str]) -> dict[str, Any]:
    """Each schema argument of a node: its tensor inputs as the kernel's variables, in order; numbers and
    attributes as given, or their schema default."""
    named: dict[str, Any] = {}
    next_input = 0
    for argument in schema.arguments:
        kind = _tensor_kind(argument.type)
        if kind in ("one", "optional") and argument.name not in attrs:
            named[argument.name] = variables[next_input]
            next_input += 1
        elif argument.name in attrs:
            named[argument.name] = attrs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
    return named


def literal(value: Any) -> str | None:
    """A number as a Triton float literal (inf spelled out), None for anything else."""
    if isinstance(value, bool):
        return "1.0" if value else "0.0"
    if isinstance(value, (int, float)) and math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    if isinstance(value, (int, float)) and math.isfinite(value):
        return repr(float(value))
    return None


def _operand(value: Any) -> str | None:
    """A variable stays a name; a number becomes a float literal; anything else is unsupported."""
    return value if isinstance(value, str) else literal(value)


def _unary(form: str) -> Emit:
    def emit(args: Mapping[str, Any]) -> str | None:
        return form.format(x=args["self"])
    return emit


def _binary(form: str, scaled: bool = False) -> Emit:
    """`form` over self (x) and other (y); with `scaled`, other is multiplied by alpha first."""
    def emit(args: Mapping[str, Any]) -> str | None:
        x, y = _operand(args["self"]), _operand(args["other"])
        if x is None or y is None:
            return None
        if scaled and args.get("alpha", 1) != 1:
            alpha = literal(args["alpha"])
            if alpha is None:
                return None
            y = f"({y} * {alpha})"
        return form.format(x=x, y=y)
    return emit


def _compare(symbol: str) -> Emit:
    return _binary(f"({{x}} {symbol} {{y}})")


def _rsub(args: Mapping[str, Any]) -> str | None:
    other, alpha = literal(args["other"]), literal(args.get("alpha", 1))
    return None if other is None or alpha is None else f"({other} - {args['self']} * {alpha})"


def _pow(args: Mapping[str, Any]) -> str | None:
    x, exponent = args["self"], args["exponent"]
    forms = {2: f"({x} * {x})", 3: f"({x} * {x} * {x})", 1: x, 0.5: f"tl.sqrt({x})", -0.5: f"tl.rsqrt({x})",
             -1: f"(1.0 / {x})"}
    return forms.get(exponent) if isinstance(exponent, (int, float)) and not isinstance(exponent, bool) else None


def _clamp(low_key: str | None, high_key: str | None) -> Emit:
    """Clamp that keeps NaN (comparisons with NaN are false, so it passes through)."""
    def emit(args: Mapping[str, Any]) -> str | None:
        expression = args["self"]
        for key, symbol in ((low_key, "<"), (high_key, ">")):
            if key is None or args.get(key) is None:
                continue
            bound = _operand(args[key])
            if bound is None:
                return None
            expression = f"tl.where({expression} {symbol} {bound}, {bound}, {expression})"
        return expression
    return emit


_RELU6 = "tl.where({x} < 0.0, 0.0, tl.where({x} > 6.0, 6.0, {x}))"
"""min(max(x, 0), 6), NaN kept: hardsigmoid and hardswish as ATen's CUDA kernels compute them (MobileNetV3)."""


def _gelu(args: Mapping[str, Any]) -> str | None:
    x = args["self"]
    if args.get("approximate", "none") == "tanh":
        inner = f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})"
        return f"(0.5 * {x} * (1.0 + (2.0 * tl.sigmoid(2.0 * ({inner})) - 1.0)))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"


def _where(args: Mapping[str, Any]) -> str | None:
    x, y = _operand(args["self"]), _operand(args["other"])
    return None if x is None or y is None else f"tl.where({args['condition']} != 0, {x}, {y})"


def _masked_fill(args: Mapping[str, Any]) -> str | None:
    value = _operand(args["value"])
    return None if value is None else f"tl.where({args['mask']} != 0, {value}, {args['self']})"


def _leaky_relu(args: Mapping[str, Any]) -> str | None:
    slope = literal(args.get("negative_slope", 0.01))
    return None if slope is None else f"tl.where({args['self']} < 0.0, {args['self']} * {slope}, {args['self']})"


def _to_copy(args: Mapping[str, Any]) -> str | None:
    """A cast (the kernel rounds at the store; to bool it is `!= 0`, as torch casts, NaN included); a contiguous
    copy is fine too, as the kernel writes its result at the value's planned strides. A device named must be the
    operand's own (`fusible` checks)."""
    changed = {key for key in ("layout", "pin_memory") if args.get(key) is not None}
    if changed or args.get("memory_format") not in (None, torch.contiguous_format):
        return None
    dtype = args.get("dtype")
    if dtype == torch.bool:
        return f"({args['self']} != 0)"
    return f"{args['self']}.to(tl.float32)" if dtype in FLOATS else args["self"]


def _logical(form: str) -> Emit:
    """A logical op of two operands (or a bitwise one on booleans, the only dtype `fusible` lets them read):
    operands as truth values, a 0/1 result."""
    def emit(args: Mapping[str, Any]) -> str | None:
        return form.format(x=f"({args['self']} != 0)", y=f"({args['other']} != 0)")
    return emit


EXPRESSIONS: dict[torch._ops.OpOverload, Emit] = {
    aten.add.Tensor: _binary("({x} + {y})", scaled=True),
    aten.add.Scalar: _binary("({x} + {y})", scaled=True),
    aten.sub.Tensor: _binary("({x} - {y})", scaled=True),
    aten.sub.Scalar: _binary("({x} - {y})", scaled=True),
    aten.rsub.Scalar: _rsub,
    aten.mul.Tensor: _binary("({x} * {y})"),
    aten.mul.Scalar: _binary("({x} * {y})"),
    aten.div.Tensor: _binary("({x} / {y})"),
    aten.div.Scalar: _binary("({x} / {y})"),
    aten.maximum.default: _binary("tl.where(({x} > {y}) | ({x} != {x}), {x}, {y})"),
    aten.minimum.default: _binary("tl.where(({x} < {y}) | ({x} != {x}), {x}, {y})"),
    aten.eq.Tensor: _compare("=="), aten.eq.Scalar: _compare("=="),
    aten.ne.Tensor: _compare("!="), aten.ne.Scalar: _compare("!="),
    aten.lt.Tensor: _compare("<"), aten.lt.Scalar: _compare("<"),
    aten.le.Tensor: _compare("<="), aten.le.Scalar: _compare("<="),
    aten.gt.Tensor: _compare(">"), aten.gt.Scalar: _compare(">"),
    aten.ge.Tensor: _compare(">="), aten.ge.Scalar: _compare(">="),
    aten.neg.default: _unary("(-{x})"),
    aten.abs.default: _unary("tl.abs({x})"),
    aten.exp.default: _unary("tl.exp({x})"),
    aten.log.default: _unary("tl.log({x})"),
    aten.sqrt.default: _unary("tl.sqrt({x})"),
    aten.rsqrt.default: _unary("tl.rsqrt({x})"),
    aten.reciprocal.default: _unary("(1.0 / {x})"),
    aten.sin.default: _unary("tl.sin({x})"),
    aten.cos.default: _unary("tl.cos({x})"),
    aten.erf.default: _unary("tl.erf({x})"),
    aten.sigmoid.default: _unary("tl.sigmoid({x})"),
    aten.tanh.default: _unary("(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"),
    aten.silu.default: _unary("({x} * tl.sigmoid({x}))"),
    aten.relu.default: _unary("tl.where({x} < 0.0, 0.0, {x})"),
    aten.gelu.default: _gelu,
    aten.leaky_relu.default: _leaky_relu,
    aten.pow.Tensor_Scalar: _pow,
    aten.clamp.default: _clamp("min", "max"),
    aten.clamp_min.default: _clamp("min", None),
    aten.clamp_max.default: _clamp(None, "max"),
    aten.hardtanh.default: _clamp("min_val", "max_val"),
    aten.hardsigmoid.default: _unary(f"({_RELU6.format(x='({x} + 3.0)')} * 0.16666666666666666)"),
    aten.hardswish.default: _unary(f"({{x}} * {_RELU6.format(x='({x} + 3.0)')} / 6.0)"),
    aten.where.self: _where,
    aten.where.ScalarOther: _where,
    aten.where.Scalar: _where,
    aten.logical_and.default: _logical("({x} & {y})"), aten.bitwise_and.Tensor: _logical("({x} & {y})"),
    aten.logical_or.default: _logical("({x} | {y})"), aten.bitwise_or.Tensor: _logical("({x} | {y})"),
    aten.logical_not.default: _unary("({x} == 0)"), aten.bitwise_not.default: _unary("({x} == 0)"),
    aten.masked_fill.Scalar: _masked_fill,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _unary("{x}"),
}


BITWISE = frozenset({aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default})
"""Bitwise ops, spelled here as logical ones: right on booleans only."""


def _integer(value: Any) -> str | None:
    """A variable, or an integer number as an integer literal (a float or bool would change the arithmetic)."""
    if isinstance(value, str):
        return value
    return repr(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _integer_binary(form: str, scaled: bool = False) -> Emit:
    """`form` over integers self (x) and other (y); with `scaled`, other is multiplied by an integer alpha first."""
    def emit(args: Mapping[str, Any]) -> str | None:
        x, y, alpha = _integer(args["self"]), _integer(args["other"]), _integer(args.get("alpha", 1))
        if x is None or y is None or alpha is None:
            return None
        return form.format(x=x, y=y if alpha == "1" or not scaled else f"({y} * {alpha})")
    return emit


def _integer_divide(args: Mapping[str, Any]) -> str | None:
    """Integer division by a nonzero number, rounded down (`//`) or toward zero. How `//` rounds a negative
    operand is C's on the GPU, and need not be in Triton's interpreter, so only magnitudes are divided and the
    sign is applied here. A divisor tensor is not taken: division by zero raises in ATen, and a kernel could not."""
    x, divisor, rounding = _integer(args["self"]), args["other"], args.get("rounding_mode")
    if x is None or rounding not in ("floor", "trunc") or not isinstance(divisor, int) or isinstance(divisor, bool) \
            or divisor == 0:
        return None
    magnitude = f"(tl.abs({x}) // {abs(divisor)})"
    negative = f"({x} < 0)" if divisor > 0 else f"({x} > 0)"
    if rounding == "trunc":
        return f"tl.where({negative}, -{magnitude}, {magnitude})"
    inexact = f"({magnitude} * {abs(divisor)} != tl.abs({x}))"
    return f"tl.where({negative}, tl.where({inexact}, -{magnitude} - 1, -{magnitude}), {magnitude})"


def _integer_cast(args: Mapping[str, Any]) -> str | None:
    """A cast between integer types (wrapping as torch's does); nothing else changed."""
    dtype = args.get("dtype")
    if {key for key in ("layout", "pin_memory") if args.get(key) is not None} or dtype not in (None, *INDEX_TYPES) \
            or args.get("memory_format") not in (None, torch.contiguous_format):
        return None
    return args["self"] if dtype is None else f"{args['self']}.to({STORED_TYPES[dtype]})"


STORED_TYPES = {**TRITON_TYPES, torch.int32: "tl.int32", torch.int64: "tl.int64"}
"""Every dtype a generated kernel stores: its floating and boolean values, and integers it computes."""

INTEGER_EXPRESSIONS: dict[torch._ops.OpOverload, Emit] = {
    aten.add.Tensor: _integer_binary("({x} + {y})", scaled=True),
    aten.add.Scalar: _integer_binary("({x} + {y})", scaled=True),
    aten.sub.Tensor: _integer_binary("({x} - {y})", scaled=True),
    aten.sub.Scalar: _integer_binary("({x} - {y})", scaled=True),
    aten.mul.Tensor: _integer_binary("({x} * {y})"),
    aten.mul.Scalar: _integer_binary("({x} * {y})"),
    aten.div.Tensor_mode: _integer_divide,
    aten._to_copy.default: _integer_cast,
    aten.clone.default: _unary("{x}"),
}
"""Integer arithmetic over int32 and int64 operands, computed in integers (an index made from another: MoE
routing's token of each sorted choice, `order // top_k`)."""


def expression(node: Node, arguments: Sequence[str]) -> str | None:
    """What a kernel computes for `node` from its operands' kernel variables (integer arithmetic where the node
    makes integers), or None if no form covers its op and attrs."""
    table = INTEGER_EXPRESSIONS if node.outputs[0].type.dtype in INDEX_TYPES else EXPRESSIONS
    emit = table.get(node.definition.target)
    return None if emit is None else emit(operands(node.definition.schema, node.attrs, arguments))


def fusible(node: Node, types: Mapping[str, TensorType]) -> bool:
    """Whether a pointwise kernel can compute this node: an expression for its op and attrs, one result, and
    float32, float16, bfloat16 or bool for every value it reads and writes (a cast may read an integer: an int
    mask made boolean), or int32 and int64 for all of them (integer arithmetic); bitwise ops on booleans only."""
    if len(node.outputs) != 1:
        return False
    reads = [types[n].dtype for n in node.inputs]
    result = node.outputs[0].type.dtype
    if result in INDEX_TYPES:
        readable: tuple[torch.dtype, ...] = INDEX_TYPES
    else:
        readable = (*TRITON_TYPES, *INDEX_TYPES) if node.definition.converts else tuple(TRITON_TYPES)
        if result not in TRITON_TYPES:
            return False
    if any(dtype not in readable for dtype in reads):
        return False
    if node.definition.target in BITWISE and any(dtype != torch.bool for dtype in reads):
        return False
    device = node.attrs.get("device")
    if device is not None and any(torch.device(device).type != types[n].device for n in node.inputs):
        return False
    return expression(node, [f"v{i}" for i in range(len(node.inputs))]) is not None


def materialized(node: Node) -> bool:
    """Whether the node is a move whose result is a new dense tensor, which a kernel may store (cat, gather, sum)."""
    move = node.definition.move
    return move is not None and move.stored


def viewing_move(node: Node) -> bool:
    """Whether the node is a move whose result a kernel reads through but never stores (a view, a slice)."""
    move = node.definition.move
    return move is not None and not move.stored


MAX_SUMMED = 8
"""A sum a pointwise kernel unrolls adds at most this many elements per result."""


def movable(node: Node, types: Mapping[str, TensorType]) -> bool:
    """Whether a pointwise kernel can read through this node (a move of the op table, ir.moves): values of the
    kernel's dtypes, index tensors of int32 or int64, pieces of equal ranks and a slice of step 1, indices of adjacent
    dims (broadcast against each other, as `mask[batch, position]`), a short sum, a pad by a number the result's
    dtype holds."""
    move = node.definition.move
    if move is None:
        return False
    slots = {slot for slot in node.attrs.get("indices", ()) if slot is not None}
    indices = [types[node.inputs[slot]] for slot in sorted(slots)]
    values = [types[name] for position, name in enumerate(node.inputs) if position not in slots]
    if any(t.dtype not in TRITON_TYPES for t in (*values, *(v.type for v in node.outputs))):
        return False
    if move.kind == "pieces":
        return node.attrs.get("step", 1) == 1 and all(len(t.shape) == len(node.outputs[0].type.shape) for t in values)
    if move.kind == "gather":
        taken = [dim for dim, slot in enumerate(node.attrs["indices"]) if slot is not None]
        return (bool(indices) and all(index.dtype in INDEX_TYPES for index in indices)
                and taken == list(range(taken[0], taken[-1] + 1)) and len(node.attrs["indices"]) <= len(values[0].shape))
    if move.kind == "pad":
        fill = node.attrs.get("value", 0)
        return literal(fill) is not None and (node.outputs[0].type.dtype in FLOATS or float(fill).is_integer())
    if move.kind == "sum":
        source = values[0].shape
        dims = summed_dims(node.attrs, source)
        return (node.attrs.get("dtype") in (None, node.outputs[0].type.dtype) and bool(dims)
                and 1 <= math.prod(source[dim] for dim in dims) <= MAX_SUMMED)
    return True


def gathered_rows(node: Node, types: Mapping[str, TensorType], shape: Sequence[int], reduced: int) -> bool:
    """Whether a row kernel over `shape` (its last `reduced` dims the columns) can read this node's result where it
    reads it: an embedding lookup whose result is the kernel's space, or broadcasts to it along the rows, so each
    of the kernel's rows is one row of the table, picked by its index (a norm over token embeddings reads them
    from the table itself)."""
    if node.definition.target != torch.ops.aten.embedding.default or reduced != 1 or len(node.outputs) != 1:
        return False
    table, indices, result = types[node.inputs[0]], types[node.inputs[1]], node.outputs[0].type
    return (len(table.shape) == 2 and table.dtype in FLOATS and indices.dtype in INDEX_TYPES
            and result.dtype == table.dtype and len(result.shape) <= len(shape) and result.shape[-1] == shape[-1]
            and all(size in (1, full) for size, full in zip(reversed(result.shape), reversed(shape))))
