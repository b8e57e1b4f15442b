"""Running steps in given memory: a step's results written into arena views or over a dying input.

A step whose op has an ATen `out=` overload writes straight into the memory it is given (a cast is a
`copy_` into it); any other step (a view an extern op returns) computes as usual and is copied in, since
the memory it views is reused. Results given no memory are allocated by the op, as in eager mode. How a
step calls its op is decided once, as plain data (`Call`), which the executor's closures and the generated
wrapper both follow.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ir import Node, TensorType
from ..ir.schema import bind_arguments, inplace_overload, out_overload

GivenRun = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor | None]], tuple[torch.Tensor, ...]]
"""A bound step: (its inputs, memory given per result or None) -> its results."""

BuildArguments = Callable[[Sequence[Any]], tuple[list[Any], dict[str, Any]]]
"""A node's inputs -> (args, kwargs) of its op's call (ir.schema.bind_arguments)."""


@dataclass(frozen=True, slots=True)
class Call:
    """How a node's step makes its results, given memory for some of them.

    how: "reference" (the op allocates its results), "cast" (`copy_` of the input into the given memory),
    "in_place" (the in-place variant, over the first input), "out" (the `out=` overload, results written into
    the given memory under `out_names`), "linear" (`linear_into`), "copy_in" (the op as usual, then each result
    given memory copied into it). `op` is what is called; `build` makes its arguments from the node's inputs.
    """

    how: str
    op: Callable[..., Any]
    build: BuildArguments
    out_names: tuple[str, ...] = ()


def plan_call(node: Node, given: Sequence[bool], over_first: bool = False) -> Call:
    """How the node's call writes result i (in `node.outputs` order) into the memory it is handed where
    `given[i]`, allocating the others. `over_first`: its one result is handed its first input's memory, so it
    runs in place where the op has an in-place variant (some `out=` overloads compute into a temporary and
    copy, which would cost a result-sized allocation)."""
    definition = node.definition
    build = bind_arguments(definition.schema, node.attrs)
    if not any(given):
        return Call("reference", definition.target, build)
    if node.is_cast:
        return Call("cast", torch.Tensor.copy_, build)  # a cast on the same device: copy_ converts
    in_place = inplace_overload(definition.target) if over_first and _first_input_is_self(node) else None
    if in_place is not None:
        return Call("in_place", in_place, build)
    if node.fills_given_memory and len(given) == len(definition.schema.returns) and all(given):
        if definition.target == torch.ops.aten.linear.default:
            return Call("linear", linear_into, build)
        overload, names = out_overload(definition.target)
        return Call("out", overload, build, names)
    return Call("copy_in", definition.target, build)


def _first_input_is_self(node: Node) -> bool:
    """Whether the node's first input is its op's first argument, the one an in-place variant writes: not so
    where that argument is a number (pow.Scalar(10, x), or add.Tensor(2, x) with the 2 kept in attrs)."""
    arguments = node.definition.schema.arguments
    return bool(arguments) and arguments[0].type.isSubtypeOf(torch._C.TensorType.get()) and arguments[0].name not in node.attrs


def bind_into(node: Node, given: Sequence[bool], over_first: bool = False) -> GivenRun:
    """The node's call as `plan_call` decides it: (inputs, memory given per result or None) -> its results."""
    return bind_call(node, plan_call(node, given, over_first))


def bind_call(node: Node, call: Call) -> GivenRun:
    """The node's call made as `call` says: (inputs, memory given per result or None) -> its results."""
    op, build, positions = call.op, call.build, node.result_positions
    reference = node.definition.bind(node.attrs)
    if call.how == "reference":
        return lambda inputs, outs: reference(inputs)
    if call.how == "cast":
        return lambda inputs, outs: (outs[0].copy_(inputs[0]),)
    if call.how == "in_place":
        def overwrite(inputs, outs):
            args, kwargs = build(inputs)
            return (op(*args, **kwargs),)

        return overwrite
    if call.how == "linear":
        return lambda inputs, outs: (linear_into(*linear_arguments(*build(inputs)), outs[0]),)
    if call.how == "out":
        names = call.out_names
        order = [positions.index(position) for position in range(len(positions))]

        def write(inputs, outs):
            args, kwargs = build(inputs)
            op(*args, **kwargs, **dict(zip(names, (outs[index] for index in order))))
            return tuple(outs[index] for index in order)

        return write

    def copy_in(inputs, outs):
        results = list(reference(inputs))
        for position, out in zip(positions, outs):
            if out is not None:
                results[position] = out.copy_(results[position])
        return tuple(results)

    return copy_in


def slot_view(arena: torch.Tensor, offset: int, value_type: TensorType) -> torch.Tensor:
    """The tensor of `value_type` (shape, dtype, strides) that lives at byte `offset` of `arena`."""
    storage = arena[offset: offset + value_type.storage_bytes].view(value_type.dtype)
    return storage.as_strided(value_type.shape, value_type.layout)


def linear_arguments(args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of a linear call's arguments."""
    return args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")


def linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """linear into `out`, as the functional op runs it: a contiguous input flattened to rows for one mm (or one
    addmm, bias in the GEMM's epilogue), the same call and rounding as ATen's linear. Called directly rather
    than through linear.out, which adds the bias in a second kernel and costs the host several dispatches more
    per call (most of a small layer's time when run step by step)."""
    if x.dim() < 2 or not x.is_contiguous() or not out.is_contiguous():
        return torch.ops.aten.linear.out(x, weight, bias, out=out)
    rows, result_rows = x.view(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    if bias is None:
        torch.mm(rows, weight.t(), out=result_rows)
    else:
        torch.addmm(bias, rows, weight.t(), out=result_rows)
    return out
