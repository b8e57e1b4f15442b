"""Attention masks computed from no input are worked out first; attention that torch would still run on its
math path becomes two batched matmuls around one softmax kernel.

transformers builds a mask from aranges when a model is called without one: all-keeping (BERT) or causal
(the decoders). Worked out at compile time, it is dropped or becomes `is_causal`, so torch's fused kernels
take the attention, and the dozen small kernels that built the mask on every call go.

When no fused attention kernel takes a call (float32 inputs; a mask broadcast along the keys, as BERT's
padding mask is), torch's scaled_dot_product_attention runs a math path of a dozen small kernels and
float32 copies: on an H200, BERT's attention was most of ember's kernel time (bench/results/profile_bert.txt).
Written out, the scores' scale, the mask and a softmax that gives 0 on a fully masked row are one row
kernel of the fusion pass, between two cuBLAS batched matmuls, as Inductor's lowering does.
A boolean mask of the fused attention that remains is made additive once for all the layers reading it, and
keys and values repeated for grouped-query heads are read unrepeated where torch's fused kernels take them so
(grouped heads as they are, or, for one query per head, the queries folded into the key heads' rows).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..ir import OP_TABLE, Graph, Node, TensorType, Value
from ..ir.ops import infer_by_tracing, op_name
from ..ir.types import contiguous_strides
from .canonicalize import eliminate_dead_code
from .decisions import record
from .fold import may_fold, mutated_memory

aten = torch.ops.aten

Select = Callable[[Node, Mapping[str, TensorType]], bool]


def runs_math_path(node: Node, types: Mapping[str, TensorType]) -> bool:
    """Whether torch, on this machine's GPU, would run this attention on its math path (asked of torch itself,
    on tensors of the node's input types)."""
    if types[node.inputs[0]].device != "cuda" or not torch.cuda.is_available():
        return False
    with unset_fake_temporarily():  # torch.compile's backend runs under fake tensors; torch asks real ones
        tensors = [torch.empty_strided(types[name].shape, types[name].layout, dtype=types[name].dtype, device="cuda")
                   for name in node.inputs]
        choice = torch._fused_sdp_choice(*tensors[:3], tensors[3] if len(tensors) > 3 else None,
                                         node.attrs.get("dropout_p", 0.0), node.attrs.get("is_causal", False),
                                         scale=node.attrs.get("scale"), enable_gqa=node.attrs.get("enable_gqa", False))
    return choice == int(torch.nn.attention.SDPBackend.MATH)


FOLDED_MASK_ELEMENTS = 1 << 24
"""The most elements of any value worked out to fold a constant attention mask; a larger mask is left as is."""


def fold_constant_masks(graph: Graph) -> Graph:
    """Each attention mask computed from nothing a call is given (transformers builds one from aranges when no
    attention mask is passed), worked out now: one that keeps every key is dropped, one that is exactly the
    causal triangle becomes `is_causal`. torch's fused kernels then take attention that such a mask sent down
    its math path (BERT) or made read a mask in every layer (Llama); the nodes that built it go."""
    producers = {value.name: node for node in graph.nodes for value in node.outputs}
    mutated = mutated_memory(graph)
    known: dict[str, torch.Tensor | None] = {}
    types = graph.types()
    nodes = []
    for node in graph.nodes:
        if node.definition.kind != "attention" or len(node.inputs) < 4 or node.attrs.get("is_causal", False):
            nodes.append(node)
            continue
        with unset_fake_temporarily():  # the backend runs under fake tensors, inspect on meta ones: these are real
            kept = _kept(_constant(node.inputs[3], producers, mutated, known))
            keeps_all = kept is not None and bool(kept.all())
            causal = kept is not None and not keeps_all and _is_causal(
                kept, types[node.inputs[0]].shape[-2], types[node.inputs[1]].shape[-2])
        if keeps_all or causal:
            record(f"a mask computed from no input ({types[node.inputs[3]].shape}) "
                   + ("keeps every key: dropped" if keeps_all else "is the causal triangle: is_causal instead"))
        nodes += _unmasked(node, types, causal) if keeps_all or causal else [node]
    if all(a is b for a, b in zip(nodes, graph.nodes)):
        return graph
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(nodes)))


def _constant(name: str, producers: Mapping[str, Node], mutated: set[str], known: dict[str, torch.Tensor | None]
              ) -> torch.Tensor | None:
    """The value `name` worked out on the CPU by the op table's references, when it depends on no input,
    parameter or random op, no op mutates it, and no value on the way is larger than FOLDED_MASK_ELEMENTS;
    else None."""
    if name in known:
        return known[name]
    node = producers.get(name)
    known[name] = None  # until worked out: an input, a parameter or a value that cannot be
    if node is None or not may_fold(node) or name in mutated \
            or any(v.type.numel > FOLDED_MASK_ELEMENTS for v in node.outputs):
        return None
    inputs = [_constant(value, producers, mutated, known) for value in node.inputs]
    if any(value is None for value in inputs):
        return None
    attrs = {**node.attrs, "device": torch.device("cpu")} if "device" in node.attrs else node.attrs
    results = node.definition.bind(attrs)(inputs)
    for value, position in zip(node.outputs, node.result_positions):
        known[value.name] = results[position]
    return known[name]


def _kept(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Where a worked-out mask keeps a key: a boolean one as is, an additive one where it is 0 (None when it
    is not worked out, or adds anything but 0 and -inf, which no mask-free call computes)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == float("-inf"))).all()):
        return None
    return mask == 0


def _is_causal(kept: torch.Tensor, rows: int, columns: int) -> bool:
    """Whether `kept` is torch's causal masking of `rows` queries against `columns` keys in every batch and head."""
    return kept.shape[-2:] == (rows, columns) and bool((kept == torch.ones(rows, columns, dtype=torch.bool).tril()).all())


def decompose_attention(graph: Graph, select: Select = runs_math_path) -> Graph:
    """The graph with each attention node that `select` picks (by default, those torch would run on its math
    path) written as matmul, scale, mask, safe softmax, matmul; the result keeps the node's type."""
    types = graph.types()
    nodes: list[Node] = []
    weights, params = dict(graph.weights), list(graph.params)
    for node in graph.nodes:
        if node.definition.kind != "attention" or not _decomposable(node, types) or not select(node, types):
            nodes.append(node)
            continue
        causal = _causal_mask(node, types) if node.attrs.get("is_causal", False) else None
        write = _Writer(node, {**types, **({causal.name: causal.type} if causal else {})})
        _write(node, write, causal.name if causal else node.inputs[3] if len(node.inputs) > 3 else None)
        written, result = write.types[node.outputs[0].name], node.outputs[0].type
        if not (written.same_as(result) and written.layout == result.layout):  # a layout no permutation gives
            nodes.append(node)
            continue
        record(f"attention of {types[node.inputs[0]].shape} queries over {types[node.inputs[1]].shape[-2]} keys "
               "written out as matmuls and a softmax (torch would run its math path)")
        if causal is not None and causal.name not in weights:
            weights[causal.name] = torch.ones(causal.type.shape, dtype=torch.bool, device=causal.type.device).tril()
            params.append(causal)
        nodes += write.nodes
    if len(nodes) == len(graph.nodes) and all(a is b for a, b in zip(nodes, graph.nodes)):
        return graph
    return dataclasses.replace(graph, params=tuple(params), nodes=tuple(nodes), weights=weights)


def _decomposable(node: Node, types: Mapping[str, TensorType]) -> bool:
    """No dropout, no grouped-query heads, one batch shape for q, k and v, a mask or causality but not both."""
    query, key, value = (types[name] for name in node.inputs[:3])
    if node.attrs.get("dropout_p", 0.0) or node.attrs.get("enable_gqa", False) or len(query.shape) < 3:
        return False
    if not query.shape[:-2] == key.shape[:-2] == value.shape[:-2] or len(node.outputs) != 1:
        return False
    if len(node.inputs) > 3:
        mask = types[node.inputs[3]]
        if node.attrs.get("is_causal", False) or mask.dtype not in (torch.bool, query.dtype):
            return False
    return True


class _Writer:
    """Appends the nodes that replace one attention node, naming each after it and inferring its type."""

    def __init__(self, node: Node, types: Mapping[str, TensorType]) -> None:
        self.node, self.types, self.nodes = node, dict(types), []

    def __call__(self, overload: torch._ops.OpOverload, inputs: tuple[str, ...], attrs: Mapping[str, Any],
                 name: str | None = None, traced: bool = False) -> str:
        """The result of a node of the op table's entry for `overload`; `traced`: typed by running torch's own kernel
        choice on fake tensors, for the strides its result really has (a fused attention lays its result out as its
        kernel chooses)."""
        op = op_name(overload)
        definition = OP_TABLE[op]
        infer = infer_by_tracing if traced else definition.infer
        (result,) = infer(definition, [self.types[n] for n in inputs], attrs)
        name = name or f"{self.node.name}_math{len(self.nodes)}"
        self.types[name] = result
        self.nodes.append(Node(name, op, inputs, attrs, (Value(name, result),), source=self.node.source))
        return name

    def batched(self, name: str) -> str:
        """A float32 [batch, rows, columns] view of a value, after a contiguous copy when its dtype or strides
        allow no view."""
        value = self.types[name]
        shape = (math.prod(value.shape[:-2]), *value.shape[-2:])
        if value.dtype != torch.float32:
            name = self(aten._to_copy.default, (name,), {"dtype": torch.float32, "memory_format": torch.contiguous_format})
        elif not _viewable(value, shape):
            name = self(aten.clone.default, (name,), {"memory_format": torch.contiguous_format})
        return self(aten.view.default, (name,), {"size": shape})


def _viewable(value: TensorType, shape: tuple[int, ...]) -> bool:
    with unset_fake_temporarily():  # a fake tensor refuses a view with ValueError, a meta one with RuntimeError
        try:
            torch.empty_strided(value.shape, value.layout, device="meta").view(shape)
        except RuntimeError:
            return False
    return True


def _causal_mask(node: Node, types: Mapping[str, TensorType]) -> Value:
    """The [L, S] boolean parameter a causal attention reads: true on and below the diagonal (torch's causal
    masking, aligned top-left)."""
    rows, columns = types[node.inputs[0]].shape[-2], types[node.inputs[1]].shape[-2]
    return Value(f"causal_mask_{rows}x{columns}", TensorType((rows, columns), torch.bool,
                                                              contiguous_strides((rows, columns)), types[node.inputs[0]].device))


def _write(node: Node, write: _Writer, mask: str | None) -> None:
    """Scores, scale, mask, softmax and output in float32, as torch's math path computes them for every dtype
    (it upcasts half inputs), rounded once to the result's dtype."""
    query, key, value = node.inputs[:3]
    types = write.types
    batch, (rows, features) = types[query].shape[:-2], types[query].shape[-2:]
    columns = types[key].shape[-2]
    scale = node.attrs.get("scale") or 1.0 / math.sqrt(features)
    keys = write(aten.transpose.int, (write.batched(key),), {"dim0": 1, "dim1": 2})
    scores = write(aten.view.default, (write(aten.bmm.default, (write.batched(query), keys), {}),), {"size": (*batch, rows, columns)})
    scores = write(aten.mul.Tensor, (scores,), {"other": scale})
    if mask is not None and types[mask].dtype == torch.bool:
        scores = write(aten.where.ScalarOther, (mask, scores), {"other": float("-inf")})
    elif mask is not None:
        scores = write(aten.add.Tensor, (scores, mask), {})  # promotes to float32
    weights = (write(aten._safe_softmax.default, (scores,), {"dim": -1}) if mask is not None
               else write(aten._softmax.default, (scores,), {"dim": -1, "half_to_float": False}))
    out = write(aten.bmm.default, (write.batched(weights), write.batched(value)), {})
    result = node.outputs[0]
    if result.type.layout == contiguous_strides(result.type.shape) and result.type.dtype == torch.float32:
        write(aten.view.default, (out,), {"size": result.type.shape}, name=result.name)
    else:
        _copy_as(write, write(aten.view.default, (out,), {"size": result.type.shape}), result)


def _copy_as(write: _Writer, name: str, result: Value) -> None:
    """A copy of `name` in `result`'s dtype and memory order (a dense one), named as `result`."""
    rounded = {"dtype": result.type.dtype, "memory_format": torch.contiguous_format}
    order = sorted(range(len(result.type.shape)), key=lambda dim: -result.type.layout[dim])  # memory order
    if order == sorted(order):
        write(aten._to_copy.default, (name,), rounded, name=result.name)
        return
    dense = write(aten._to_copy.default, (write(aten.permute.default, (name,), {"dims": order}),), rounded)
    write(aten.permute.default, (dense,), {"dims": [order.index(dim) for dim in range(len(order))]}, name=result.name)


def _unmasked(node: Node, types: Mapping[str, TensorType], causal: bool) -> list[Node]:
    """`node` without its mask (causal if so): its result has the layout the kernel torch now picks gives, so
    where that is not the layout the masked call gave (which later nodes were typed on), a copy into it follows."""
    unmasked = dataclasses.replace(node, inputs=node.inputs[:3], attrs={**node.attrs, "attn_mask": None, "is_causal": causal})
    (traced, *_) = infer_by_tracing(node.definition, [types[name] for name in unmasked.inputs], unmasked.attrs)
    result = node.outputs[0]
    if traced.layout == result.type.layout:
        return [unmasked]
    made = Value(f"{result.name}_unmasked", traced)
    write = _Writer(node, {**types, made.name: traced})
    _copy_as(write, made.name, result)
    if write.types[result.name].layout != result.type.layout:  # not a dense layout: keep the mask
        return [node]
    return [dataclasses.replace(unmasked, name=made.name, outputs=(made,)), *write.nodes]


def convert_attention_masks(graph: Graph) -> Graph:
    """A boolean mask of fused attention on the GPU, made additive (0 where kept, -inf where not, in the query's
    dtype) once for every attention reading it: torch converts it so inside each call (three kernels a layer
    on Llama) before its fused kernels, which take the additive mask alike. Math-path attention is written
    out before this pass and reads its boolean mask as is."""
    types = graph.types()
    converted: dict[tuple[str, torch.dtype], str] = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        if not _converts_its_mask(node, types):
            nodes.append(node)
            continue
        mask, dtype = node.inputs[3], types[node.inputs[0]].dtype
        if (mask, dtype) not in converted:
            write = _Writer(node, types)
            name = f"{mask}_additive_{str(dtype).removeprefix('torch.')}"
            additive = write(aten.where.Scalar, (mask,), {"self": 0.0, "other": float("-inf")},
                             name=name if dtype == torch.float32 else f"{name}_float32")
            if dtype != torch.float32:
                additive = write(aten._to_copy.default, (additive,), {"dtype": dtype}, name=name)
            converted[(mask, dtype)] = additive
            record(f"a boolean mask {types[mask].shape} made additive in {dtype} once, not by torch in every "
                   "attention reading it")
            nodes += write.nodes
            types.update(write.types)
        nodes.append(dataclasses.replace(node, inputs=(*node.inputs[:3], converted[(mask, dtype)], *node.inputs[4:])))
    if not converted:
        return graph
    return dataclasses.replace(graph, nodes=tuple(nodes))


def _converts_its_mask(node: Node, types: Mapping[str, TensorType]) -> bool:
    """Attention on the GPU with a boolean mask, which torch turns additive on every call."""
    return (node.definition.kind == "attention" and len(node.inputs) > 3 and types[node.inputs[3]].dtype == torch.bool
            and types[node.inputs[0]].device == "cuda" and types[node.inputs[0]].dtype.is_floating_point)


def takes_grouped_heads(node: Node, types: Mapping[str, TensorType]) -> bool:
    """Whether torch, on this machine's GPU, runs this attention (grouped-query heads asked for, or queries folded
    into the key heads' rows) on a fused kernel rather than its math path."""
    return types[node.inputs[0]].device == "cuda" and torch.cuda.is_available() and not runs_math_path(node, types)


def group_query_heads(graph: Graph, select: Select = takes_grouped_heads) -> Graph:
    """Attention reading keys and values repeated for grouped-query heads (transformers' repeat_kv: unsqueeze,
    expand, a contiguous copy, a view) reads them as they are, with `enable_gqa`, where `select` accepts it
    (by default, where torch runs that on a fused kernel): two copies of the keys and values a layer saved."""
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    types = graph.types()
    replaced: dict[str, Node] = {}
    for node in graph.nodes:
        if node.definition.kind != "attention" or node.attrs.get("enable_gqa", False):
            continue
        key, value = (_repeated_heads(name, producer, types) for name in node.inputs[1:3])
        if key is None or value is None:
            continue
        grouped = dataclasses.replace(node, inputs=(node.inputs[0], key, value, *node.inputs[3:]),
                                      attrs={**node.attrs, "enable_gqa": True})
        if select(grouped, types):
            record(f"attention reads its {types[key].shape} keys and values unrepeated (enable_gqa; torch runs it "
                   "on a fused kernel): the repeat's two copies go")
            replaced[node.name] = grouped
    if not replaced:
        return graph
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(replaced.get(n.name, n) for n in graph.nodes)))


def fold_query_groups(graph: Graph, select: Select = takes_grouped_heads) -> Graph:
    """Attention of one query per head (a decode step) over keys and values repeated for grouped-query heads,
    with a mask the same for every head and query where there is one, where torch would not take the grouped
    heads as they are: each group's queries become rows of its key head ([batch, key heads, group, features])
    against the unrepeated keys and values, the mask broadcasting over those rows as it did over the heads.
    The two copies of a layer's whole cache that repeating makes go, and each cached key is read once per group
    rather than once per query head; the result is laid out in the memory the node's was. Where `select`
    accepts the folded attention (by default, where torch runs it on a fused kernel)."""
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    types = graph.types()
    replaced: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.definition.kind != "attention" or len(node.outputs) != 1:
            continue
        folded = _folded(node, producer, types)
        if folded is not None and select(folded[0], {**types, **{n.outputs[0].name: n.outputs[0].type
                                                                   for n in folded[1]}}):
            record(f"one query per head over {types[node.inputs[1]].shape} repeated keys: the query groups folded "
                   f"into rows of {folded[0].outputs[0].type.shape} against the unrepeated keys and values")
            replaced[node.name] = [*folded[1], folded[0], *folded[2]]
    if not replaced:
        return graph
    nodes = [new for node in graph.nodes for new in replaced.get(node.name, [node])]
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(nodes)))


def _folded(node: Node, producer: Mapping[str, Node], types: Mapping[str, TensorType]
            ) -> tuple[Node, list[Node], list[Node]] | None:
    """(the folded attention, the nodes before it, the nodes after it) replacing `node`, or None where it does
    not qualify or its result's memory cannot be given by views of the folded one."""
    attrs = node.attrs
    if attrs.get("enable_gqa", False) or attrs.get("dropout_p", 0.0) or attrs.get("is_causal", False):
        return None
    query = types[node.inputs[0]]
    key, value = (_repeated_heads(name, producer, types) for name in node.inputs[1:3])
    if key is None or value is None or len(query.shape) != 4 or query.shape[2] != 1:
        return None
    batch, heads, _, features = query.shape
    key_heads = types[key].shape[1]
    if types[value].shape[1] != key_heads or heads % key_heads or types[key].shape[0] != batch:
        return None
    if len(node.inputs) > 3:
        mask = types[node.inputs[3]].shape
        if (len(mask) >= 2 and mask[-2] != 1) or (len(mask) >= 3 and mask[-3] != 1):
            return None  # differs by query row or by head
    folded_shape = (batch, key_heads, heads // key_heads, features)
    if not _viewable(query, folded_shape):
        return None
    write = _Writer(node, types)
    queries = write(aten.view.default, (node.inputs[0],), {"size": folded_shape})
    try:
        attention = write(aten.scaled_dot_product_attention.default, (queries, key, value, *node.inputs[3:]), attrs, traced=True)
    except (RuntimeError, NotImplementedError, ValueError):  # torch declining the folded call: not folded
        return None
    before, folded_node = write.nodes[:-1], write.nodes[-1]
    result = node.outputs[0]
    order = sorted(range(4), key=lambda dim: -result.type.layout[dim])  # the result's memory order
    in_order = tuple(result.type.shape[dim] for dim in order)
    if not _viewable(write.types[attention], in_order):  # flash lays the rows of a group outermost: one small copy
        attention = write(aten.clone.default, (attention,), {"memory_format": torch.contiguous_format})
    if order == sorted(order):
        write(aten.view.default, (attention,), {"size": in_order}, name=result.name)
    else:
        write(aten.permute.default, (write(aten.view.default, (attention,), {"size": in_order}),),
              {"dims": [order.index(dim) for dim in range(4)]}, name=result.name)
    if write.types[result.name].layout != result.type.layout or write.types[result.name].shape != result.type.shape:
        return None
    return folded_node, before, write.nodes[len(before) + 1:]


def _repeated_heads(name: str, producer: Mapping[str, Node], types: Mapping[str, TensorType]) -> str | None:
    """The [batch, heads, length, features] value that `name` repeats along its heads, if it is repeat_kv's
    view of a contiguous copy of the value expanded along a new dim after the heads."""
    chain = []
    for ops in ((aten._unsafe_view.default, aten.view.default, aten.reshape.default), (aten.clone.default,),
                (aten.expand.default,), (aten.unsqueeze.default,)):
        node = producer.get(name)
        if node is None or node.definition.target not in ops:
            return None
        chain.append(node)
        name = node.inputs[0]
    source, repeated = types[name].shape, types[chain[0].outputs[0].name].shape
    expanded = chain[2].outputs[0].type.shape
    if (len(source) != 4 or chain[3].attrs["dim"] % 5 != 2 or expanded[:2] + expanded[3:] != source
            or repeated != (source[0], source[1] * expanded[2], *source[2:])):
        return None
    return name
