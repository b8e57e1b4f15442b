"""Running steps in given memory: a step's results written into arena views or over a dying input.

A step whose op has an ATen `out=` overload writes straight into the memory it is given (a cast is a
`copy_` into it); any other step (a view an extern op returns) computes as usual and is copied in, since
the memory it views is reused. Results given no memory are allocated by the op, as in eager mode.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..ir import Node, TensorType
from ..ir.schema import bind_arguments, inplace_overload, out_overload

GivenRun = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor | None]], tuple[torch.Tensor, ...]]
"""A bound step: (its inputs, memory given per result or None) -> its results."""


def slot_view(arena: torch.Tensor, offset: int, value_type: TensorType) -> torch.Tensor:
    """The tensor of `value_type` (shape, dtype, strides) that lives at byte `offset` of `arena`."""
    storage = arena[offset: offset + value_type.storage_bytes].view(value_type.dtype)
    return storage.as_strided(value_type.shape, value_type.layout)


def bind_into(node: Node, given: Sequence[bool], over_first: bool = False) -> GivenRun:
    """The node's call, writing result i (in `node.outputs` order) into the memory it is handed where
    `given[i]`, and allocating the others. `over_first`: its one result is handed its first input's memory,
    so it runs in place where the op has an in-place variant (some `out=` overloads compute into a temporary
    and copy, which would cost a result-sized allocation)."""
    definition = node.definition
    reference = definition.bind(node.attrs)
    positions = node.result_positions
    if not any(given):
        return lambda inputs, outs: reference(inputs)
    complete = len(given) == len(definition.schema.returns) and all(given)
    if node.is_cast:
        return lambda inputs, outs: (outs[0].copy_(inputs[0]),)  # a cast on the same device: copy_ converts
    in_place = inplace_overload(definition.target) if over_first else None
    if in_place is not None:
        build = bind_arguments(definition.schema, node.attrs)

        def overwrite(inputs, outs):
            args, kwargs = build(inputs)
            return (in_place(*args, **kwargs),)

        return overwrite
    if node.fills_given_memory and complete:
        overload, names = out_overload(definition.target)
        build = bind_arguments(definition.schema, node.attrs)
        order = [positions.index(position) for position in range(len(positions))]
        if definition.target == torch.ops.aten.linear.default:
            return lambda inputs, outs: (_linear_into(*build(inputs), outs[0]),)

        def write(inputs, outs):
            args, kwargs = build(inputs)
            overload(*args, **kwargs, **dict(zip(names, (outs[index] for index in order))))
            return tuple(outs[index] for index in order)

        return write

    def copy_in(inputs, outs):
        results = list(reference(inputs))
        for position, out in zip(positions, outs):
            if out is not None:
                results[position] = out.copy_(results[position])
        return tuple(results)

    return copy_in


def _linear_into(args: list, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """linear into `out`. ATen's linear.out on a batched input runs a matmul and then adds the bias in a second
    kernel; its functional form flattens a contiguous 3-D input to rows for one addmm, bias in the GEMM's
    epilogue, and so does this (the same rounding as the call it replaces)."""
    x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")
    if bias is None or x.dim() != 3 or not x.is_contiguous() or not out.is_contiguous():
        return torch.ops.aten.linear.out(x, weight, bias, out=out)
    torch.addmm(bias, x.view(-1, x.shape[-1]), weight.t(), out=out.view(-1, out.shape[-1]))
    return out
