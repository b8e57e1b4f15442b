"""Convolution layout on the GPU: biases added in the epilogue that fusion makes, activations kept channels-last.

Profiled on an H200 (bench/results/profile_resnet50.txt, ResNet-50, bf16, batch 32), ember's 3.3 ms of kernels
a call against torch.compile's 1.7 ms went to two things around cuDNN, not to the convolutions themselves:
- cuDNN's tensor-core kernels are NHWC: given NCHW activations it transposes each convolution's input in and its
  output back (67 transposes, 0.57 ms);
- a convolution's bias is added by a separate broadcasting kernel after it (53 of them, 1.06 ms), while the
  activation or residual add that follows runs as yet another kernel.
So on CUDA a 2-D convolution's bias becomes an `add` after it, which the fusion pass joins to what follows (the
ReLU, the residual add), and the convolutions' weights are held channels-last (made once, at compile time, as
derived weights), so that cuDNN returns channels-last results; every value computed from them is retyped by
torch's own rule (fake tensors at the new strides), as eager would lay it out, and generated kernels read and
write them in that order. Where a value must keep the strides it was traced with (a graph output, an op whose
rule refuses the new strides), a copy restores them. Channels-last is chosen when the bytes cuDNN would transpose
exceed the bytes of those copies and of the inputs cuDNN converts on entry. A float32 convolution that cuDNN may
run in TF32 keeps its layout, as batch norm folding keeps its weights (cudnn.rounds_to_tf32).
A permute that alone reads a pointwise result on its way to a layer norm (ConvNeXt's, after a bias add or a
residual add) moves before that op, which then computes in the norm's rows and joins its kernel.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..ir import OP_TABLE, Graph, Node, TensorType, Value
from ..ir.ops import infer_by_tracing, op_name
from ..units import format_bytes
from .canonicalize import eliminate_dead_code
from . import cudnn
from .decisions import record
from .fold import fresh_name, mutated_memory

CONVOLUTION = op_name(torch.ops.aten.convolution.default)
ADD = op_name(torch.ops.aten.add.Tensor)
VIEW = op_name(torch.ops.aten.view.default)
CLONE = op_name(torch.ops.aten.clone.default)
PERMUTE = op_name(torch.ops.aten.permute.default)
ROW_KINDS = frozenset({"reduction", "normalization"})


def split_convolution_bias(graph: Graph) -> Graph:
    """The graph with each 2-D CUDA convolution's bias added by an `add` after it, for fusion to join to its
    epilogue (or, once `hoist_permutes` moves ConvNeXt's permute before it, to the layer norm after)."""
    types = graph.types()
    taken = {*types, *(node.name for node in graph.nodes)}
    nodes: list[Node] = []
    for node in graph.nodes:
        if not _splittable(node, types):
            nodes.append(node)
            continue
        result, bias = node.outputs[0], node.inputs[2]
        shape = (result.type.shape[1], *([1] * (len(result.type.shape) - 2)))
        plain = Value(fresh_name(f"{result.name}_unbiased", taken), result.type)
        column = Value(fresh_name(f"{node.name}_bias_column", taken),
                       TensorType(shape, types[bias].dtype, None, types[bias].device))
        nodes += [dataclasses.replace(node, inputs=node.inputs[:2], attrs={**node.attrs, "bias": None}, outputs=(plain,)),
                  Node(column.name, VIEW, (bias,), {"size": shape}, (column,), source=node.source),
                  Node(fresh_name(f"{node.name}_bias", taken), ADD, (plain.name, column.name), {}, (result,),
                       source=node.source)]
    if len(nodes) == len(graph.nodes):
        return graph
    record(f"{(len(nodes) - len(graph.nodes)) // 2} convolution bias(es) added after the convolution, where fusion "
           "joins them to the activation, residual add or layer norm that follows (cuDNN adds a bias in a kernel of "
           "its own)")
    return dataclasses.replace(graph, nodes=tuple(nodes))


def _splittable(node: Node, types: Mapping[str, TensorType]) -> bool:
    """Whether `node` is a 2-D convolution on a layout device with a bias tensor of the result's dtype."""
    if node.op != CONVOLUTION or len(node.inputs) != 3 or "bias" in node.attrs or len(node.outputs) != 1:
        return False
    result = node.outputs[0].type
    bias = types[node.inputs[2]]
    return (result.device in cudnn.LAYOUT_DEVICES and len(result.shape) == 4 and not node.attrs.get("transposed")
            and bias.shape == (result.shape[1],) and bias.dtype == result.dtype)


def convolutions_channels_last(graph: Graph) -> Graph:
    """The graph with its 2-D CUDA convolutions' weights channels-last and every value computed from their
    results retyped at the strides torch gives them, when that moves fewer bytes than cuDNN's transposes."""
    convolutions = [node for node in graph.nodes if _convertible(node, graph)]
    if not convolutions:
        return graph
    if mutated_memory(graph) or graph.written:
        record("convolutions kept in the traced layout: the graph writes memory in place")
        return graph
    with unset_fake_temporarily():
        converted = _converted(graph, {node.name for node in convolutions})
    if isinstance(converted, str):
        record(f"convolutions kept in the traced layout: {converted}")
        return graph
    new_graph, copied, entering = converted
    types = graph.types()
    transposed = sum(types[node.inputs[0]].nbytes + node.outputs[0].type.nbytes for node in convolutions)
    if copied + entering >= transposed:
        record(f"convolutions kept in the traced layout: channels-last would copy {format_bytes(copied + entering)} "
               f"a call, cuDNN's transposes move {format_bytes(transposed)}")
        return graph
    record(f"{len(convolutions)} convolution(s) run channels-last: cuDNN no longer transposes "
           f"{format_bytes(transposed)} of activations a call; {format_bytes(copied)} copied back to traced strides, "
           f"{format_bytes(entering)} converted on entry")
    return eliminate_dead_code(new_graph)


def _convertible(node: Node, graph: Graph) -> bool:
    """Whether `node` is a 2-D convolution on a layout device whose weight is a 4-D floating weight, and not one
    that cuDNN may run in TF32: there the layout changes which algorithms it picks, some TF32 and some not, and
    float32 results moved from eager's by about 1e-4 on an H200 (ResNet-50, U-Net; measured)."""
    if node.op != CONVOLUTION or len(node.outputs) != 1 or node.attrs.get("transposed"):
        return False
    result = node.outputs[0].type
    weight = graph.weights.get(node.inputs[1]) if len(node.inputs) > 1 else None
    return (result.device in cudnn.LAYOUT_DEVICES and len(result.shape) == 4 and weight is not None
            and weight.dim() == 4 and weight.is_floating_point() and not cudnn.rounds_to_tf32(weight.dtype, weight.device))


def _channels_last(value_type: TensorType) -> TensorType:
    """The type at channels-last strides."""
    n, c, h, w = value_type.shape
    return dataclasses.replace(value_type, strides=(h * w * c, 1, w * c, c))


def _converted(graph: Graph, convolutions: set[str]) -> tuple[Graph, int, int] | str:
    """(the rewritten graph, bytes copied back to traced strides, bytes cuDNN converts on entry), or why not."""
    weights, derived, params = dict(graph.weights), dict(graph.derived), list(graph.params)
    original_types = graph.types()
    types = {value.name: value.type for value in (*graph.inputs, *graph.params)}
    changed: set[str] = set()
    restored: dict[str, str] = {}
    held: dict[str, str] = {}
    """weight -> its channels-last copy"""
    taken = {*original_types, *weights}
    nodes: list[Node] = []
    copied = entering = 0

    def traced(name: str) -> str:
        """`name`, or a copy of it at the strides it was traced with."""
        nonlocal copied
        if name not in changed:
            return name
        if name not in restored:
            original = original_types[name]
            if not original.is_contiguous:
                raise _Refused(f"%{name} was traced at strides {original.strides}, not row-major")
            copy = Value(fresh_name(f"{name}_traced_layout", taken), original)
            nodes.append(Node(copy.name, CLONE, (name,), {"memory_format": torch.contiguous_format},
                              (copy,)))
            restored[name] = copy.name
            copied += original.nbytes
        return restored[name]

    try:
        for node in graph.nodes:
            if node.name in convolutions:
                weight = node.inputs[1]
                if weight not in held:
                    name = held[weight] = fresh_name(f"{weight}_channels_last", taken)
                    weights[name] = graph.weights[weight].detach().contiguous(memory_format=torch.channels_last)
                    derived[name] = graph.derived.get(weight, (graph.weights[weight],))
                    params.append(Value(name, _channels_last(types[weight])))
                    types[name] = params[-1].type
                name = held[weight]
                if node.inputs[0] not in changed:
                    entering += types[node.inputs[0]].nbytes
                inputs = (node.inputs[0], name, *node.inputs[2:])
                node = _retyped(dataclasses.replace(node, inputs=inputs), types)
                if node is None:
                    raise _Refused("torch's rule refuses a channels-last convolution weight")
            elif any(name in changed for name in node.inputs):
                retyped = _retyped(node, types) if not node.is_extern else None
                if retyped is None:
                    node = dataclasses.replace(node, inputs=tuple(traced(name) for name in node.inputs))
                else:
                    node = retyped
            nodes.append(node)
            for value in node.outputs:
                types[value.name] = value.type
                if value.type.layout != original_types[value.name].layout:
                    changed.add(value.name)
        outputs = tuple(traced(name) for name in graph.outputs)
    except _Refused as refusal:
        return str(refusal)
    rewritten = dataclasses.replace(graph, nodes=tuple(nodes), outputs=outputs, params=tuple(params), weights=weights,
                                    derived=derived)
    return rewritten, copied, entering


class _Refused(Exception):
    """Why the graph keeps its traced layout."""


def _retyped(node: Node, types: Mapping[str, TensorType]) -> Node | None:
    """`node` with its outputs at the strides torch's rule gives its inputs' types, or None where the rule refuses
    them or disagrees on shape or dtype."""
    try:
        expected = infer_by_tracing(node.definition, [types[name] for name in node.inputs], node.attrs)
    except Exception:  # the rule refusing the new strides (a view that needs row-major) is the answer
        return None
    positions = node.result_positions
    if len(expected) <= max(positions, default=-1):
        return None
    outputs = []
    for position, value in zip(positions, node.outputs):
        found = expected[position]
        if found is None or not found.same_as(value.type):
            return None
        outputs.append(Value(value.name, dataclasses.replace(value.type, strides=found.layout)))
    return dataclasses.replace(node, outputs=tuple(outputs))


def hoist_permutes(graph: Graph) -> Graph:
    """The graph with each permute that alone reads a pointwise result, and leads (through pointwise ops) to a
    reduction or normalization, moved before that result: the op reads its inputs permuted (views) and makes the
    permuted result itself. Its kernel walks the same memory in the same order, but in the permute's coordinates,
    which the row kernel after it shares: ConvNeXt's downsampling layer norm (permute, layer norm over channels,
    permute back) then joins the layer scale and residual add before it. On the layout devices only: elsewhere no
    row kernel is generated to take them."""
    hoisted = 0
    while True:
        rewritten = _hoist_one(graph)
        if rewritten is None:
            break
        graph, hoisted = rewritten, hoisted + 1
    if hoisted:
        record(f"{hoisted} permute(s) moved before the pointwise op whose result they alone read, so that the op "
               "computes in the permuted coordinates of the row kernel after it")
    return graph


def _hoist_one(graph: Graph) -> Graph | None:
    """The graph with one permute hoisted (the last that can be), or None."""
    types = graph.types()
    readers = graph.readers()
    made_by = {value.name: node for node in graph.nodes for value in node.outputs}
    for permute in reversed(graph.nodes):
        if permute.op != PERMUTE or len(permute.inputs) != 1 or permute.outputs[0].type.device not in cudnn.LAYOUT_DEVICES:
            continue
        node = made_by.get(permute.inputs[0])
        if (node is None or node.is_extern or node.definition.kind != "pointwise" or len(node.outputs) != 1
                or [reader.name for reader in readers[node.outputs[0].name]] != [permute.name]
                or node.outputs[0].name in graph.outputs or not _feeds_rows(permute, readers, graph.outputs)):
            continue
        rewritten = _hoisted(node, permute, types, graph, made_by, readers)
        if rewritten is not None:
            return rewritten
    return None


def _feeds_rows(node: Node, readers: Mapping[str, list[Node]], outputs: tuple[str, ...]) -> bool:
    """Whether every reader of the node's result is a reduction or normalization, or a pointwise op whose own
    readers all are (so that hoisting a permute there lets a row kernel take the ops before it)."""
    reading = readers.get(node.outputs[0].name, [])
    if not reading or node.outputs[0].name in outputs:
        return False
    return all(reader.definition.kind in ROW_KINDS or (reader.definition.kind == "pointwise" and len(reader.outputs) == 1
                                                       and _feeds_rows(reader, readers, outputs))
               for reader in reading)


def _hoisted(node: Node, permute: Node, types: Mapping[str, TensorType], graph: Graph, made_by: Mapping[str, Node],
             readers: Mapping[str, list[Node]]) -> Graph | None:
    """The graph with `permute` moved before `node`, or None where a rank or torch's layout rule disagrees. An
    operand that is itself a permute read only by `node` is permuted once, by the two composed (none if they undo
    each other), so that a chain of hoists goes on through it."""
    rank = len(node.outputs[0].type.shape)
    dims = [dim % rank for dim in permute.attrs["dims"]]
    taken = {*types, *(n.name for n in graph.nodes)}
    before: list[Node] = []
    dropped: set[str] = set()
    operands = []
    for name in node.inputs:
        value_type = types[name]
        if len(value_type.shape) > rank:
            return None
        source, order = name, dims
        inner = made_by.get(name)
        if (inner is not None and inner.op == PERMUTE and len(value_type.shape) == rank
                and _read_only_by(name, node, readers, graph.outputs)):
            first = [dim % rank for dim in inner.attrs["dims"]]
            source, order, value_type = inner.inputs[0], [first[dim] for dim in dims], types[inner.inputs[0]]
            dropped.add(inner.name)
            if order == list(range(rank)):
                operands.append(Value(source, value_type))
                continue
        if len(value_type.shape) < rank:  # broadcast from the right: leading size-1 dims made explicit
            full = (1,) * (rank - len(value_type.shape)) + value_type.shape
            if inner is not None and inner.op == VIEW and _read_only_by(name, node, readers, graph.outputs):
                source, value_type = inner.inputs[0], types[inner.inputs[0]]  # one view, not a view of a view
                dropped.add(inner.name)
            widened_type = _traced(VIEW, (value_type,), {"size": full})
            if widened_type is None:
                return None
            widened = Value(fresh_name(f"{name}_{permute.name}_full", taken), widened_type)
            before.append(Node(widened.name, VIEW, (source,), {"size": full}, (widened,), source=permute.source))
            source = widened.name
            value_type = widened.type
        moved_type = _traced(PERMUTE, (value_type,), {"dims": order})
        if moved_type is None:
            return None
        moved = Value(fresh_name(f"{name}_{permute.name}", taken), moved_type)
        before.append(Node(moved.name, PERMUTE, (source,), {"dims": order}, (moved,), source=permute.source))
        operands.append(moved)
    result = permute.outputs[0]
    made = _traced(node.op, tuple(value.type for value in operands), node.attrs)
    if made is None or not made.same_as(result.type) or made.layout != result.type.layout:
        return None
    moved_node = dataclasses.replace(node, inputs=tuple(value.name for value in operands), outputs=(result,))
    nodes = []
    for n in graph.nodes:
        if n is node:
            nodes += [*before, moved_node]
        elif n is not permute and n.name not in dropped:
            nodes.append(n)
    return dataclasses.replace(graph, nodes=tuple(nodes))


def _read_only_by(name: str, node: Node, readers: Mapping[str, list[Node]], outputs: tuple[str, ...]) -> bool:
    """Whether `node` is the one reader of `name`, which the graph does not return."""
    return [reader.name for reader in readers.get(name, [])] == [node.name] and name not in outputs


def _traced(op: str, inputs: tuple[TensorType, ...], attrs: Mapping[str, object]) -> TensorType | None:
    """The type torch's rule gives the op's one result, or None where the rule refuses these inputs."""
    try:
        (made,) = infer_by_tracing(OP_TABLE[op], list(inputs), attrs)
    except Exception:  # a view that needs other strides, operands torch will not take: the refusal is the answer
        return None
    return made
