"""Record a mixture-of-experts model's routing on calibration inputs, from the graph ember compiles.

The routers are found in ember's IR (a top-k over a router's scores whose indices dispatch experts), their expert
ids and gate weights made extra outputs of a copy of the graph, which the reference executor runs call by call.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import InputError, PlanError
from ..ir import Graph, Node, TensorType
from .canonicalize import eliminate_dead_code
from .moe_traces import RoutingTrace

log = logging.getLogger(__name__)

SCORE_STEPS = 8
"""Most nodes between a router's matmul and its top-k (softmax, sigmoid, a cast, a bias, views)."""

DISPATCH_STEPS = 16
"""Most nodes between a routing top-k's indices and a matmul they select experts for (sort, histc, cumsum, index)."""

SCORE_KINDS = frozenset({"pointwise", "normalization", "view"})
"""Kinds of the nodes from a router's logits to its top-k: softmax or sigmoid, casts, a bias, reshapes."""

GATE_KINDS = frozenset({"pointwise", "reduction", "normalization", "view"})
"""Kinds of the nodes that turn top-k values into gate weights row by row: renormalising (sum, div), scaling,
casting, a softmax over the k."""


@dataclass(frozen=True, slots=True)
class Router:
    """One MoE layer's routing in an IR graph: its top-k node, the values holding expert ids and gate weights."""

    node: str
    experts: str
    """int [..., k]: the top-k's indices, best first."""
    weights: str | None
    """float [..., k]: what the experts' outputs are weighted by (the top-k values after the model's own
    renormalising or scaling); None when the model does not weight by the top-k values."""
    num_experts: int
    k: int
    source: str | None = None


def find_routers(graph: Graph) -> tuple[Router, ...]:
    """The routing top-k nodes of `graph`, one per MoE layer, in graph (= layer) order.

    A routing top-k picks the largest along the last dim of a router's scores (a matmul with a weight, through at
    most SCORE_STEPS softmax/sigmoid/cast/view nodes), and its indices select experts (they reach a matmul within
    DISPATCH_STEPS nodes): a top-k sampling head over logits is not one. PlanError when there is none.
    """
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    readers = graph.readers()
    types = graph.types()
    params = {value.name for value in graph.params}
    made_at = {value.name: index for index, node in enumerate(graph.nodes) for value in node.outputs}
    routers, topks = [], 0
    for node in graph.nodes:
        if node.op != "topk":
            continue
        topks += 1
        scores = types[node.inputs[0]]
        named = dict(zip(node.result_positions, node.outputs))
        if (not _along_last_dim(node, scores) or not node.attrs.get("largest", True) or 1 not in named
                or not _from_router(node.inputs[0], scores.shape[-1], producer, params, types)
                or not _dispatches(named[1].name, readers)):
            log.debug("top-k %s is not a router's (%s)", node.name, node.source)
            continue
        k = named[1].type.shape[-1]
        weights = _gate_weights(named[0].name, named[0].type, readers, made_at) if 0 in named else None
        routers.append(Router(node.name, named[1].name, weights, scores.shape[-1], k, node.source))
    if not routers:
        raise PlanError(f"no mixture-of-experts routing found in the graph ({len(graph.nodes)} nodes, {topks} top-k): "
                        "looked for a `topk` along the last dim of a router's scores (a matmul with a weight, then "
                        "softmax, sigmoid, casts or views) whose indices select experts (reach a matmul within "
                        f"{DISPATCH_STEPS} nodes); record routing of a mixture-of-experts model (Mixtral, Qwen2-MoE, "
                        "OLMoE) captured with ember's frontend")
    log.debug("routers: %s", ", ".join(f"{router.node} (top-{router.k} of {router.num_experts}, weights "
                                       f"{router.weights})" for router in routers))
    return tuple(routers)


def _along_last_dim(node: Node, scores: TensorType) -> bool:
    rank = len(scores.shape)
    return rank >= 1 and node.attrs.get("dim", -1) % rank == rank - 1


def _from_router(name: str, num_experts: int, producer: Mapping[str, Node], params: set[str],
                 types: Mapping[str, TensorType]) -> bool:
    """Whether `name` is a router's scores: a matmul with a weight of `num_experts` rows or columns, through at most
    SCORE_STEPS score-kind nodes whose values keep `num_experts` in their last dim."""
    frontier = deque([(name, 0)])
    seen = {name}
    while frontier:
        current, steps = frontier.popleft()
        node = producer.get(current)
        if node is None or steps > SCORE_STEPS:
            continue
        kind = node.definition.kind
        if kind == "matmul":
            if any(operand in params and num_experts in types[operand].shape for operand in node.inputs):
                return True
            continue
        if kind not in SCORE_KINDS and not node.definition.converts:
            continue
        for operand in node.inputs:
            if operand not in seen and operand not in params and types[operand].shape[-1:] == (num_experts,):
                seen.add(operand)
                frontier.append((operand, steps + 1))
    return False


def _dispatches(indices: str, readers: Mapping[str, list[Node]]) -> bool:
    """Whether the values derived from `indices` reach a matmul's operands within DISPATCH_STEPS nodes."""
    frontier = deque([(indices, 0)])
    seen = {indices}
    while frontier:
        current, steps = frontier.popleft()
        for node in readers.get(current, ()):
            if node.definition.kind == "matmul":
                return True
            if steps + 1 >= DISPATCH_STEPS:
                continue
            for value in node.outputs:
                if value.name not in seen:
                    seen.add(value.name)
                    frontier.append((value.name, steps + 1))
    return False


def _gate_weights(values: str, shape_of: TensorType, readers: Mapping[str, list[Node]],
                  made_at: Mapping[str, int]) -> str:
    """The value the experts' outputs are weighted by: the last (in graph order) floating value of the top-k's
    shape among those computed row by row from its `values` (renormalised by their sum, scaled, cast, softmaxed
    over the k); the top-k values themselves when the model weights by them unchanged."""
    k = shape_of.shape[-1]
    rows = shape_of.numel // max(k, 1)

    def row_wise(value: TensorType) -> bool:  # [rows, k], or a per-row statistic [rows, 1], any leading shape
        return value.shape[-1:] in ((k,), (1,)) and value.numel == rows * value.shape[-1]

    reached, chosen = {values}, values
    frontier = deque([values])
    while frontier:
        for node in readers.get(frontier.popleft(), ()):
            if node.definition.kind not in GATE_KINDS and not node.definition.converts:
                continue
            for value in node.outputs:
                if value.name in reached or not row_wise(value.type):
                    continue
                reached.add(value.name)
                frontier.append(value.name)
                if (value.type.dtype.is_floating_point and value.type.shape[-1:] == (k,)
                        and made_at[value.name] > made_at[chosen]):
                    chosen = value.name
    return chosen


@dataclass(frozen=True, slots=True, eq=False)
class _Probe:
    """A graph that returns every router's expert ids and gate weights, and how a call's inputs become its tensors."""

    graph: Graph
    routers: tuple[Router, ...]
    tensor_inputs: Callable[[tuple, dict], list[torch.Tensor]]
    """(args, kwargs) -> the call's tensor inputs in graph order, checked against the graph's."""


def record_routing(model: nn.Module | Any, calibration_inputs: Iterable[Any], *,
                   name: str | None = None) -> RoutingTrace:
    """The routing of `model` on every call of `calibration_inputs` (each a tensor, a tuple of args or a dict of
    kwargs): experts [tokens, layers, k] and gate weights, tokens being each call's batch * sequence flattened in
    order and the calls one after another. `model` is a torch module, captured as ember.compile captures it (again
    for each new input shape), or a compiled ember Program, whose final graph is run (its inputs of one shape).
    Values come from the IR run by the reference executor with the routers' outputs as extra graph outputs."""
    probes: dict[Any, _Probe] = {}
    experts, weights, tokens = [], [], 0
    for index, call in enumerate(calibration_inputs):
        probe = _probe(model, call, probes)
        args, kwargs = _normalize(call)
        try:
            tensors = probe.tensor_inputs(args, kwargs)
        except InputError as error:
            raise PlanError(f"calibration call {index}: {error}") from error
        if len({(router.num_experts, router.k) for router in probe.routers}) != 1:
            raise PlanError("the routers choose among different numbers of experts or top-k: "
                            + ", ".join(f"{router.node}: top-{router.k} of {router.num_experts}"
                                        for router in probe.routers) + "; a trace needs one (experts, k) for all")
        values = _run(probe.graph, tensors)
        layer_experts = [values[2 * layer].reshape(-1, router.k) for layer, router in enumerate(probe.routers)]
        if len({tuple(chosen.shape) for chosen in layer_experts}) != 1:
            shapes = ", ".join(f"{router.node}: {tuple(chosen.shape)}"
                               for router, chosen in zip(probe.routers, layer_experts))
            raise PlanError(f"calibration call {index}: the routers route different numbers of tokens or experts "
                            f"({shapes}); a trace needs every layer to route each token to k experts")
        experts.append(torch.stack(layer_experts, dim=1).long())
        if all(router.weights is not None for router in probe.routers):
            weights.append(torch.stack([values[2 * layer + 1].reshape(-1, router.k).float()
                                        for layer, router in enumerate(probe.routers)], dim=1))
        tokens += experts[-1].shape[0]
    if not experts:
        raise PlanError("record_routing needs calibration inputs: give at least one call")
    routings = {(probe.routers[0].num_experts, len(probe.routers), probe.routers[0].k) for probe in probes.values()}
    if len(routings) != 1:
        raise PlanError("calls of different shapes captured differently routed graphs: (experts, layers, k) "
                        f"{sorted(routings)}")
    num_experts, layers, k = routings.pop()
    trace_name = name or _model_name(model)
    log.info("recorded routing of %s: %d tokens, %d layers, top-%d of %d experts", trace_name, tokens, layers, k,
             num_experts)
    return RoutingTrace(trace_name, torch.cat(experts).cpu(), num_experts,
                        torch.cat(weights).cpu() if len(weights) == len(experts) else None)


def probe_graph(graph: Graph, routers: Sequence[Router]) -> Graph:
    """A copy of `graph` that returns each router's expert ids and gate weights (its expert ids again where it has no
    weights), in layer order, and computes nothing else."""
    outputs = []
    for router in routers:
        outputs += [router.experts, router.weights or router.experts]
    return eliminate_dead_code(dataclasses.replace(graph, outputs=tuple(outputs)))


def _probe(model: nn.Module | Any, call: Any, probes: dict[Any, _Probe]) -> _Probe:
    """The probe for this call: the Program's graph, or the module captured on calls shaped like this one."""
    from ..runtime import Program
    from ..runtime.program import check_inputs

    if isinstance(model, Program):
        if None not in probes:
            def tensor_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
                tensors = model.tensor_inputs(*args, **kwargs)
                check_inputs(model.graph, tensors)
                return tensors

            routers = find_routers(model.graph)
            probes[None] = _Probe(probe_graph(model.graph, routers), routers, tensor_inputs)
        return probes[None]
    if not isinstance(model, nn.Module):
        raise PlanError(f"record_routing takes a torch module or an ember Program, not {type(model).__name__}")
    key = _call_key(call)
    if key not in probes:
        from ..frontend import from_module
        from ..runtime.program import coverage_report

        captured = from_module(model, call)
        program = Program(captured.graph, coverage_report(captured.graph, {}), in_spec=captured.in_spec,
                          arg_count=captured.arg_count, kwarg_names=captured.kwarg_names,
                          constant_inputs=captured.constant_inputs, name=type(model).__name__)
        routers = find_routers(captured.graph)
        probes[key] = _Probe(probe_graph(captured.graph, routers), routers,
                             lambda args, kwargs: program.tensor_inputs(*args, **kwargs))
    return probes[key]


def _run(graph: Graph, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The graph's outputs, its nodes' reference ops run one by one (no plan, no kernels)."""
    from ..runtime.executor import Executor

    with torch.no_grad():
        return Executor(graph).interpret(list(tensors))


def _normalize(call: Any) -> tuple[tuple, dict]:
    """A call as (args, kwargs), as ember.compile reads example inputs."""
    from ..frontend.export import normalize_inputs

    return normalize_inputs(call)


def _call_key(call: Any) -> Any:
    """What a capture is specialised on: the call's structure, its tensors' shapes, dtypes and devices, and its other
    values."""
    leaves, spec = pytree.tree_flatten(_normalize(call))
    return str(spec), tuple((tuple(leaf.shape), leaf.dtype, leaf.device.type) if isinstance(leaf, torch.Tensor)
                            else repr(leaf) for leaf in leaves)


def _model_name(model: Any) -> str:
    executor = getattr(model, "executor", None)
    return executor.name if executor is not None else type(model).__name__


def calibration_batches(model_name: str, batches: int, length: int, seed: int, *, batch_size: int | None = None,
                        size: str = "tiny") -> list[tuple[torch.Tensor]]:
    """`batches` calls of random token ids for the language model `model_name` (a built-in or package.module:function),
    each `batch_size` sequences (default: its example's) of `length` tokens drawn uniformly from its config's
    vocabulary, seeded: for models that ship no tokenizer. PlanError when the model takes no token ids."""
    from .. import models

    if batches < 1 or length < 1:
        raise PlanError(f"calibration batches: need at least one batch of one token, got {batches} x {length}")
    model, example = models.load(model_name, size, device="meta")
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    tokens = example[0] if example else None
    if not isinstance(vocab_size, int) or not isinstance(tokens, torch.Tensor) or tokens.is_floating_point():
        raise PlanError(f"{model_name} is not a language model on token ids with a config's vocab_size: give its "
                        "calibration inputs yourself")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise PlanError(f"{model_name} takes at most {limit} positions, asked for sequences of {length} tokens")
    batch_size = batch_size or tokens.shape[0]
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab_size, (batch_size, length), generator=generator),) for _ in range(batches)]
