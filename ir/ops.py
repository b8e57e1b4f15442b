"""The op table: one entry per IR op, read by the verifier, the executor, the cost model and the tests.

An IR op is an ATen overload (`mm`, `add.Tensor`, `sum.dim_IntList`) or one of ember's own
(`grouped_mm`, `linears`, `gated_linears`). Each entry gives the shape and dtype rule, FLOPs, bytes moved and a reference
implementation in torch; anything without an entry becomes an `extern` node that calls the op as is.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .moves import MOVES, Move
from .schema import bind_arguments
from .types import TensorType, type_of

Reference = Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]]
Infer = Callable[["OpDef", Sequence[TensorType], Mapping[str, Any]], tuple[TensorType | None, ...]]
"""Types of an op's results in order; None where the op returns no tensor (an unrequested gradient)."""
Flops = Callable[[Sequence[TensorType], Sequence[TensorType], Mapping[str, Any]], int]
Gemm = Callable[[Sequence[TensorType], Sequence[TensorType], Mapping[str, Any]], tuple[int, int, int, int]]
"""(inputs, outputs, attrs) -> (batch, m, n, k) of the matrix product an op runs."""
EagerWork = Callable[[Sequence[TensorType]], tuple[int, Mapping[str, int]]]
"""inputs -> (kernels launched, host dispatches by op kind) of an op's reference run eagerly."""

KINDS = (
    "pointwise", "reduction", "normalization", "matmul", "convolution", "attention", "view", "data", "routing", "extern"
)


@dataclass(frozen=True, slots=True)
class OpDef:
    """Everything ember knows about one op."""

    name: str
    kind: str
    schema: torch._C.FunctionSchema
    target: Callable[..., Any]
    infer: Infer
    flops: Flops
    typed_outputs: int | None = None
    """How many leading outputs the rule defines; None for all. The rest are implementation-defined
    (normalizations' saved statistics differ in shape and dtype across devices and torch versions)."""
    gathers: bool = False
    """Reads only the rows it returns from its first input (embedding, index): bytes read follow the output."""
    linear: bool = False
    """A linear layer: `input @ weight.T (+ bias)` of its inputs (input, weight[, bias])."""
    gemm: Gemm | None = None
    """The matrix product it runs, as (batch, m, n, k) (a convolution's implicit GEMM); None for other ops."""
    eager: EagerWork | None = None
    """What its reference costs run eagerly when that is more than one op of its kind (a loop over experts)."""
    concatenates: bool = False
    """Joins its tensor-list input along a dim (cat)."""
    overwrites: bool = False
    """Its result is its first input with some positions overwritten by values that do not depend on it, so that
    running it in place twice leaves what running it once does (a static KV cache's update)."""
    keeps_values: bool = False
    """Every element of its results (but an `index_result`) is one of its first input's elements, or that value
    converted (views, copies, sorting)."""
    index_result: int | None = None
    """The position of a result holding indices along `dim` of its first input (topk's, sort's)."""
    reduces: Callable[[Mapping[str, Any], int], set[int]] | None = None
    """(attrs, rank of its first input) -> the dims of it that it reduces over, for reductions and normalizations."""
    move: Move | None = None
    """How its result's coordinates map to its operands' when it computes nothing (views, slices, cat: ir.moves)."""
    converts: bool = False
    """Its result is its input's values in another dtype, or on another device (_to_copy)."""
    compares: Callable[[Any, Any], bool] | None = None
    """The comparison of its first input with a number that its elements hold (ge.Scalar: operator.ge)."""

    def bind(self, attrs: Mapping[str, Any]) -> Reference:
        """The reference implementation specialised to a node's attrs: inputs -> output tuple."""
        build = bind_arguments(self.schema, attrs)
        target = self.target

        def reference(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            args, kwargs = build(inputs)
            return as_tuple(target(*args, **kwargs))

        return reference

    def bytes_moved(self, inputs: Sequence[TensorType], outputs: Sequence[TensorType]) -> tuple[int, int]:
        """(bytes read, bytes written) by this op run on its own; views move nothing."""
        if self.kind == "view":
            return 0, 0
        written = sum(t.nbytes for t in outputs)
        if self.gathers:
            return written + sum(t.nbytes for t in inputs[1:]), written
        return sum(t.nbytes for t in inputs), written


def as_tuple(result: Any) -> tuple[torch.Tensor, ...]:
    """An op's result as a flat tuple of outputs."""
    if isinstance(result, torch.Tensor):
        return (result,)
    return tuple(result)


def op_name(overload: torch._ops.OpOverload) -> str:
    """IR name of an ATen overload: `aten.add.Tensor` -> `add.Tensor`, `aten.mm.default` -> `mm`."""
    packet = overload._schema.name.split("::", 1)[1]
    return packet if overload._overloadname == "default" else f"{packet}.{overload._overloadname}"


def qualified_name(overload: torch._ops.OpOverload) -> str:
    """`namespace.packet.overload`, the form `resolve_overload` reads back."""
    namespace, packet = overload._schema.name.split("::", 1)
    return f"{namespace}.{packet}.{overload._overloadname}"


def resolve_overload(name: str) -> torch._ops.OpOverload:
    """The OpOverload for `namespace.packet.overload`; raises LookupError when torch lacks it."""
    try:
        namespace, packet, overload = name.split(".")
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (ValueError, AttributeError, RuntimeError) as error:
        raise LookupError(f"no torch op named {name!r}") from error


# ---------------------------------------------------------------------------------------------
# Shape and dtype rules

def infer_by_tracing(op: OpDef, inputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType | None, ...]:
    """Types by running the reference on fake tensors: torch's own rule, exactly as tracing applies it.

    Fake tensors on the inputs' device rather than the meta device: some meta kernels disagree with
    the real ones, and kernels differ by device (histc takes int32 on CUDA, not on the CPU).
    """
    key = _traced_key(op, inputs, attrs)
    known = _TRACED_TYPES.get(key) if key is not None else None
    if known is not None:
        return known
    with FakeTensorMode():
        fakes = [torch.empty_strided(t.shape, t.layout, dtype=t.dtype, device=t.device)
                 for t in inputs]
        types = tuple(None if out is None else type_of(out) for out in op.bind(attrs)(fakes))
    if key is not None:
        if len(_TRACED_TYPES) >= _TRACED_TYPES_KEPT:
            _TRACED_TYPES.clear()
        _TRACED_TYPES[key] = types
    return types


_TRACED_TYPES: dict[tuple, tuple[TensorType | None, ...]] = {}
"""A cache of `infer_by_tracing`: the verifier types every node again after each pass that changed the graph, and a
run on fake tensors costs about a third of a millisecond (half a second a compile of a small Llama)."""
_TRACED_TYPES_KEPT = 16384

_PLAIN = (bool, int, float, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _traced_key(op: OpDef, inputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple | None:
    """What a traced type depends on, hashable; None where an attr is not plain data (a tensor, say)."""
    try:
        return (op.name, op.target, tuple(inputs), _plain(attrs), torch.get_default_dtype())
    except TypeError:
        return None


def _plain(value: Any) -> Any:
    """`value` as nested tuples of (type, value), so 1, 1.0 and True stay apart; TypeError where it is not plain."""
    if isinstance(value, Mapping):
        return tuple((name, _plain(item)) for name, item in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_plain(item) for item in value)
    if not isinstance(value, _PLAIN):
        raise TypeError(f"{type(value).__name__} is not plain data")
    return type(value), value


def infer_pointwise(op: OpDef, inputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
    """Broadcast shape of the tensor inputs; dtype by torch's promotion (bool for comparisons)."""
    shape = tuple(torch.broadcast_shapes(*(t.shape for t in inputs)))
    (probe,) = infer_by_tracing(op, [TensorType(t.shape, t.dtype, device=t.device) for t in inputs], attrs)
    return (TensorType(shape, probe.dtype, device=probe.device),)


def _matmul_out(batch: tuple[int, ...], m: int, k_left: int, k_right: int, n: int, like: TensorType, name: str) -> TensorType:
    if k_left != k_right:
        raise ValueError(f"{name}: inner dimensions differ ({k_left} vs {k_right})")
    return TensorType((*batch, m, n), like.dtype, device=like.device)


def infer_matmul(op: OpDef, inputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
    """mm, addmm, bmm, baddbmm, linear, grouped_mm: the output shape from the operand shapes."""
    if op.name in ("mm", "addmm"):
        a, b = inputs[-2:]
        out = _matmul_out((), a.shape[0], a.shape[1], b.shape[0], b.shape[1], a, op.name)
    elif op.name in ("bmm", "baddbmm"):
        a, b = inputs[-2:]
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{op.name}: batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
        out = _matmul_out((a.shape[0],), a.shape[1], a.shape[2], b.shape[1], b.shape[2], a, op.name)
    elif op.name == "linear":
        x, w = inputs[:2]
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: input features {x.shape[-1]} != weight in_features {w.shape[1]}")
        out = TensorType((*x.shape[:-1], w.shape[0]), x.dtype, device=x.device)
    elif op.name == "grouped_mm":
        x, w = inputs[:2]
        out = _matmul_out((), x.shape[0], x.shape[1], w.shape[1], w.shape[2], x, op.name)
    elif op.name == "linears":
        return _infer_linears(inputs, attrs)
    elif op.name == "gated_linears":
        return _infer_gated_linears(inputs, attrs)
    else:
        raise KeyError(op.name)
    return (out,)


def _infer_linears(inputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
    """ember.linears: one linear result per weight, each (*input rows, weight's out features)."""
    x = inputs[0]
    weights, biases = attrs["weights"], attrs.get("biases", ())
    if not weights or (biases and len(biases) != len(weights)):
        raise ValueError(f"linears: {len(weights)} weights and {len(biases)} biases")
    results = []
    for position, slot in enumerate(weights):
        weight = inputs[slot]
        if len(weight.shape) != 2 or weight.shape[1] != x.shape[-1]:
            raise ValueError(f"linears: input features {x.shape[-1]} do not match weight {position} {weight.shape}")
        bias = biases[position] if biases else None
        if bias is not None and inputs[bias].shape != (weight.shape[0],):
            raise ValueError(f"linears: bias {position} {inputs[bias].shape} for weight {weight.shape}")
        results.append(TensorType((*x.shape[:-1], weight.shape[0]), x.dtype, device=x.device))
    return tuple(results)


def _infer_gated_linears(inputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
    """ember.gated_linears: linears' results; its skip flag (the last input) is bool, one per input row."""
    x, skip = inputs[0], inputs[-1]
    if skip.dtype != torch.bool or skip.shape != x.shape[:-1]:
        raise ValueError(f"gated_linears: skip {skip.shape} {skip.dtype} is not one bool per row of input {x.shape}")
    return _infer_linears(inputs, attrs)


def infer_attention(op: OpDef, inputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
    """Output is (..., L, Ev): leading dims broadcast over q, k, v, the query's length, the value's head dim.

    With enable_gqa the head dim (-3) is the query's: key/value heads are shared by groups of query heads.
    """
    query, key, value = inputs[:3]
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"attention: key length {key.shape[-2]} != value length {value.shape[-2]}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"attention: query head dim {query.shape[-1]} != key head dim {key.shape[-1]}")
    kept = 3 if attrs.get("enable_gqa", False) else 2
    leading = tuple(torch.broadcast_shapes(query.shape[:-kept], key.shape[:-kept], value.shape[:-kept]))
    if kept == 3:
        if query.shape[-3] % key.shape[-3] or key.shape[-3] != value.shape[-3]:
            raise ValueError(f"attention: {query.shape[-3]} query heads cannot share {key.shape[-3]} key/value heads")
        leading += (query.shape[-3],)
    return (TensorType((*leading, query.shape[-2], value.shape[-1]), query.dtype, device=query.device),)


# ---------------------------------------------------------------------------------------------
# FLOP counts (multiply-add = 2 FLOPs)

def no_flops(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    return 0


def per_output_element(cost: int) -> Flops:
    """`cost` FLOPs for every output element (pointwise ops)."""
    return lambda inputs, outputs, attrs: cost * outputs[0].numel


def per_input_element(cost: int) -> Flops:
    """`cost` FLOPs for every element of the first input (reductions, normalizations, scans)."""
    return lambda inputs, outputs, attrs: cost * inputs[0].numel


def matmul_flops(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    """2·M·N·K per (batched) product; the bias add of addmm/baddbmm/linear counts one per output."""
    out = outputs[0]
    k = inputs[-1].shape[-2] if len(inputs[-1].shape) >= 2 else inputs[-1].shape[0]
    return 2 * out.numel * k


def addmm_flops(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    return matmul_flops(inputs, outputs, attrs) + outputs[0].numel


def linear_flops(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    """2·rows·out·in, plus one add per output element when there is a bias."""
    in_features = inputs[1].shape[1]
    return 2 * outputs[0].numel * in_features + (outputs[0].numel if len(inputs) > 2 else 0)


def linears_flops(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    """Each result as its own linear: 2·rows·out·in, plus its bias adds."""
    biases = [slot for slot in attrs.get("biases", ()) if slot is not None]
    return sum(2 * out.numel * inputs[0].shape[-1] for out in outputs) + sum(inputs[slot].numel for slot in biases)


def grouped_mm_flops(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    """Each routed row is multiplied by its expert's (K, N) matrix: 2·S·K·N.

    Offsets are data, so the count assumes every row is routed (offsets[-1] == S), as MoE dispatch does.
    """
    rows, k = inputs[0].shape
    return 2 * rows * k * inputs[1].shape[2]


def convolution_flops(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    """2·N·C_out·(output spatial)·(C_in/groups)·(kernel spatial), plus the bias add.

    weight.shape[1] is already C_in/groups; a transposed convolution's weight is (C_in, C_out/groups, …)
    and it multiplies every input element instead of every output element.
    """
    weight, out = inputs[1], outputs[0]
    multiplied = inputs[0] if attrs.get("transposed", False) else out
    flops = 2 * multiplied.numel * weight.shape[1] * math.prod(weight.shape[2:])
    return flops + (out.numel if len(inputs) > 2 else 0)


def attention_flops(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    """Q·Kᵀ and P·V: 2·B·H·L·S·(E + Ev); a causal mask does not change the count of the dense kernel."""
    query, key, value = inputs[:3]
    batch_heads = math.prod(query.shape[:-2])
    length, source = query.shape[-2], key.shape[-2]
    return 2 * batch_heads * length * source * (query.shape[-1] + value.shape[-1])


# ---------------------------------------------------------------------------------------------
# Reference implementations that are not a single ATen call

def grouped_mm_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                         rows_covered: bool = False) -> torch.Tensor:
    """Rows [offsets[e-1], offsets[e]) of x times weight[e]; rows past the last offset are zero. One matmul per
    expert (it reads the offsets on the host); codegen.grouped_mm registers the GPU's grouped GEMM for CUDA.
    `rows_covered` says the last offset is the row count (there is no tail; the GPU's path zeroes none)."""
    out = x.new_zeros(x.shape[0], weight.shape[2])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight[expert]
        start = end
    return out


def linears_reference(x: torch.Tensor, weights: Sequence[torch.Tensor],
                      biases: Sequence[torch.Tensor | None] = ()) -> list[torch.Tensor]:
    """Several linears of one input, `F.linear(x, weights[i], biases[i])` each (no bias where `biases` is empty):
    the optimizer joins a vector's linears (query, key and value) into one, and codegen.skinny_mm reads every
    weight in one kernel on the GPU."""
    return [torch.nn.functional.linear(x, weight, biases[i] if biases else None) for i, weight in enumerate(weights)]


def gated_linears_reference(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                            skip: torch.Tensor) -> list[torch.Tensor]:
    """linears_reference with each result zero in the rows where `skip` (bool, shaped like x's rows) is true: a
    gated feed-forward's products (optimizer.ffn_gate), whose GPU kernel reads no weight for a skipped row."""
    zero = x.new_zeros(())
    return [torch.where(skip.unsqueeze(-1), zero, result) for result in linears_reference(x, weights, biases)]


_EMBER_LIBRARY = torch.library.Library("ember", "FRAGMENT")
_EMBER_LIBRARY.define("grouped_mm(Tensor input, Tensor weight, Tensor offsets, bool rows_covered=False) -> Tensor")
_EMBER_LIBRARY.impl("grouped_mm", grouped_mm_reference, "CompositeExplicitAutograd")
_EMBER_LIBRARY.impl(
    "grouped_mm", lambda x, weight, offsets, rows_covered=False: x.new_empty(x.shape[0], weight.shape[2]), "Meta"
)
_EMBER_LIBRARY.define("linears(Tensor input, Tensor[] weights, Tensor?[] biases) -> Tensor[]")
_EMBER_LIBRARY.impl("linears", linears_reference, "CompositeExplicitAutograd")
_EMBER_LIBRARY.impl("linears", lambda x, weights, biases=(): [x.new_empty(*x.shape[:-1], weight.shape[0])
                                                               for weight in weights], "Meta")
_EMBER_LIBRARY.define("gated_linears(Tensor input, Tensor[] weights, Tensor?[] biases, Tensor skip) -> Tensor[]")
_EMBER_LIBRARY.impl("gated_linears", gated_linears_reference, "CompositeExplicitAutograd")
_EMBER_LIBRARY.impl("gated_linears", lambda x, weights, biases, skip: [x.new_empty(*x.shape[:-1], weight.shape[0])
                                                                       for weight in weights], "Meta")


# ---------------------------------------------------------------------------------------------
# Matrix products' shapes, and what a reference loop costs

def _mm_gemm(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[int, ...]:
    a, b = inputs[-2:]
    return 1, a.shape[0], b.shape[1], a.shape[1]


def _bmm_gemm(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[int, ...]:
    a, b = inputs[-2:]
    return a.shape[0], a.shape[1], b.shape[2], a.shape[2]


def _linear_gemm(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[int, ...]:
    x, weight = inputs[:2]
    return 1, math.prod(x.shape[:-1]), weight.shape[0], weight.shape[1]


def _linears_gemm(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[int, ...]:
    x = inputs[0]
    return 1, math.prod(x.shape[:-1]), sum(out.shape[-1] for out in outputs), x.shape[-1]


def _grouped_gemm(inputs: Sequence[TensorType], outputs: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[int, ...]:
    x, weight = inputs[:2]
    experts = weight.shape[0]
    return experts, max(1, x.shape[0] // experts), weight.shape[2], weight.shape[1]


def _convolution_gemm(inputs: Sequence[TensorType], outputs: Sequence[TensorType],
                      attrs: Mapping[str, Any]) -> tuple[int, ...]:
    weight, out = inputs[1], outputs[0]
    groups = attrs.get("groups", 1)
    out_channels = out.shape[1]
    return groups, out.numel // out_channels, out_channels // groups, math.prod(weight.shape[1:])


def _named_dims(attrs: Mapping[str, Any], rank: int) -> set[int]:
    """A reduction's `dim` attr (all dims when it names none)."""
    return {dim % rank for dim in attrs.get("dim") or range(rank)}


def _softmax_dim(attrs: Mapping[str, Any], rank: int) -> set[int]:
    return {attrs["dim"] % rank}


def _normalized_dims(attrs: Mapping[str, Any], rank: int) -> set[int]:
    """A layer norm's trailing `normalized_shape` dims."""
    return set(range(rank - len(attrs["normalized_shape"]), rank))


def _grouped_mm_eager(inputs: Sequence[TensorType]) -> tuple[int, Mapping[str, int]]:
    """grouped_mm_reference: a zero fill and a host sync on the offsets, then per expert three slices, a matmul and
    a copy."""
    experts = inputs[1].shape[0]
    return 2 * experts + 1, {"matmul": experts, "pointwise": experts, "view": 3 * experts, "default": 2}


# ---------------------------------------------------------------------------------------------
# The table

OP_TABLE: dict[str, OpDef] = {}


def register(
    overload: torch._ops.OpOverload, kind: str, infer: Infer, flops: Flops, name: str | None = None,
    **attributes: Any,
) -> OpDef:
    """Add one op; the name defaults to the overload's IR name; `attributes` are OpDef's optional fields."""
    assert kind in KINDS, kind
    op = OpDef(name or op_name(overload), kind, overload._schema, overload, infer, flops, **attributes)
    OP_TABLE[op.name] = op
    return op


def _annotate(names: str, **attributes: Any) -> None:
    """Give the registered ops `names` (space-separated IR names) these attributes."""
    for name in names.split():
        OP_TABLE[name] = dataclasses.replace(OP_TABLE[name], **attributes)


def _overloads(names: str) -> list[torch._ops.OpOverload]:
    """`"add.Tensor mm"` -> [aten.add.Tensor, aten.mm.default]."""
    result = []
    for name in names.split():
        packet, _, overload = name.partition(".")
        result.append(getattr(getattr(torch.ops.aten, packet), overload or "default"))
    return result


# Pointwise ops; the number is FLOPs per output element (transcendentals count as a few).
_POINTWISE = {
    1: "abs neg relu sign floor ceil round trunc logical_not bitwise_not isnan isinf clamp clamp_min clamp_max "
    "hardtanh leaky_relu add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Scalar mul.Tensor mul.Scalar "
    "div.Tensor div.Scalar div.Tensor_mode maximum minimum eq.Tensor eq.Scalar ne.Tensor ne.Scalar "
    "lt.Tensor lt.Scalar le.Tensor le.Scalar gt.Tensor gt.Scalar ge.Tensor ge.Scalar "
    "bitwise_and.Tensor bitwise_or.Tensor bitwise_xor.Tensor logical_and logical_or "
    "remainder.Tensor remainder.Scalar fmod.Tensor fmod.Scalar where.self where.ScalarOther masked_fill.Scalar "
    "masked_fill.Tensor "
    "reciprocal pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar hardsigmoid hardswish",
    0: "clone _to_copy lift_fresh_copy",
    4: "exp exp2 log log2 log1p expm1 sqrt rsqrt sin cos tan tanh sigmoid erf atan2 elu softplus",
    8: "gelu silu mish",
}
for _cost, _names in _POINTWISE.items():
    for _overload in _overloads(_names):
        register(_overload, "pointwise", infer_pointwise, per_output_element(_cost))

# Reductions and scans read every input element about once.
for _overload in _overloads(
    "sum sum.dim_IntList mean mean.dim amax amin max.dim min.dim max min argmax argmin prod prod.dim_int "
    "any any.dim all all.dim var.correction var_mean.correction std.correction cumsum logsumexp "
    "linalg_vector_norm"
):
    register(_overload, "reduction", infer_by_tracing, per_input_element(1))

# Softmax: max, subtract, exp, sum, divide. Norms: mean, centre, square, sum, scale, affine.
for _overload in _overloads("_softmax _log_softmax _safe_softmax"):
    register(_overload, "normalization", infer_by_tracing, per_input_element(5))
for _overload in _overloads("native_layer_norm native_group_norm _native_batch_norm_legit_no_training"):
    register(_overload, "normalization", infer_by_tracing, per_input_element(8), typed_outputs=1)

register(torch.ops.aten.mm.default, "matmul", infer_matmul, matmul_flops, gemm=_mm_gemm)
register(torch.ops.aten.bmm.default, "matmul", infer_matmul, matmul_flops, gemm=_bmm_gemm)
register(torch.ops.aten.addmm.default, "matmul", infer_matmul, addmm_flops, gemm=_mm_gemm)
register(torch.ops.aten.baddbmm.default, "matmul", infer_matmul, addmm_flops, gemm=_bmm_gemm)
register(torch.ops.aten.linear.default, "matmul", infer_matmul, linear_flops, gemm=_linear_gemm, linear=True)
register(torch.ops.ember.grouped_mm.default, "matmul", infer_matmul, grouped_mm_flops, name="grouped_mm",
         gemm=_grouped_gemm, eager=_grouped_mm_eager)
register(torch.ops.ember.linears.default, "matmul", infer_matmul, linears_flops, name="linears", gemm=_linears_gemm)
register(torch.ops.ember.gated_linears.default, "matmul", infer_matmul, linears_flops, name="gated_linears",
         gemm=_linears_gemm)
register(torch.ops.aten.convolution.default, "convolution", infer_by_tracing, convolution_flops, gemm=_convolution_gemm)
register(torch.ops.aten.scaled_dot_product_attention.default, "attention", infer_attention, attention_flops)

for _overload in _overloads(
    "view _unsafe_view reshape permute transpose.int t expand slice.Tensor select.int unsqueeze squeeze "
    "squeeze.dim squeeze.dims alias detach split_with_sizes split.Tensor unbind.int"
):
    register(_overload, "view", infer_by_tracing, no_flops)

register(torch.ops.aten.where.Scalar, "pointwise", infer_by_tracing, per_output_element(1))  # all scalars: typed by torch

for _overload in _overloads("embedding index.Tensor index_select"):
    register(_overload, "data", infer_by_tracing, no_flops, gathers=True)

for _overload in _overloads(
    "cat stack constant_pad_nd arange arange.start arange.start_step "
    "full full_like zeros zeros_like ones ones_like empty.memory_format empty_permuted scalar_tensor repeat "
    "flip roll tril triu fill.Scalar max_pool2d_with_indices avg_pool2d _adaptive_avg_pool2d "
    "upsample_nearest2d.vec"
):
    register(_overload, "data", infer_by_tracing, no_flops)

# MoE routing: choose experts, count and sort tokens, scatter and gather them back.
for _overload in _overloads(
    "topk sort argsort histc searchsorted.Tensor scatter.src scatter.value scatter_add scatter_reduce.two "
    "index_add index_put"
):
    register(_overload, "routing", infer_by_tracing, per_input_element(1))
register(torch.ops.aten.gather.default, "routing", infer_by_tracing, no_flops, gathers=True)

# What passes ask of an op beyond its kind.
_annotate("cat", concatenates=True)
_annotate("index_put", overwrites=True)
_annotate("view _unsafe_view reshape clone expand unsqueeze squeeze squeeze.dim permute transpose.int t slice.Tensor "
          "select.int alias detach _to_copy sort topk", keeps_values=True)
_annotate("sort topk", index_result=1)
_annotate("_to_copy", converts=True)
_annotate("sum.dim_IntList mean.dim", reduces=_named_dims)
_annotate("_softmax _log_softmax _safe_softmax", reduces=_softmax_dim)
_annotate("native_layer_norm", reduces=_normalized_dims)
for _name, _move in MOVES.items():
    _annotate(_name, move=_move)
for _name, _comparison in {"ge.Scalar": operator.ge, "gt.Scalar": operator.gt, "le.Scalar": operator.le,
                           "lt.Scalar": operator.lt}.items():
    _annotate(_name, compares=_comparison)


# ---------------------------------------------------------------------------------------------
# Externs: any other torch op, called as is

_EXTERNS: dict[str, OpDef] = {}


def extern_def(target: str) -> OpDef:
    """An OpDef for an op outside the table: torch's own rule for types, no FLOP estimate."""
    if target not in _EXTERNS:
        overload = resolve_overload(target)
        _EXTERNS[target] = OpDef("extern", "extern", overload._schema, overload, infer_by_tracing, no_flops)
    return _EXTERNS[target]
