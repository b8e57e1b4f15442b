"""The offline frontend: torch.export a model, decompose to ember's ATen set, lower to IR.

torch.export sees the model's result as a flat tuple of tensors and ember rebuilds its containers at call time, so
a model may return any pytree (a transformers ModelOutput holding a DynamicCache, as decoders do by default).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from ..errors import CompileError
from ..results import register_transformers_caches
from ..ir import Graph
from ..progress import task
from .decompositions import ember_decompositions
from .lower import lower_fx
from .one_trace import export_decomposed, one_trace_supported

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Captured:
    """A lowered model and how to call it like the original.

    in_spec/out_spec: the pytree structure of (args, kwargs) and of the model's result.
    arg_count/kwarg_names: the call's positional arity and keyword names, for readable errors.
    constant_inputs: flat input position -> the value export specialised on (non-tensor inputs).
    mutated_buffers: the model buffers that the first graph outputs are written back to, in order.
    mutated_inputs: positions among the tensor inputs (graph input order) that the next outputs are written back
        to, in order: an input the model updates in place (a static KV cache handed in as an argument).
    stage_seconds: wall time of capture (export + decompositions) and of lowering.
    """

    graph: Graph
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    arg_count: int
    kwarg_names: tuple[str, ...]
    constant_inputs: Mapping[int, Any]
    mutated_buffers: tuple[torch.Tensor, ...]
    mutated_inputs: tuple[int, ...]
    stage_seconds: Mapping[str, float]


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """example_inputs as (args, kwargs): a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def capture(model: torch.nn.Module, example_inputs: Any) -> tuple[torch.export.ExportedProgram, pytree.TreeSpec]:
    """torch.export the model decomposed with ember's table; CompileError when export cannot.

    One trace where this torch allows it (`capture_in_one_trace`); else, or where that trace fails, torch.export
    and run_decompositions (`capture_in_two_traces`), whose errors are the ones reported.
    Returns the program, whose outputs are the leaves of the model's result, and the result's structure.
    """
    args, kwargs = normalize_inputs(example_inputs)
    register_transformers_caches()
    if not one_trace_supported():
        log.debug("torch %s lacks what one-trace capture uses: capturing in two traces", torch.__version__)
    else:
        try:
            return capture_in_one_trace(model, args, kwargs)
        except Exception as error:
            log.debug("one-trace capture of %s failed (%s: %s): capturing in two traces", type(model).__name__,
                      type(error).__name__, _first_line(error))
    return capture_in_two_traces(model, args, kwargs)


def capture_in_one_trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.export.ExportedProgram,
                                                                                    pytree.TreeSpec]:
    """`capture` by one trace straight to ember's decomposed ATen set; raises what torch raises."""
    chatter = io.StringIO()  # torch prints the partial graph of a failed export, twice
    try:
        with contextlib.redirect_stderr(chatter), _flat_result(model) as structures:
            decomposed = export_decomposed(model, args, kwargs, ember_decompositions())
    except Exception:
        log.debug("torch.export said:\n%s", chatter.getvalue())
        raise
    sys.stderr.write(chatter.getvalue())
    log.debug("captured %s in one trace", type(model).__name__)
    return decomposed, structures[-1]


def capture_in_two_traces(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.export.ExportedProgram,
                                                                                     pytree.TreeSpec]:
    """`capture` by torch.export.export and then run_decompositions, which traces the graph again."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stderr(chatter), _flat_result(model) as structures:
            exported = torch.export.export(model, args, kwargs)
    except Exception as error:
        log.debug("torch.export said:\n%s", chatter.getvalue())
        raise CompileError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {_first_line(error)} — "
            "ember.compile needs the model as one graph; torch.compile(model, backend=\"ember\") splits it at "
            "graph breaks and compiles the pieces it can"
        ) from error
    sys.stderr.write(chatter.getvalue())
    with warnings.catch_warnings():  # torch 2.13's own run_decompositions trips its pytree deprecation
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
        try:
            decomposed = exported.run_decompositions(ember_decompositions())
        except Exception as error:
            raise CompileError(
                f"torch.export captured {type(model).__name__} but its run_decompositions failed: "
                f"{type(error).__name__}: {_first_line(error)} — one known cause is an input that torch rebuilds "
                "by running tensor ops, such as a transformers DynamicCache passed in (past_key_values); "
                "torch.compile(model, backend=\"ember\") takes such inputs"
            ) from error
    log.debug("captured %s in two traces", type(model).__name__)
    return decomposed, structures[-1]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _flat_result(model: torch.nn.Module) -> Iterator[list[pytree.TreeSpec]]:
    """While open, `model` returns the leaves of its result as a tuple and the list collects the result's structure.

    torch.export's run_decompositions (in two-trace capture) retraces the exported graph and rebuilds the result's
    containers inside the trace; rebuilding a transformers DynamicCache runs tensor ops whose constants torch then loses
    ("Constant tensor lifted_tensor_0 is not in the constants dictionary"). With flat outputs nothing is rebuilt
    until ember's Program unflattens its outputs at call time.
    """
    structures: list[pytree.TreeSpec] = []

    def flatten(module: torch.nn.Module, args: Any, result: Any) -> tuple:
        leaves, structure = pytree.tree_flatten(result)
        structures.append(structure)
        return tuple(leaves)

    handle = model.register_forward_hook(flatten)
    try:
        yield structures
    finally:
        handle.remove()


def _join_tied_weights(placeholders: list[torch.fx.Node], weights: Mapping[str, torch.Tensor]) -> None:
    """Point the uses of a weight that is an earlier one under another name (GPT-2's LM head is its token
    embedding) at the earlier placeholder, so the graph holds it once: one-trace capture lifts each name apart."""
    first: dict[int, torch.fx.Node] = {}
    for node in placeholders:
        if node.name in weights:
            kept = first.setdefault(id(weights[node.name]), node)
            if kept is not node:
                node.replace_all_uses_with(kept)


def from_module(model: torch.nn.Module, example_inputs: Any) -> Captured:
    """Capture `model` on `example_inputs` and lower it to an ember Graph."""
    started = time.perf_counter()
    with task(f"capturing {type(model).__name__} with torch.export"):
        exported, out_spec = capture(model, example_inputs)
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
    _join_tied_weights(placeholders, weights)
    with task(f"lowering {len(exported.graph.nodes)} FX nodes to ember's IR"):
        graph = lower_fx(exported.graph_module, weights)
    constant_inputs = {
        position: node.meta.get("val")
        for position, node in enumerate(n for n in placeholders if n.name in user_positions)
        if not isinstance(node.meta.get("val"), torch.Tensor)
    }
    buffers = dict(exported.named_buffers())
    placeholder_of = {spec.target: node.name for node, spec in zip(placeholders, signature.input_specs)}
    tensor_inputs = [value.name for value in graph.inputs]
    mutated, mutated_inputs, written = [], [], set()
    for spec in signature.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION and not mutated_inputs:
            mutated.append(buffers[spec.target])
            written.add(placeholder_of[spec.target])
        elif spec.kind == OutputKind.USER_INPUT_MUTATION and spec.target in tensor_inputs:
            mutated_inputs.append(tensor_inputs.index(spec.target))
        elif spec.kind != OutputKind.USER_OUTPUT:
            raise CompileError(f"export output {spec.arg} of kind {spec.kind.name} is not supported by ember "
                               "(in this order)")
    graph = dataclasses.replace(graph, written=frozenset(written))
    seconds = {"capture": captured_at - started, "lower": time.perf_counter() - captured_at}
    log.debug("captured %s: %d nodes in %.2f s", type(model).__name__, len(graph.nodes), sum(seconds.values()))
    args, kwargs = normalize_inputs(example_inputs)
    return Captured(graph, exported.call_spec.in_spec, out_spec, len(args), tuple(kwargs),
                    constant_inputs, tuple(mutated), tuple(mutated_inputs), seconds)
