"""FFN-SkipLLM's input-adaptive gate, decided on the device: in a decode step, once a feed-forward leaves the residual
stream nearly unturned, the feed-forwards after it are skipped, with no sync to the host.

Per token: the cosine of a feed-forward's stream input and output (h and h + ffn(norm(h))) is computed in the graph;
once it reaches the threshold, each later feed-forward's products become `gated_linears` that store zeros without
reading a weight (codegen.skinny_mm), so their branch adds nothing and the stream passes through. The first and last
`cold` feed-forwards always run, and so does every feed-forward of the first `warmup` positions; attention always
runs, so the KV cache is the full model's. `reference_gate` is the same rule as hooks on an eager model.

`FFNGate.replay` replaces the threshold's decisions with given ones (per position, one character per feed-forward,
recorded from another model, e.g. real weights in bench/layer_skip.py), read on the device from a small table by the
step's position; the cosines and the compare still run, so a replay costs what the gate costs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CompileError
from ..ir import Graph, Node, Value
from ..ir.ops import OP_TABLE, op_name
from ..ir.types import TensorType, type_of
from .canonicalize import eliminate_dead_code
from .decisions import record
from .joins import MAX_JOINED
from .layer_skip import Sublayer, find_sublayers, is_product

log = logging.getLogger(__name__)

aten = torch.ops.aten

POSITION_NAMES = re.compile(r"cache_position|position_ids")
"""Graph inputs that hold the token's position (transformers' decode step passes `cache_position`, or from 5.x
`position_ids`; dynamo names them `l_kwargs_cache_position_`, `l_kwargs_position_ids_`)."""


@dataclass(frozen=True, slots=True)
class FFNGate:
    """The gate: skip the feed-forwards after one whose cosine(input, output) reaches `threshold`; the first and last
    `cold` always run, as does every feed-forward of the first `warmup` positions."""

    threshold: float
    cold: int = 3
    warmup: int = 8
    replay: tuple[str, ...] = ()
    """Decisions to replay instead of the threshold's: position p's string (one character per feed-forward, "1" where
    it is skipped) decides step p; positions past the last skip nothing. Cold layers and warm-up are not applied (the
    first feed-forward always runs: the gate's cosine starts there)."""

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) or math.isnan(self.threshold):
            raise CompileError(f"FFNGate.threshold must be a number (a cosine, e.g. 0.95), not {self.threshold!r}")
        for name in ("cold", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CompileError(f"FFNGate.{name} must be a whole number >= 0, not {value!r}")
        replay = tuple(self.replay)
        if any(not isinstance(step, str) or set(step) - {"0", "1"} for step in replay) or \
                len({len(step) for step in replay}) > 1:
            raise CompileError("FFNGate.replay must be strings of 0 and 1 of one length (one character per "
                               "feed-forward, a string per position)")
        object.__setattr__(self, "replay", replay)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def as_ffn_gate(value: FFNGate | Mapping[str, Any]) -> FFNGate:
    """Options.ffn_gate as an FFNGate: one as it is, or its fields as a dict."""
    if isinstance(value, FFNGate):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {field.name for field in dataclasses.fields(FFNGate)})
        if unknown or "threshold" not in value:
            raise CompileError(f"Options.ffn_gate as a dict takes threshold (required), cold, warmup and replay; got "
                               f"{', '.join(sorted(value)) or 'nothing'}")
        return FFNGate(**{**value, "replay": tuple(value.get("replay", ()))})
    raise CompileError(f"Options.ffn_gate must be an FFNGate or a dict of its fields, not {type(value).__name__}")


def gate_ffns(graph: Graph, gate: FFNGate) -> Graph:
    """`graph` with its feed-forwards gated (see the module docstring) when it is a decode step (one row); a graph of
    more rows (a prefill) is returned as it is."""
    ffns = [sublayer for sublayer in find_sublayers(graph) if sublayer.kind == "ffn"]
    types = graph.types()
    if not ffns:
        log.info("ffn gate: no feed-forward sublayers found; the graph is left as it is")
        return graph
    rows = math.prod(types[ffns[0].stream_in].shape[:-1])
    if rows != 1:
        log.info("ffn gate: %d rows (a prefill, not a decode step); the feed-forwards are left ungated", rows)
        return graph
    if gate.replay:
        return _replayed(graph, ffns, gate)
    gated = [index for index in range(len(ffns)) if gate.cold <= index < len(ffns) - gate.cold and index > 0]
    if not gated:
        log.info("ffn gate: all %d feed-forwards are cold (cold=%d); nothing to gate", len(ffns), gate.cold)
        return graph
    position = _position(graph, types) if gate.warmup > 0 else None
    record(f"{len(gated)} of {len(ffns)} feed-forwards gated at cosine >= {gate.threshold} "
           f"(cold {gate.cold}, warm-up {gate.warmup} positions)")
    return _gated_graph(graph, ffns, gated, lambda writer, index, last_cos: _skip_flag(
        writer, f"ffn_gate_{index}", last_cos, position, gate), types)


def _replayed(graph: Graph, ffns: Sequence[Sublayer], gate: FFNGate) -> Graph:
    """`graph` gated by `gate.replay`: a [positions + 1, feed-forwards] table (its last row zero) read at the step's
    position, clamped to that last row; each flag is and-ed with the last cosine >= -2 (always true) so that the gate's
    own work stays in the graph."""
    if len(gate.replay[0]) != len(ffns):
        raise CompileError(f"FFNGate.replay has {len(gate.replay[0])} decisions per position, and the graph has "
                           f"{len(ffns)} feed-forwards")
    types = graph.types()
    position = _position(graph, types)
    device = next(iter(graph.weights.values())).device if graph.weights else torch.device("cpu")
    table = torch.tensor([[float(c) for c in step] for step in (*gate.replay, "0" * len(ffns))], device=device)
    name = "ffn_gate_replay_table"
    graph = dataclasses.replace(graph, params=(*graph.params, Value(name, type_of(table))),
                                weights={**graph.weights, name: table})
    types[name] = type_of(table)

    def flag(writer: _Writer, index: int, last_cos: str) -> str:
        if "ffn_gate_replay_flags" not in writer.types:
            flat = writer(aten.view.default, (position,), {"size": (1,)}, "ffn_gate_replay_position")
            bounded = writer(aten.clamp.default, (flat,), {"min": None, "max": len(gate.replay)},
                             "ffn_gate_replay_row")
            writer(aten.embedding.default, (name, bounded), {}, "ffn_gate_replay_flags")
        column = writer(aten.select.int, ("ffn_gate_replay_flags",), {"dim": 1, "index": index},
                        f"ffn_gate_{index}_replayed")
        recorded = writer(aten.ge.Scalar, (column,), {"other": 0.5}, f"ffn_gate_{index}_recorded")
        alive = writer(aten.ge.Scalar, (last_cos,), {"other": -2.0}, f"ffn_gate_{index}_measured")
        return writer(aten.logical_and.default, (recorded, alive), {}, f"ffn_gate_{index}_skip")

    record(f"{len(ffns)} feed-forwards gated by a replay of {len(gate.replay)} positions' decisions")
    return _gated_graph(graph, ffns, range(1, len(ffns)), flag, types)


def _gated_graph(graph: Graph, ffns: Sequence[Sublayer], gated: Sequence[int], flag: Any,
                 types: Mapping[str, TensorType]) -> Graph:
    """`graph` with the feed-forwards at `gated` (indices into `ffns`) skipped where `flag(writer, index, last_cos)`,
    a bool node, says so; every feed-forward's cosine is tracked, a skipped one keeping the last."""
    writer = _Writer(types)
    instead: dict[str, list[Node]] = {}
    """Node name -> the nodes emitted in its place (a replaced linear: none, or its gated_linears)."""
    after: dict[str, list[Node]] = {}
    last_cos: str | None = None
    for index, sublayer in enumerate(ffns):
        skip = None
        if index in gated:
            skip = flag(writer, index, last_cos)
            for anchor, node in _gated_products(graph, sublayer, skip, writer).items():
                instead[anchor] = [*writer.take(), node]
                instead.update((name, []) for name in _replaced_names(graph, sublayer, node) if name != anchor)
            instead[sublayer.add] = _zeroed_branch(graph, sublayer, skip, writer, instead)
        cos = _cosine(writer, f"ffn_gate_{index}", sublayer.stream_in, _add_result(graph, sublayer))
        last_cos = cos if skip is None else writer(aten.where.self, (skip, last_cos, cos), {}, f"ffn_gate_{index}_last")
        after[sublayer.add] = writer.take()
    nodes: list[Node] = []
    for node in graph.nodes:
        nodes.extend(instead.get(node.name, [node]))
        nodes.extend(after.get(node.name, ()))
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(nodes)))


def reference_gate(model: torch.nn.Module, gate: FFNGate) -> dict[str, Any]:
    """Hooks on a transformers decoder (`model.model.layers[i].mlp`) that gate its feed-forwards in one-row calls as
    `gate_ffns` does: the rule in eager torch, to check compiled programs against. Returns its state: `handles` (remove
    them to run the full model again) and `skipped`, per gated call a bool per feed-forward."""
    layers = model.model.layers
    state: dict[str, Any] = {"skipped": [], "handles": []}

    def start(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        positions = kwargs.get("cache_position", kwargs.get("position_ids"))
        state.update(last_cos=None, position=int(positions.reshape(-1)[-1]) if positions is not None else 0,
                     gating=(kwargs.get("input_ids", args[0] if args else None)).shape[-1] == 1)
        if state["gating"]:
            state["skipped"].append([])

    state["handles"].append(model.model.register_forward_pre_hook(start, with_kwargs=True))
    for index, layer in enumerate(layers):
        state["handles"].append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda module, args: state.update(before=args[0])))
        state["handles"].append(layer.mlp.register_forward_hook(_reference_hook(index, len(layers), gate, state)))
    return state


def _reference_hook(index: int, count: int, gate: FFNGate, state: dict[str, Any]) -> Any:
    """bench/layer_skip.py's FFNGate hook, for one-row calls: zero the output where skipped, then track the cosine."""
    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not state["gating"]:
            return None
        before, last_cos = state["before"], state["last_cos"]
        cold = index < gate.cold or index >= count - gate.cold
        position = state["position"]
        if last_cos is None or (cold and not gate.replay):
            skip = torch.zeros(output.shape[:-1], dtype=torch.bool, device=output.device)
        elif gate.replay:
            recorded = position < len(gate.replay) and gate.replay[position][index] == "1"
            skip = torch.full(output.shape[:-1], recorded, dtype=torch.bool, device=output.device)
        else:
            skip = (last_cos >= gate.threshold) & (position >= gate.warmup)
        output = torch.where(skip.unsqueeze(-1), torch.zeros_like(output), output)
        cos = torch.nn.functional.cosine_similarity(before.float(), (before + output).float(), dim=-1)
        state["last_cos"] = cos if last_cos is None else torch.where(skip, last_cos, cos)
        state["skipped"][-1].append(bool(skip.all()))
        return output
    return hook


# ---------------------------------------------------------------------------------------------
# The rewrite

class _Writer:
    """Makes typed aten nodes, keeping each value's type, and hands out the ones made since it last did."""

    def __init__(self, types: Mapping[str, TensorType]) -> None:
        self.types, self.made = dict(types), []

    def __call__(self, overload: torch._ops.OpOverload, inputs: tuple[str, ...], attrs: Mapping[str, Any],
                 name: str) -> str:
        definition = OP_TABLE[op_name(overload)]
        (result,) = definition.infer(definition, [self.types[value] for value in inputs], attrs)
        self.types[name] = result
        self.made.append(Node(name, definition.name, inputs, dict(attrs), (Value(name, result),)))
        return name

    def take(self) -> list[Node]:
        made, self.made = self.made, []
        return made


def _position(graph: Graph, types: Mapping[str, TensorType]) -> str:
    """The integer graph input holding the step's position (one element); CompileError when there is none."""
    for value in graph.inputs:
        if POSITION_NAMES.search(value.name) and not value.type.dtype.is_floating_point and value.type.numel == 1:
            return value.name
    names = ", ".join(value.name for value in graph.inputs)
    raise CompileError(f"the ffn gate's warm-up (warmup > 0) needs the token's position, and the graph has no "
                       f"one-element integer input named like cache_position or position_ids (inputs: {names}): "
                       "pass position_ids or cache_position to the model, or set FFNGate(warmup=0)")


def _skip_flag(write: _Writer, prefix: str, last_cos: str, position: str | None, gate: FFNGate) -> str:
    """The node computing whether this feed-forward is skipped: the last cosine reached the threshold, past warm-up."""
    skip = write(aten.ge.Scalar, (last_cos,), {"other": float(gate.threshold)}, f"{prefix}_reached")
    if position is None:
        return skip
    scalar = write(aten.view.default, (position,), {"size": ()}, f"{prefix}_position")
    warm = write(aten.ge.Scalar, (scalar,), {"other": gate.warmup}, f"{prefix}_warm")
    return write(aten.logical_and.default, (skip, warm), {}, f"{prefix}_skip")


def _cosine(write: _Writer, prefix: str, before: str, after: str) -> str:
    """cos(before, after) over the last dim in float32: sum(a*b) * rsqrt(sum(a*a) * sum(b*b))."""
    a, b = (_float32(write, name, f"{prefix}_{which}") for name, which in ((before, "in"), (after, "out")))
    sums = [write(aten.sum.dim_IntList, (write(aten.mul.Tensor, (x, y), {}, f"{prefix}_{tag}_products"),),
                  {"dim": (-1,)}, f"{prefix}_{tag}") for x, y, tag in ((a, b, "dot"), (a, a, "in_sq"), (b, b, "out_sq"))]
    norms = write(aten.mul.Tensor, (sums[1], sums[2]), {}, f"{prefix}_norms")
    return write(aten.mul.Tensor, (sums[0], write(aten.rsqrt.default, (norms,), {}, f"{prefix}_rnorm")), {},
                 f"{prefix}_cos")


def _float32(write: _Writer, name: str, result: str) -> str:
    if write.types[name].dtype == torch.float32:
        return name
    return write(aten._to_copy.default, (name,), {"dtype": torch.float32}, result)


def _add_result(graph: Graph, sublayer: Sublayer) -> str:
    """The residual add's result: the stream in plus the feed-forward's output."""
    return next(node.outputs[0].name for node in graph.nodes if node.name == sublayer.add)


def _gated_products(graph: Graph, sublayer: Sublayer, skip: str, write: _Writer) -> dict[str, Node]:
    """The feed-forward's weight products as `gated_linears` reading `skip`, those of one input joined (gate and up
    projections), keyed by the node each replaces first; CompileError when its branch has a product of another
    kind, which the gate cannot skip."""
    branch = [node for node in graph.nodes if node.name in set(sublayer.branch)]
    products = [node for node in branch if node.definition.linear and node.inputs[1] in graph.weights
                and all(value is None for value in node.attrs.values())]
    others = [node.name for node in branch if is_product(node) and node not in products]
    if not products or others:
        raise CompileError(f"the ffn gate needs feed-forwards made of linear layers; {sublayer.label} has "
                           f"{', '.join(others) or 'none'}: leave Options.ffn_gate off for this model")
    readers: dict[str, list[Node]] = {}
    for node in products:
        readers.setdefault(node.inputs[0], []).append(node)
    gated: dict[str, Node] = {}
    for x, members in readers.items():
        rows = write.types[x].shape[:-1]
        flag = skip if write.types[skip].shape == rows else write(
            aten.view.default, (skip,), {"size": rows}, f"{members[0].name}_skip")
        for start in range(0, len(members), MAX_JOINED):
            chunk = members[start: start + MAX_JOINED]
            gated[chunk[0].name] = _gated(chunk, flag)
    return gated


def _zeroed_branch(graph: Graph, sublayer: Sublayer, skip: str, write: _Writer,
                   instead: Mapping[str, list[Node]]) -> list[Node]:
    """The residual add, reading its branch zeroed where `skip`: as it is when a gated product makes the branch's
    output (Llama's down projection), else after a `where` that zeroes it (a bias or scale after the product)."""
    add = next(node for node in graph.nodes if node.name == sublayer.add)
    branch_out = next(name for name in add.inputs if name != sublayer.stream_in)
    made = {value.name for nodes in instead.values() for node in nodes for value in node.outputs
            if node.definition.target is torch.ops.ember.gated_linears.default}
    if branch_out in made:
        return [add]
    keep = write(aten.logical_not.default, (skip,), {}, f"{add.name}_keep")
    keep = write(aten.unsqueeze.default, (keep,), {"dim": -1}, f"{add.name}_keep_rows")
    zeroed = write(aten.where.ScalarOther, (keep, branch_out), {"other": 0.0}, f"{add.name}_zeroed")
    return [*write.take(), dataclasses.replace(add, inputs=tuple(zeroed if name == branch_out else name
                                                                 for name in add.inputs))]


def _replaced_names(graph: Graph, sublayer: Sublayer, gated: Node) -> list[str]:
    """The `linear` nodes a gated_linears node stands for (they share its outputs)."""
    outputs = {value.name for value in gated.outputs}
    return [node.name for node in graph.nodes if node.name in sublayer.branch and node.outputs[0].name in outputs]


def _gated(members: Sequence[Node], skip: str) -> Node:
    """One `gated_linears` node computing every member's result under its own value name, zero where `skip`."""
    weights = tuple(node.inputs[1] for node in members)
    biases = [node.inputs[2] if len(node.inputs) > 2 else None for node in members]
    present = [name for name in biases if name is not None]
    slots = iter(range(1 + len(weights), 1 + len(weights) + len(present)))
    return Node(f"{members[0].name}_gated", op_name(torch.ops.ember.gated_linears.default),
                (members[0].inputs[0], *weights, *present, skip),
                {"weights": tuple(range(1, 1 + len(weights))),
                 "biases": tuple(None if name is None else next(slots) for name in biases)},
                tuple(node.outputs[0] for node in members), source=members[0].source)


__all__ = ["FFNGate", "as_ffn_gate", "gate_ffns", "reference_gate"]
