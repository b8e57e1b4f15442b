"""The IR and its plans as JSON-ready data, and back: what a saved program holds instead of pickles.

Decoding builds only IR objects and the few torch constants an attribute may hold (a dtype, a device, a memory
format, a layout), each looked up by name and checked to be one; nothing it reads is run. Weights are not part
of it (the artifact keeps them as safetensors).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .graph import Graph, Node, Value
from .layout import Arena, ArenaLayout
from .ops import OP_TABLE
from .plans import FusionGroup, FusionPlan
from .types import TensorType


class SerializeError(ValueError):
    """Data that does not describe an IR object this version of ember knows."""


_CONSTANTS: dict[str, type] = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}
"""Tag -> the torch type of the constants saved under it, by their name in `torch`."""


def encode_value(value: Any) -> Any:
    """An attribute's value as JSON data: tuples, non-finite floats and torch constants tagged."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode_value(item) for item in value]}
    if isinstance(value, list):
        return [encode_value(item) for item in value]
    if isinstance(value, torch.device):
        return {"device": str(value)}
    for tag, kind in _CONSTANTS.items():
        if isinstance(value, kind):
            return {tag: str(value).removeprefix("torch.")}
    raise SerializeError(f"cannot save an attribute of type {type(value).__name__}: {value!r}")


def decode_value(data: Any) -> Any:
    """The inverse of `encode_value`."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_value(item) for item in data]
    if isinstance(data, dict) and len(data) == 1:
        (tag, item), = data.items()
        if tag == "tuple" and isinstance(item, list):
            return tuple(decode_value(element) for element in item)
        if tag == "float" and item in ("inf", "-inf", "nan"):
            return float(item)
        if tag == "device" and isinstance(item, str):
            try:
                return torch.device(item)
            except RuntimeError as error:
                raise SerializeError(f"not a device: {item!r}") from error
        if tag in _CONSTANTS and isinstance(item, str):
            constant = getattr(torch, item, None)
            if isinstance(constant, _CONSTANTS[tag]):
                return constant
            raise SerializeError(f"not a torch {tag}: {item!r}")
    raise SerializeError(f"not a saved attribute value: {data!r}")


def encode_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def decode_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise SerializeError(f"not a torch dtype: {name!r}")
    return dtype


def encode_type(type_: TensorType) -> dict[str, Any]:
    return {"shape": list(type_.shape), "dtype": encode_dtype(type_.dtype),
            "strides": None if type_.strides is None else list(type_.strides), "device": type_.device}


def decode_type(data: Mapping[str, Any]) -> TensorType:
    strides = data["strides"]
    return TensorType(_ints(data["shape"]), decode_dtype(data["dtype"]), None if strides is None else _ints(strides),
                      _string(data["device"]))


def encode_graph(graph: Graph) -> dict[str, Any]:
    """The graph without its weights' values: inputs, weights' names and types, nodes, outputs."""
    return {
        "inputs": [_encode_value_decl(value) for value in graph.inputs],
        "params": [_encode_value_decl(value) for value in graph.params],
        "nodes": [_encode_node(node) for node in graph.nodes],
        "outputs": list(graph.outputs),
        "written": sorted(graph.written),
    }


def decode_graph(data: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> Graph:
    """The graph `encode_graph` saved, holding `weights` (name -> tensor, one per param)."""
    try:
        return Graph(tuple(_decode_value_decl(value) for value in data["inputs"]),
                     tuple(_decode_value_decl(value) for value in data["params"]),
                     tuple(_decode_node(node) for node in data["nodes"]), tuple(_string(n) for n in data["outputs"]),
                     dict(weights), written=frozenset(_string(n) for n in data["written"]))
    except (KeyError, TypeError, AttributeError) as error:
        raise SerializeError(f"malformed graph data ({type(error).__name__}: {error})") from error


def encode_fusion(fusion: FusionPlan) -> dict[str, Any]:
    return {"groups": [_encode_group(g) for g in fusion.groups], "rejected": [_encode_group(g) for g in fusion.rejected],
            "schedule": list(fusion.schedule)}


def decode_fusion(data: Mapping[str, Any]) -> FusionPlan:
    try:
        return FusionPlan(tuple(_decode_group(g) for g in data["groups"]),
                          tuple(_decode_group(g) for g in data["rejected"]), _strings(data["schedule"]))
    except (KeyError, TypeError, ValueError) as error:
        raise SerializeError(f"malformed fusion plan ({type(error).__name__}: {error})") from error


def encode_layout(layout: ArenaLayout) -> dict[str, Any]:
    return {"slots": {name: [arena, offset, encode_type(type_)] for name, (arena, offset, type_) in layout.slots.items()},
            "arenas": [[a.size_bytes, a.first_step, a.last_step] for a in layout.arenas],
            "reuses": dict(layout.reuses), "unrepeatable": sorted(layout.unrepeatable)}


def decode_layout(data: Mapping[str, Any]) -> ArenaLayout:
    try:
        slots = {_string(name): (int(arena), int(offset), decode_type(type_))
                 for name, (arena, offset, type_) in data["slots"].items()}
        arenas = tuple(Arena(*_ints(arena)) for arena in data["arenas"])
        reuses = {_string(result): _string(source) for result, source in data["reuses"].items()}
        return ArenaLayout(slots, arenas, reuses, frozenset(_strings(data["unrepeatable"])))
    except (KeyError, TypeError, ValueError) as error:
        raise SerializeError(f"malformed arena layout ({type(error).__name__}: {error})") from error


def _encode_group(group: FusionGroup) -> dict[str, Any]:
    return {"name": group.name, "nodes": list(group.nodes), "inputs": list(group.inputs),
            "outputs": list(group.outputs), "shape": list(group.shape), "reduced": group.reduced,
            "unfused_us": group.unfused_us, "fused_us": group.fused_us}


def _decode_group(data: Mapping[str, Any]) -> FusionGroup:
    return FusionGroup(_string(data["name"]), _strings(data["nodes"]), _strings(data["inputs"]),
                       _strings(data["outputs"]), _ints(data["shape"]), int(data["reduced"]),
                       float(data["unfused_us"]), float(data["fused_us"]))


def _encode_value_decl(value: Value) -> dict[str, Any]:
    return {"name": value.name, "type": encode_type(value.type)}


def _decode_value_decl(data: Mapping[str, Any]) -> Value:
    return Value(_string(data["name"]), decode_type(data["type"]))


def _encode_node(node: Node) -> dict[str, Any]:
    return {"name": node.name, "op": node.op, "target": node.target, "inputs": list(node.inputs),
            "attrs": {key: encode_value(value) for key, value in node.attrs.items()},
            "outputs": [_encode_value_decl(value) for value in node.outputs], "source": node.source,
            "positions": None if node.positions is None else list(node.positions)}


def _decode_node(data: Mapping[str, Any]) -> Node:
    op, target = _string(data["op"]), data["target"]
    if op == "extern":
        if not isinstance(target, str):
            raise SerializeError(f"extern node {data['name']!r} names no torch op")
    elif op not in OP_TABLE:
        raise SerializeError(f"node {data['name']!r} uses op {op!r}, which this version of ember does not define")
    positions = data["positions"]
    source = data["source"]
    return Node(_string(data["name"]), op, _strings(data["inputs"]),
                {_string(key): decode_value(value) for key, value in data["attrs"].items()},
                tuple(_decode_value_decl(value) for value in data["outputs"]), target,
                source if source is None else _string(source), None if positions is None else _ints(positions))


def _string(data: Any) -> str:
    if not isinstance(data, str):
        raise SerializeError(f"expected a string, got {data!r}")
    return data


def _strings(data: Any) -> tuple[str, ...]:
    if not isinstance(data, list):
        raise SerializeError(f"expected a list of strings, got {data!r}")
    return tuple(_string(item) for item in data)


def _ints(data: Any) -> tuple[int, ...]:
    if not isinstance(data, list) or not all(isinstance(item, int) and not isinstance(item, bool) for item in data):
        raise SerializeError(f"expected a list of integers, got {data!r}")
    return tuple(data)
