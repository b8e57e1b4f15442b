"""Inference batch norm folded into the convolution before it: one kernel and one pass over the activations fewer.

In eval mode a batch norm is a constant affine map per channel, `(y - mean) / sqrt(var + eps) * gamma + beta`, so
after `y = conv(x, W) + b` it equals `conv(x, W * s) + (b - mean) * s + beta` with `s = gamma / sqrt(var + eps)`.
The scaled weight and bias are made once, at compile time (in float32, or float64 for a float64 model, and cast
back to the convolution's dtype), and held as derived weights: the runtime checks their sources' versions, so an
in-place update of any of them recompiles (torch.compile) or is refused (ember.compile) rather than read stale. A
call that autograd records runs the graph as captured, with the weights themselves.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..ir import Graph, Node, Value
from ..ir.ops import op_name
from ..ir.types import type_of
from ..units import format_bytes
from .canonicalize import eliminate_dead_code
from .decisions import record
from .fold import fresh_name, mutated_memory, renamed_inputs

BATCH_NORM = op_name(torch.ops.aten._native_batch_norm_legit_no_training.default)
CONVOLUTION = op_name(torch.ops.aten.convolution.default)


@dataclasses.dataclass(frozen=True, slots=True)
class _Fold:
    """One batch norm to fold: the convolution before it and the weights both read (None where absent)."""

    conv: Node
    norm: Node
    weight: str
    bias: str | None
    scale: str | None
    shift: str | None
    mean: str
    var: str


def rounds_to_tf32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether cuDNN runs a convolution of this dtype on this device in TF32: float32 on CUDA, TF32 allowed."""
    return dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32


def fold_batch_norm(graph: Graph) -> Graph:
    """The graph with each inference batch norm that alone reads a convolution's result folded into that
    convolution's weight and bias (see `_foldable` for when it is not)."""
    for node in graph.nodes:
        if node.is_extern and "batch_norm" in (node.target or ""):
            training = " (training: it normalizes by the batch and updates its running statistics)"
            record(f"batch norm %{node.name} kept: {node.target} is not the inference form"
                   f"{training if node.attrs.get('training') else ''}")
    norms = [node for node in graph.nodes if node.op == BATCH_NORM]
    if not norms:
        return graph
    producers = {value.name: node for node in graph.nodes for value in node.outputs}
    reads = Counter(name for node in graph.nodes for name in dict.fromkeys(node.inputs))
    reads.update(graph.outputs)
    frozen = mutated_memory(graph) | set(graph.written)
    folds: list[_Fold] = []
    for norm in norms:
        fold_or_reason = _foldable(norm, graph, producers, reads, frozen)
        if isinstance(fold_or_reason, str):
            record(f"batch norm %{norm.name} kept: {fold_or_reason}")
        else:
            folds.append(fold_or_reason)
    if not folds:
        return graph
    weights, derived, params = dict(graph.weights), dict(graph.derived), list(graph.params)
    taken = {*graph.types(), *weights}
    rewritten: dict[str, Node] = {}
    renamed: dict[str, str] = {}
    with unset_fake_temporarily(), torch.no_grad():  # the backend runs under fake tensors; the weights are real
        for fold in folds:
            names = []
            for role, tensor in zip(("weight", "bias"), _folded(fold, graph.weights)):
                name = fresh_name(f"{fold.conv.name}_{role}_folded", taken)
                weights[name], derived[name] = tensor, _sources(fold, graph)
                params.append(Value(name, type_of(tensor)))
                names.append(name)
            attrs = {key: value for key, value in fold.conv.attrs.items() if key != "bias"}
            rewritten[fold.conv.name] = dataclasses.replace(fold.conv, inputs=(fold.conv.inputs[0], *names),
                                                            attrs=attrs)
            renamed[fold.norm.outputs[0].name] = fold.conv.outputs[0].name
            _record_fold(fold, weights[names[0]], weights[names[1]])
    dropped = {fold.norm.name for fold in folds}
    nodes = tuple(renamed_inputs(rewritten.get(node.name, node), renamed) for node in graph.nodes if node.name not in dropped)
    outputs = tuple(renamed.get(name, name) for name in graph.outputs)
    return eliminate_dead_code(dataclasses.replace(graph, nodes=nodes, outputs=outputs, params=tuple(params),
                                                   weights=weights, derived=derived))


def _record_fold(fold: _Fold, weight: torch.Tensor, bias: torch.Tensor) -> None:
    activation = fold.conv.outputs[0].type
    record(f"batch norm %{fold.norm.name} folded into convolution %{fold.conv.name} ({activation.shape[1]} channels, "
           f"eps {fold.norm.attrs.get('eps', 1e-5):g}): its weight and bias scaled once at compile time "
           f"({format_bytes(weight.nbytes + bias.nbytes)} of {str(weight.dtype).removeprefix('torch.')} weights), "
           f"{format_bytes(2 * activation.nbytes)} of activations no longer read and written per call")


def _foldable(norm: Node, graph: Graph, producers: dict[str, Node], reads: Counter, frozen: set[str]) -> _Fold | str:
    """The fold of `norm` into the convolution before it, or why there is none."""
    operands = iter(norm.inputs[1:])
    scale = None if "weight" in norm.attrs else next(operands, None)
    shift = None if "bias" in norm.attrs else next(operands, None)
    mean, var = next(operands, None), next(operands, None)
    if norm.attrs.get("weight") is not None or norm.attrs.get("bias") is not None or var is None:
        return "its operands are not the usual (input, weight, bias, mean, var)"
    if any(reads[value.name] for value in norm.outputs[1:]):
        return "its saved statistics are read"
    conv = producers.get(norm.inputs[0])
    if conv is None or conv.op != CONVOLUTION:
        made_by = "a graph input" if conv is None else f"%{conv.name} ({conv.op})"
        return f"its input is made by {made_by}, not a convolution"
    result = conv.outputs[0]
    if reads[result.name] > 1:
        return f"the convolution's result %{result.name} has {reads[result.name] - 1} other reader(s)"
    if len(conv.outputs) != 1 or not norm.outputs[0].type.same_as(result.type) or len(result.type.shape) < 3:
        return f"its result ({norm.outputs[0].type}) is not the convolution's ({result.type}) per channel"
    if conv.attrs.get("bias") is not None or len(conv.inputs) != (2 if "bias" in conv.attrs else 3):
        return "the convolution's operands are not the usual (input, weight[, bias])"
    weight, bias = conv.inputs[1], None if "bias" in conv.attrs else conv.inputs[2]
    for name in (weight, bias, scale, shift, mean, var):
        if name is None:
            continue
        if name not in graph.weights:
            return f"%{name} is not a weight (it is computed on every call)"
        if name in frozen:
            return f"%{name} is memory the model writes"
    tensors = [graph.weights[name] for name in (bias, scale, shift, mean, var) if name is not None]
    channels = result.type.shape[1]
    if any(tensor.shape != (channels,) for tensor in tensors):
        return f"its statistics are not one per each of the convolution's {channels} channels"
    if len({tensor.device for tensor in (graph.weights[weight], *tensors)}) > 1:
        return "the weights lie on more than one device"
    if not graph.weights[weight].is_floating_point():
        return f"the convolution's weight is {graph.weights[weight].dtype}"
    if rounds_to_tf32(graph.weights[weight].dtype, graph.weights[weight].device):
        return ("a float32 convolution on CUDA runs in TF32 (torch.backends.cudnn.allow_tf32): the folded weight would "
                "round differently from eager's by about 1e-3; set allow_tf32 = False to fold it exactly")
    return _Fold(conv, norm, weight, bias, scale, shift, mean, var)


def _folded(fold: _Fold, weights: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight scaled per output channel, and its bias shifted, in the weight's dtype and
    layout: computed in float32 (float64 when a weight is)."""
    weight, attrs = weights[fold.weight], fold.conv.attrs
    given = [weights[name] for name in (fold.bias, fold.scale, fold.shift, fold.mean, fold.var) if name is not None]
    exact = torch.float32
    for tensor in (weight, *given):
        exact = torch.promote_types(exact, tensor.dtype)

    def exactly(name: str | None, default: float) -> torch.Tensor | float:
        return default if name is None else weights[name].detach().to(exact)

    eps = float(fold.norm.attrs.get("eps", 1e-5))
    scale = exactly(fold.scale, 1.0) * torch.rsqrt(exactly(fold.var, 0.0) + eps)
    bias = (exactly(fold.bias, 0.0) - exactly(fold.mean, 0.0)) * scale + exactly(fold.shift, 0.0)
    wide = weight.detach().to(exact)
    if attrs.get("transposed"):  # (C_in, C_out / groups, *kernel): output channels along dim 1, per group
        groups = attrs.get("groups", 1)
        grouped = wide.reshape(groups, wide.shape[0] // groups, wide.shape[1], *wide.shape[2:])
        per_channel = scale.reshape(groups, 1, wide.shape[1], *([1] * (wide.dim() - 2)))
        scaled = (grouped * per_channel).reshape(wide.shape)
    else:  # (C_out, C_in / groups, *kernel)
        scaled = wide * scale.reshape(-1, *([1] * (wide.dim() - 1)))
    out_weight = torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype, device=weight.device) \
        if _dense(weight) else torch.empty_like(weight, memory_format=torch.contiguous_format)
    out_weight.copy_(scaled)
    bias_dtype = weights[fold.bias].dtype if fold.bias is not None else weight.dtype
    return out_weight, bias.to(bias_dtype).contiguous()


def _sources(fold: _Fold, graph: Graph) -> tuple[torch.Tensor, ...]:
    """The tensors the folded weights are made from, each once (through earlier derived weights, to their own)."""
    names = (fold.weight, fold.bias, fold.scale, fold.shift, fold.mean, fold.var)
    return tuple({id(tensor): tensor for name in names if name is not None
                  for tensor in graph.derived.get(name, (graph.weights[name],))}.values())


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor's strides lay its elements out without overlap or gaps (a permutation of contiguous)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True
