"""Inference batch norm folded into the convolution before it: one kernel and one pass over the activations fewer.

In eval mode a batch norm is a constant affine map per channel, `(y - mean) / sqrt(var + eps) * gamma + beta`, so
after `y = conv(x, W) + b` it equals `conv(x, W * s) + (b - mean) * s + beta` with `s = gamma / sqrt(var + eps)`.
The scaled weight and bias are made once, at compile time (in float32, or float64 for a float64 model, and cast
back to the convolution's dtype), and held as derived weights: the runtime checks their sources' versions, so an
in-place update of any of them recompiles (torch.compile) or is refused (ember.compile) rather than read stale. A
call that autograd records runs the graph as captured, with the weights themselves.

On cuDNN's devices (cudnn.LAYOUT_DEVICES) fusion joins a per-channel multiply and add to the kernel after the
convolution at almost no cost, so there a batch norm becomes `conv(x, W) * s + ((b - mean) * s + beta)`, the two
vectors made once, wherever folding would cost more: where the weight is already channels-last (1x1 and depthwise
kernels, which the layout pass then reads as they are, so a folded copy is memory held for one multiply; 24 MiB
on ResNet-50 in bfloat16), and where cuDNN runs the convolution in TF32 (a folded weight would round differently
from eager's, an epilogue does not).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..ir import Graph, Node, TensorType, Value
from ..ir.ops import op_name
from ..ir.types import type_of
from ..units import format_bytes
from . import cudnn
from .canonicalize import eliminate_dead_code
from .decisions import record
from .fold import fresh_name, mutated_memory, renamed_inputs

BATCH_NORM = op_name(torch.ops.aten._native_batch_norm_legit_no_training.default)
CONVOLUTION = op_name(torch.ops.aten.convolution.default)
VIEW = op_name(torch.ops.aten.view.default)
MUL = op_name(torch.ops.aten.mul.Tensor)
ADD = op_name(torch.ops.aten.add.Tensor)


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


def fold_batch_norm(graph: Graph) -> Graph:
    """The graph with each inference batch norm that alone reads a convolution's result folded into that
    convolution's weight and bias, or made a per-channel scale and shift after it where that is cheaper
    (`_epilogue_reason`); see `_foldable` for when neither is done."""
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
    folded = {fold.norm.name for fold in folds}
    weights, derived, params = dict(graph.weights), dict(graph.derived), list(graph.params)
    taken = {*graph.types(), *weights, *(node.name for node in graph.nodes)}
    rewritten: dict[str, Node] = {}
    renamed: dict[str, str] = {}
    epilogues: dict[str, tuple[Node, ...]] = {}
    """batch norm -> the multiply and add (and their operands' views) that replace it"""
    with unset_fake_temporarily(), torch.no_grad():  # the backend runs under fake tensors; the weights are real
        for fold in folds:
            epilogue = _epilogue_reason(fold, graph.weights)
            roles = ("scale", "shift") if epilogue else ("weight", "bias")
            names = []
            for role, tensor in zip(roles, _affine(fold, graph.weights) if epilogue else _folded(fold, graph.weights)):
                name = fresh_name(f"{fold.conv.name}_{'norm_' if epilogue else ''}{role}_folded", taken)
                weights[name], derived[name] = tensor, _sources(fold, graph, with_weight=not epilogue)
                params.append(Value(name, type_of(tensor)))
                names.append(name)
            attrs = {key: value for key, value in fold.conv.attrs.items() if key != "bias"}
            if epilogue:
                inputs, attrs = fold.conv.inputs[:2], {**attrs, "bias": None}
                epilogues[fold.norm.name] = _epilogue(fold, names, taken)
                _record_epilogue(fold, epilogue)
            else:
                inputs = (fold.conv.inputs[0], *names)
                renamed[fold.norm.outputs[0].name] = fold.conv.outputs[0].name
                _record_fold(fold, weights[names[0]], weights[names[1]])
            rewritten[fold.conv.name] = dataclasses.replace(fold.conv, inputs=inputs, attrs=attrs)
    nodes: list[Node] = []
    for node in graph.nodes:
        if node.name in folded:  # gone, or replaced by its epilogue
            nodes += epilogues.get(node.name, ())
        else:
            nodes.append(renamed_inputs(rewritten.get(node.name, node), renamed))
    outputs = tuple(renamed.get(name, name) for name in graph.outputs)
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(nodes), outputs=outputs, params=tuple(params),
                                                   weights=weights, derived=derived))


def _epilogue_reason(fold: _Fold, weights: Mapping[str, torch.Tensor]) -> str | None:
    """Why the batch norm is better applied after the convolution as a per-channel scale and shift that fusion
    joins to its epilogue (on cuDNN's devices only), or None where folding it into the weight is."""
    weight = weights[fold.weight]
    if weight.device.type not in cudnn.LAYOUT_DEVICES or fold.conv.attrs.get("transposed") or weight.dim() != 4:
        return None
    if cudnn.rounds_to_tf32(weight.dtype, weight.device):
        return "cuDNN runs the convolution in TF32, where a folded weight would round differently from eager's"
    if weight.is_contiguous(memory_format=torch.channels_last):
        return (f"its weight is already channels-last, so a folded copy would hold {format_bytes(weight.nbytes)} more "
                "for one multiply")
    return None


def _epilogue(fold: _Fold, names: list[str], taken: set[str]) -> tuple[Node, ...]:
    """The views of the scale and shift as columns, and the multiply and add that take the batch norm's place."""
    result = fold.conv.outputs[0]
    column = (result.type.shape[1], *([1] * (len(result.type.shape) - 2)))
    views = [Value(fresh_name(f"{name}_column", taken), TensorType(column, result.type.dtype, None, result.type.device))
             for name in names]
    scaled = Value(fresh_name(f"{fold.conv.name}_norm_scaled", taken), result.type)
    source = fold.norm.source
    return (Node(views[0].name, VIEW, (names[0],), {"size": column}, (views[0],), source=source),
            Node(scaled.name, MUL, (result.name, views[0].name), {}, (scaled,), source=source),
            Node(views[1].name, VIEW, (names[1],), {"size": column}, (views[1],), source=source),
            Node(fresh_name(f"{fold.conv.name}_norm_shifted", taken), ADD, (scaled.name, views[1].name), {},
                 (fold.norm.outputs[0],), source=source))


def _record_epilogue(fold: _Fold, reason: str) -> None:
    activation = fold.conv.outputs[0].type
    record(f"batch norm %{fold.norm.name} after convolution %{fold.conv.name} ({activation.shape[1]} channels) became "
           f"a per-channel scale and shift made once at compile time, for fusion to join to the convolution's "
           f"epilogue, rather than folded into the weight: {reason}")


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
    fold = _Fold(conv, norm, weight, bias, scale, shift, mean, var)
    if cudnn.rounds_to_tf32(graph.weights[weight].dtype, graph.weights[weight].device) and \
            _epilogue_reason(fold, graph.weights) is None:
        return ("a float32 convolution on CUDA runs in TF32 (torch.backends.cudnn.allow_tf32): the folded weight would "
                "round differently from eager's by about 1e-3; set allow_tf32 = False to fold it exactly")
    return fold


def _scale_and_shift(fold: _Fold, weights: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch norm's per-channel scale `gamma / sqrt(var + eps)` and the shift `(b - mean) * scale + beta` that
    follow the convolution without its bias, in float32 (float64 when a weight is)."""
    given = [weights[name] for name in (fold.weight, fold.bias, fold.scale, fold.shift, fold.mean, fold.var)
             if name is not None]
    exact = torch.float32
    for tensor in given:
        exact = torch.promote_types(exact, tensor.dtype)

    def exactly(name: str | None, default: float) -> torch.Tensor | float:
        return default if name is None else weights[name].detach().to(exact)

    eps = float(fold.norm.attrs.get("eps", 1e-5))
    scale = exactly(fold.scale, 1.0) * torch.rsqrt(exactly(fold.var, 0.0) + eps)
    return scale, (exactly(fold.bias, 0.0) - exactly(fold.mean, 0.0)) * scale + exactly(fold.shift, 0.0)


def _affine(fold: _Fold, weights: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and shift in the convolution's result dtype, for the epilogue."""
    scale, shift = _scale_and_shift(fold, weights)
    dtype = fold.conv.outputs[0].type.dtype
    return scale.to(dtype).contiguous(), shift.to(dtype).contiguous()


def _folded(fold: _Fold, weights: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight scaled per output channel, and its bias shifted, in the weight's dtype and
    layout: computed in float32 (float64 when a weight is)."""
    weight, attrs = weights[fold.weight], fold.conv.attrs
    scale, bias = _scale_and_shift(fold, weights)
    wide = weight.detach().to(scale.dtype)
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


def _sources(fold: _Fold, graph: Graph, with_weight: bool = True) -> tuple[torch.Tensor, ...]:
    """The tensors the folded weights are made from, each once (through earlier derived weights, to their own); the
    convolution's weight among them unless the batch norm became an epilogue."""
    names = (fold.weight if with_weight else None, fold.bias, fold.scale, fold.shift, fold.mean, fold.var)
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
