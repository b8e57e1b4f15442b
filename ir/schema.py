"""ATen schemas as the single source of an op's calling convention.

A node keeps its tensor arguments as inputs and everything else as attrs; `split_arguments` and
`bind_arguments` convert between that form and an ATen call, reading only the op's schema.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

_TENSOR = torch._C.TensorType.get()


def _tensor_kind(arg_type: Any) -> str | None:
    """'one', 'optional' or 'list' for tensor-typed schema arguments, None otherwise."""
    if arg_type.isSubtypeOf(_TENSOR):
        return "one"
    if isinstance(arg_type, torch._C.OptionalType) and arg_type.getElementType().isSubtypeOf(_TENSOR):
        return "optional"
    if isinstance(arg_type, torch._C.ListType):
        element = arg_type.getElementType()
        if isinstance(element, torch._C.OptionalType):
            element = element.getElementType()
        if element.isSubtypeOf(_TENSOR):
            return "list"
    return None


def freeze(value: Any) -> Any:
    """Lists become tuples, recursively, so attrs are immutable and comparable."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    return value


def split_arguments(
    schema: torch._C.FunctionSchema, args: Sequence[Any], kwargs: Mapping[str, Any], is_tensor: Callable[[Any], bool]
) -> tuple[list[Any], dict[str, Any]]:
    """Split a call into (tensor inputs in schema order, attrs).

    A list-of-tensors argument is stored in attrs as a tuple of input positions (None for a missing
    optional entry); a missing optional tensor as None; a Python number given for a tensor as itself;
    non-tensor attrs equal to the schema default are dropped.
    """
    inputs: list[Any] = []
    attrs: dict[str, Any] = {}
    for position, argument in enumerate(schema.arguments):
        if position < len(args) and not argument.kwarg_only:
            value, given = args[position], True
        elif argument.name in kwargs:
            value, given = kwargs[argument.name], True
        else:
            value, given = None, False
        kind = _tensor_kind(argument.type)
        if kind in ("one", "optional") and is_tensor(value):
            inputs.append(value)
        elif kind in ("one", "optional") and isinstance(value, (int, float, bool)):
            attrs[argument.name] = value  # ATen takes a Python number here, with wrapped-number promotion
        elif kind == "one":
            raise TypeError(f"argument {argument.name!r} of {schema.name} expects a tensor, got {value!r}")
        elif kind == "list":
            slots = []
            for item in value:
                slots.append(None if item is None else len(inputs))
                if item is not None:
                    inputs.append(item)
            attrs[argument.name] = tuple(slots)
        elif kind == "optional":
            attrs[argument.name] = None
        elif given:
            frozen = freeze(value)
            if not (argument.has_default_value() and _equal(frozen, freeze(argument.default_value))):
                attrs[argument.name] = frozen
    return inputs, attrs


def _equal(left: Any, right: Any) -> bool:
    try:
        return type(left) is type(right) and bool(left == right)
    except (RuntimeError, TypeError):
        return False


def bind_arguments(
    schema: torch._C.FunctionSchema, attrs: Mapping[str, Any]
) -> Callable[[Sequence[Any]], tuple[list[Any], dict[str, Any]]]:
    """Return a function that builds (args, kwargs) for an ATen call from a node's inputs.

    The layout is worked out once, so the per-call cost is a list fill. Arguments after the first
    omitted one go by keyword, so defaults in between stay defaults.
    """
    plan: list[tuple[str | None, str, Any]] = []  # (keyword or None, how, what)
    next_input = 0
    positional = True
    for argument in schema.arguments:
        kind = _tensor_kind(argument.type)
        if kind in ("one", "optional") and argument.name not in attrs:
            how, what = "input", next_input
            next_input += 1
        elif kind == "list":
            how, what = "list", tuple(attrs[argument.name])
            next_input += sum(slot is not None for slot in what)
        elif argument.name in attrs:
            how, what = "const", attrs[argument.name]
        else:
            positional = False
            continue
        positional = positional and not argument.kwarg_only
        plan.append((None if positional else argument.name, how, what))

    def build(inputs: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for keyword, how, what in plan:
            if how == "input":
                value = inputs[what]
            elif how == "const":
                value = what
            else:
                value = [None if slot is None else inputs[slot] for slot in what]
            if keyword is None:
                args.append(value)
            else:
                kwargs[keyword] = value
        return args, kwargs

    return build


COPYING_OUT = frozenset({
    "aten._adaptive_avg_pool2d.out", "aten._unsafe_view.out", "aten.add.Scalar_out", "aten.all.all_out",
    "aten.all.out", "aten.any.all_out", "aten.any.out", "aten.clone.out", "aten.constant_pad_nd.out",
    "aten.convolution.out", "aten.div.Scalar_out", "aten.embedding.out", "aten.fill.Scalar_out", "aten.flip.out",
    "aten.histc.out", "aten.index_put.out", "aten.isinf.out", "aten.isnan.out", "aten.lift_fresh_copy.out",
    "aten.masked_fill.Scalar_out", "aten.masked_fill.Tensor_out", "aten.mul.Scalar_out", "aten.prod.out",
    "aten.relu.out", "aten.repeat.out", "aten.roll.out", "aten.rsub.Scalar_out", "aten.sub.Scalar_out",
    "aten.sum.out", "aten.upsample_nearest2d.vec_out", "aten.var_mean.correction_out",
})
"""The `out=` overloads that compute into memory of their own and copy it out (mostly ATen's generated out=
wrappers around the functional op) whatever their arguments, so writing their result into given memory costs
a result-sized temporary. Measured on every op-table sample, and kept true, by tests/ir/test_op_table.py."""


def out_overload(op: object) -> tuple[torch._ops.OpOverload, tuple[str, ...]] | None:
    """The `out=` overload of an ATen op taking the same other arguments, and its out argument names."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    return _out_overload(op)


@functools.cache
def _out_overload(op: torch._ops.OpOverload) -> tuple[torch._ops.OpOverload, tuple[str, ...]] | None:
    schema = op._schema
    signature = _signature(schema)
    if signature is None:
        return None
    packet = op.overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)._schema
        written = [arg for arg in candidate.arguments if arg.alias_info is not None and arg.alias_info.is_write]
        if (written and all(arg.kwarg_only for arg in written) and len(written) == len(schema.returns)
                and _signature(candidate, skip_written=True) == signature):
            return getattr(packet, name), tuple(arg.name for arg in written)
    return None


def copies_out(op: object) -> bool:
    """Whether the op's `out=` overload writes through a temporary (see COPYING_OUT)."""
    found = out_overload(op)
    return found is not None and str(found[0]) in COPYING_OUT


def inplace_overload(op: object) -> torch._ops.OpOverload | None:
    """The in-place variant of an ATen op (`name_`, writing its first argument, the same arguments otherwise):
    how to write a result over that argument without the temporary some `out=` overloads make."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    return _inplace_overload(op)


@functools.cache
def _inplace_overload(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    signature = _signature(op._schema)
    namespace, name = op._schema.name.split("::")
    packet = getattr(getattr(torch.ops, namespace), name + "_", None)
    if signature is None or packet is None:
        return None
    for overload in packet.overloads():
        candidate = getattr(packet, overload)._schema
        first = candidate.arguments[0] if candidate.arguments else None
        if (first is not None and first.alias_info is not None and first.alias_info.is_write
                and _signature(candidate, skip_written=True) == signature[1:] and signature[0][:2] == (first.name, str(first.type))):
            return getattr(packet, overload)
    return None


def _signature(schema: torch._C.FunctionSchema, *, skip_written: bool = False) -> tuple | None:
    """(name, type, default) of each argument; None for an op that itself writes an argument."""
    result = []
    for arg in schema.arguments:
        if arg.alias_info is not None and arg.alias_info.is_write:
            if not skip_written:
                return None
            continue
        result.append((arg.name, str(arg.type), repr(arg.default_value), arg.kwarg_only))
    return tuple(result)
