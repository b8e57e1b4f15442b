"""Running a graph from its arena: one allocation per device, every resident intermediate a view of it.

A step whose op has an ATen `out=` overload writes straight into its planned views (a cast is a
`copy_` into its view); any other step (factories, attention, normalizations, ember's own ops)
computes as usual and is copied in, so the plan still holds but the result is briefly allocated twice.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..ir import Node, TensorType
from ..ir.ops import Reference
from ..ir.schema import bind_arguments, out_overload


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
    complete = len(targets) == len(definition.schema.returns) and all(view is not None for _, view in targets)
    if node.is_cast:
        (_, view), = targets
        return lambda inputs: (view.copy_(inputs[0]),)  # a cast on the same device: copy_ converts
    if node.fills_given_memory and complete:
        overload, names = out_overload(definition.target)
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
