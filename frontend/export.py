"""The offline frontend: torch.export a model, decompose to ember's ATen set, lower to IR."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from ..errors import CompileError
from ..ir import Graph
from ..progress import task
from .decompositions import ember_decompositions
from .lower import lower_fx

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Captured:
    """A lowered model and how to call it like the original.

    in_spec/out_spec: the pytree structure of (args, kwargs) and of the model's result.
    arg_count/kwarg_names: the call's positional arity and keyword names, for readable errors.
    constant_inputs: flat input position -> the value export specialised on (non-tensor inputs).
    mutated_buffers: the model buffers that the first graph outputs are written back to, in order.
    stage_seconds: wall time of capture (export + decompositions) and of lowering.
    """

    graph: Graph
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    arg_count: int
    kwarg_names: tuple[str, ...]
    constant_inputs: Mapping[int, Any]
    mutated_buffers: tuple[torch.Tensor, ...]
    stage_seconds: Mapping[str, float]


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """example_inputs as (args, kwargs): a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def capture(model: torch.nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """torch.export the model and decompose it with ember's table; CompileError when export cannot."""
    args, kwargs = normalize_inputs(example_inputs)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stderr(chatter):  # torch prints the partial graph of a failed export, twice
            exported = torch.export.export(model, args, kwargs)
    except Exception as error:
        log.debug("torch.export said:\n%s", chatter.getvalue())
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompileError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {cause} — "
            "ember.compile needs the model as one graph; torch.compile(model, backend=\"ember\") splits it at "
            "graph breaks and compiles the pieces it can"
        ) from error
    sys.stderr.write(chatter.getvalue())
    with warnings.catch_warnings():  # torch 2.13's own run_decompositions trips its pytree deprecation
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
        return exported.run_decompositions(ember_decompositions())


def from_module(model: torch.nn.Module, example_inputs: Any) -> Captured:
    """Capture `model` on `example_inputs` and lower it to an ember Graph."""
    started = time.perf_counter()
    with task(f"capturing {type(model).__name__} with torch.export"):
        exported = capture(model, example_inputs)
    captured_at = time.perf_counter()
    signature = exported.graph_signature
    placeholders = [node for node in exported.graph.nodes if node.op == "placeholder"]
    weights: dict[str, torch.Tensor] = {}
    user_positions: list[str] = []
    for node, spec in zip(placeholders, signature.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            weights[node.name] = exported.state_dict[spec.target] if spec.target in exported.state_dict else exported.constants[spec.target]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            weights[node.name] = exported.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            user_positions.append(node.name)
        else:
            raise CompileError(f"export input {spec.arg} of kind {spec.kind.name} is not supported by ember")
    with task(f"lowering {len(exported.graph.nodes)} FX nodes to ember's IR"):
        graph = lower_fx(exported.graph_module, weights)
    constant_inputs = {
        position: node.meta.get("val")
        for position, node in enumerate(n for n in placeholders if n.name in user_positions)
        if not isinstance(node.meta.get("val"), torch.Tensor)
    }
    buffers = dict(exported.named_buffers())
    mutated = []
    for spec in signature.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            mutated.append(buffers[spec.target])
        elif spec.kind != OutputKind.USER_OUTPUT:
            raise CompileError(f"export output {spec.arg} of kind {spec.kind.name} is not supported by ember")
    seconds = {"capture": captured_at - started, "lower": time.perf_counter() - captured_at}
    log.debug("captured %s: %d nodes in %.2f s", type(model).__name__, len(graph.nodes), sum(seconds.values()))
    args, kwargs = normalize_inputs(example_inputs)
    return Captured(graph, exported.call_spec.in_spec, exported.call_spec.out_spec, len(args), tuple(kwargs),
                    constant_inputs, tuple(mutated), seconds)
