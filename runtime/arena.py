"""Running a graph from its arena: one allocation per device, every resident intermediate a view of it.

A step whose op has an ATen `out=` overload writes straight into its planned views (a cast is a
`copy_` into its view); any other step (factories, attention, normalizations, ember's own ops)
computes as usual and is copied in, so the plan still holds but the result is briefly allocated twice.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from ..ir import Node, TensorType
from ..ir.ops import Reference
from ..ir.schema import bind_arguments


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


def slot_view(arena: torch.Tensor, offset: int, value_type: TensorType) -> torch.Tensor:
    """The tensor of `value_type` (shape, dtype, strides) that lives at byte `offset` of `arena`."""
    storage = arena[offset: offset + value_type.storage_bytes].view(value_type.dtype)
    return storage.as_strided(value_type.shape, value_type.layout)


def bind_into(node: Node, views: Mapping[str, torch.Tensor]) -> Reference:
    """The node's call, writing its resident outputs into `views` (by value name)."""
    definition = node.definition
    reference = definition.bind(node.attrs)
    targets = [(position, views.get(value.name)) for value, position in zip(node.outputs, node.result_positions)]
    if all(view is None for _, view in targets):
        return reference
    if node.op == "_to_copy" and set(node.attrs) <= {"dtype", "memory_format", "non_blocking"}:
        (_, view), = targets
        return lambda inputs: (view.copy_(inputs[0]),)  # a cast on the same device: copy_ converts
    found = out_overload(definition.target)
    complete = len(targets) == len(definition.schema.returns) and all(view is not None for _, view in targets)
    if found is not None and complete and definition.typed_outputs is None:
        overload, names = found
        build = bind_arguments(definition.schema, node.attrs)
        outs = {name: view for name, (_, view) in zip(names, targets)}
        results = tuple(view for _, view in targets)

        def write(inputs):
            args, kwargs = build(inputs)
            overload(*args, **kwargs, **outs)
            return results

        return write

    def copy_in(inputs):
        results = list(reference(inputs))
        for position, view in targets:
            if view is not None:
                results[position] = view.copy_(results[position])
        return tuple(results)

    return copy_in
