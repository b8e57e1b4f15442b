"""Layout choices: half-precision linear layers with an odd number of output features get padded ones.

cuBLAS picks a slow kernel for a GEMM whose N is not a multiple of 8 (GPT-2's 50,257-word vocabulary):
on an H200 the LM head takes 3.36 ms at N = 50,257 and 0.45 ms at N = 50,264, with the same inputs.
Padding the output's row stride alone does not help (measured: 3.35 ms), so the weight (and bias) get
zero rows up to the next multiple of 8, once, at compile time: a padded copy kept with the Program's
weights (the original stays, for its other readers such as a tied embedding). The layer computes all
N_pad columns and the result is the view of its first N, which later ops read at those strides. A
returned result is that view (a CUDA-graph replay clones it dense).
"""
from __future__ import annotations

import dataclasses

import torch

from ..ir import Graph, Node, TensorType, Value
from ..ir.ops import op_name
from ..ir.types import contiguous_strides
from .decisions import record

FEATURE_MULTIPLE = 8


def pad_linear_features(graph: Graph) -> Graph:
    """The graph with each misaligned half-precision CUDA `linear` computing padded features, then sliced."""
    nodes: list[Node] = []
    params = list(graph.params)
    weights = dict(graph.weights)
    derived = dict(graph.derived)
    types = graph.types()
    for node in graph.nodes:
        padded = _padded_features(node, types, weights)
        if padded is None:
            nodes.append(node)
            continue
        record(f"a linear's {node.outputs[0].type.shape[-1]} output features padded to {padded} "
               f"({node.outputs[0].type.dtype}): cuBLAS is slow when they are not a multiple of {FEATURE_MULTIPLE}")
        operands = []
        for position, name in enumerate(node.inputs):
            if position == 0:
                operands.append(name)
                continue
            tensor = weights[name]
            wide = torch.zeros((padded, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            wide[: tensor.shape[0]] = tensor.detach()
            wide_name = f"{name}_padded{padded}"
            if wide_name not in weights:
                weights[wide_name] = wide
                derived[wide_name] = derived.get(name, (tensor,))
                params.append(Value(wide_name, dataclasses.replace(types[name], shape=tuple(wide.shape),
                                                                   strides=contiguous_strides(tuple(wide.shape)))))
            operands.append(wide_name)
        value = node.outputs[0]
        wide_shape = (*value.type.shape[:-1], padded)
        wide_value = Value(f"{value.name}_padded", TensorType(wide_shape, value.type.dtype, contiguous_strides(wide_shape),
                                                              value.type.device))
        nodes.append(dataclasses.replace(node, inputs=tuple(operands), outputs=(wide_value,)))
        sliced = dataclasses.replace(value.type, strides=contiguous_strides(wide_shape))
        nodes.append(Node(f"{node.name}_features", op_name(torch.ops.aten.slice.Tensor), (wide_value.name,),
                          {"dim": len(wide_shape) - 1, "end": value.type.shape[-1]}, (Value(value.name, sliced),),
                          source=node.source))
    if len(nodes) == len(graph.nodes):
        return graph
    return dataclasses.replace(graph, params=tuple(params), nodes=tuple(nodes), weights=weights, derived=derived)


def _padded_features(node: Node, types: dict[str, TensorType], weights: dict[str, torch.Tensor]) -> int | None:
    """The padded feature count for this node, or None when it needs none or cannot have one."""
    if not node.definition.linear or len(node.outputs) != 1 or any(name not in weights for name in node.inputs[1:]):
        return None
    value_type = node.outputs[0].type
    features = value_type.shape[-1]
    if value_type.device != "cuda" or value_type.dtype.itemsize > 2 or features % FEATURE_MULTIPLE == 0:
        return None
    if any(value is not None for value in node.attrs.values()):  # a bias given as a number: leave it
        return None
    return -(-features // FEATURE_MULTIPLE) * FEATURE_MULTIPLE
