"""ONNX export of ember's optimized IR (onnx_verify checks a file in onnxruntime against ember's own outputs).

Each node replays its op's torch reference (ember's own ops in standard ones) under torch's exporter: the file is
exactly the graph ember runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError
from ..ir import Graph, Node
from ..ir.ops import gated_linears_reference, linears_reference, qualified_name

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1 << 30
"""Weights past this many bytes in all go to a data file beside the model, unless asked otherwise."""

PROTOBUF_LIMIT_BYTES = 2 << 30
"""An ONNX file with its weights inside is one protocol buffer, which holds at most 2 GiB."""

QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnx_ir._convenience")
"""Loggers whose warnings during an export say nothing about the graph (torchvision's ops skipped, an empty list
attribute typed as ints); they are held to errors while it runs, and torch's own FutureWarning on LeafSpec is
silenced."""


@dataclass(frozen=True, slots=True)
class OnnxExport:
    """What `export_onnx` wrote."""

    path: Path
    opset: int
    node_count: int
    """ONNX nodes in the model's graph, after the exporter's constant folding."""
    model_bytes: int
    """Size of the .onnx file."""
    weight_bytes: int
    """Bytes of the weights (initializers), inside the file or in `data_path`."""
    external_data: bool
    data_path: Path | None
    """The file holding the weights when they are external (`<model>.onnx.data`)."""
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    decomposed: Mapping[str, int]
    """IR ops written in other standard ops (DECOMPOSITIONS) -> how many nodes."""


# ---------------------------------------------------------------------------------------------
# Ops ONNX has no counterpart for, in standard ops

def grouped_mm_decomposed(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                          rows_covered: bool = False) -> torch.Tensor:
    """ember.grouped_mm without reading the offsets on the host: every row times every expert's weight, then each
    row's own expert's product (its expert is the number of offsets at or below its index), zero past the last offset.

    Right for any offsets (empty experts, rows left over), at experts× the multiplies of the reference.
    """
    experts, columns = weight.shape[0], weight.shape[2]
    rows = torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype)
    expert = (offsets.unsqueeze(0) <= rows.unsqueeze(1)).sum(dim=1)
    products = torch.einsum("nk,ekm->nem", x, weight)
    chosen = expert.clamp(max=experts - 1).view(-1, 1, 1).expand(-1, 1, columns)
    selected = products.gather(1, chosen).squeeze(1)
    return torch.where((expert < experts).unsqueeze(1), selected, torch.zeros_like(selected))


def searchsorted_decomposed(sorted_sequence: torch.Tensor, values: torch.Tensor, *, out_int32: bool = False,
                            right: bool = False, side: str | None = None,
                            sorter: torch.Tensor | None = None) -> torch.Tensor:
    """aten.searchsorted.Tensor as a count: for each value, how many sorted entries lie below it (at or below it with
    `right`), every entry compared with every value along the last dim."""
    if sorter is not None:
        sorted_sequence = sorted_sequence.gather(-1, sorter)
    entries = sorted_sequence if sorted_sequence.dim() == 1 else sorted_sequence.unsqueeze(-2)
    probes = values.unsqueeze(-1)
    below = entries <= probes if right or side == "right" else entries < probes
    return below.sum(dim=-1, dtype=torch.int32 if out_int32 else torch.int64)


def empty_permuted_decomposed(size: Sequence[int], physical_layout: Sequence[int], *, dtype: torch.dtype | None = None,
                              layout: torch.layout | None = None, device: torch.device | None = None,
                              pin_memory: bool | None = None) -> torch.Tensor:
    """aten.empty_permuted as zeros: its values are undefined, and ONNX has no memory layouts."""
    return torch.zeros(size, dtype=dtype, device=device)


def elu_decomposed(x: torch.Tensor, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> torch.Tensor:
    """aten.elu by its formula (the exporter scales the positive side by input_scale too)."""
    return torch.where(x > 0, x * scale, torch.expm1(x * input_scale) * (alpha * scale))


def scatter_reduce_decomposed(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor, reduce: str, *,
                              include_self: bool = True) -> torch.Tensor:
    """aten.scatter_reduce.two; its "mean" (which ONNX's ScatterElements lacks) as a scattered sum over a scattered
    count, positions nothing is scattered to keeping their value."""
    if reduce != "mean":
        return torch.ops.aten.scatter_reduce.two(x, dim, index, src, reduce, include_self=include_self)
    counts = torch.zeros_like(x).scatter_add(dim, index, torch.ones_like(src))
    totals = (x if include_self else torch.zeros_like(x)).scatter_add(dim, index, src)
    divisors = (counts + 1 if include_self else counts).clamp(min=1)
    means = totals / divisors if x.is_floating_point() else torch.div(totals, divisors, rounding_mode="floor")
    return torch.where(counts > 0, means, x)


DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    torch.ops.ember.grouped_mm.default: grouped_mm_decomposed,
    torch.ops.ember.linears.default: linears_reference,  # one F.linear per weight
    torch.ops.ember.gated_linears.default: gated_linears_reference,  # the same, then a where per result
    torch.ops.aten.searchsorted.Tensor: searchsorted_decomposed,
    torch.ops.aten.empty_permuted.default: empty_permuted_decomposed,
    torch.ops.aten.elu.default: elu_decomposed,
    torch.ops.aten.scatter_reduce.two: scatter_reduce_decomposed,
}
"""Ops ONNX, or torch's exporter, has no right translation for (ember's own torch.library ops, a few of ATen's), by
overload -> a function of the same arguments in standard torch ops, which tracing follows and the exporter knows."""

REFUSED: dict[torch._ops.OpOverload, Callable[[Mapping[str, Any]], str | None]] = {
    torch.ops.aten.avg_pool2d.default:
        lambda attrs: "divisor_override" if attrs.get("divisor_override") is not None else None,
}
"""Ops the exporter translates, but wrongly for some arguments: overload -> (attrs -> the argument, or None)."""


# ---------------------------------------------------------------------------------------------
# The graph as a module torch's exporter can capture

class GraphModule(torch.nn.Module):
    """The IR as a torch module: forward runs each node's reference in order (DECOMPOSITIONS for the ops ONNX
    lacks), the weights are its buffers, on the CPU. Capturing it gives the ATen graph of exactly what ember runs."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.input_names = tuple(value.name for value in graph.inputs)
        self.output_names = graph.outputs
        self.buffer_names: dict[str, str] = {}
        for value in graph.params:
            buffer = _identifier(value.name, set(self.buffer_names.values()))
            self.register_buffer(buffer, graph.weights[value.name].detach().to("cpu").contiguous())
            self.buffer_names[value.name] = buffer
        self.steps = tuple((node, _reference(node)) for node in graph.nodes)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = dict(zip(self.input_names, inputs))
        values.update((name, getattr(self, buffer)) for name, buffer in self.buffer_names.items())
        for node, reference in self.steps:
            try:
                with _annotate(node):
                    results = reference([values[name] for name in node.inputs])
            except Exception as error:
                raise ExportError(f"node {node.name} ({_op_label(node)}) cannot be traced for ONNX: "
                                  f"{type(error).__name__}: {first_line(error)}") from error
            for value, position in zip(node.outputs, node.result_positions):
                values[value.name] = results[position]
        return tuple(values[name] for name in self.output_names)


def _reference(node: Node) -> Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]]:
    """The node's reference on the CPU: decomposed where DECOMPOSITIONS says, device attrs moved to the CPU; raises
    ExportError for an op ONNX cannot express."""
    definition = node.definition
    target = definition.target
    refused = REFUSED[target](node.attrs) if target in REFUSED else None
    if refused is not None:
        raise ExportError(f"node {node.name} ({_op_label(node)}): ONNX export cannot express {target} with "
                          f"{refused}={node.attrs[refused]!r}")
    if target in DECOMPOSITIONS:
        definition = dataclasses.replace(definition, target=DECOMPOSITIONS[target])
    elif getattr(target, "namespace", None) == "ember":
        raise ExportError(f"node {node.name} ({_op_label(node)}): ONNX has no op for {target} and ember knows no "
                          "decomposition of it (add one to codegen.onnx.DECOMPOSITIONS)")
    return definition.bind({key: _on_cpu(value) for key, value in node.attrs.items()})


def _on_cpu(attr: Any) -> Any:
    """An attr with any device in it made the CPU: the file is the same for every device."""
    if isinstance(attr, torch.device) and attr.type != "cpu":
        return torch.device("cpu")
    if isinstance(attr, tuple):
        return tuple(_on_cpu(item) for item in attr)
    return attr


def _annotate(node: Node) -> contextlib.AbstractContextManager:
    """Tag what tracing records for this node with its name, so a failed translation can name it."""
    annotate = getattr(torch.fx.traceback, "annotate", None)
    return annotate({"ember_node": node.name}) if annotate is not None else contextlib.nullcontext()


def _identifier(name: str, taken: set[str]) -> str:
    """`name` as a module attribute (word characters only), different from every name in `taken`."""
    base = re.sub(r"\W", "_", name)
    base = base if base and not base[0].isdigit() else f"w_{base}"
    candidate, suffix = base, 1
    while candidate in taken:
        candidate, suffix = f"{base}_{suffix}", suffix + 1
    return candidate


def _op_label(node: Node) -> str:
    return f"extern {node.target}" if node.is_extern else node.op


def first_line(error: BaseException) -> str:
    """The first line of an error's message (the rest is often a traceback of the exporter's own)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------------------------
# Export

def export_onnx(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None,
                opset: int | None = None) -> OnnxExport:
    """Write `graph` as an ONNX model at `path`: inputs named as the graph's inputs, outputs as its outputs, weights
    as initializers, in `<path>.data` beside it when `external_data` (by default, when they pass
    EXTERNAL_DATA_BYTES). `opset` defaults to the exporter's. Returns what was written; raises ExportError naming the
    node where ONNX cannot express an op."""
    path = Path(path)
    weight_bytes = sum(graph.weights[value.name].nbytes for value in graph.params)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_BYTES
    elif not external_data and weight_bytes > PROTOBUF_LIMIT_BYTES:
        raise ExportError(f"the weights take {weight_bytes} bytes, past the 2 GiB an ONNX file can hold: export with "
                          "external_data=True")
    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError("ONNX export needs the onnxscript package (torch's exporter translates ATen ops with it): "
                          "pip install onnxscript")
    data_path = path.with_name(path.name + ".data")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data_path.unlink(missing_ok=True)
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from error
    module = GraphModule(graph)
    with _quiet_exporter():
        exported = _capture(module, tuple(torch.zeros(value.type.shape, dtype=value.type.dtype)
                                          for value in graph.inputs))
        program = _translate(exported, graph, opset)
    output_names = _output_names(graph.outputs)
    _name_values(program.model, module.input_names, output_names)
    try:
        program.save(path, external_data=external_data)
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from error
    model = program.model
    written = OnnxExport(
        path=path, opset=model.opset_imports.get("", 0), node_count=len(model.graph), model_bytes=path.stat().st_size,
        weight_bytes=weight_bytes, external_data=external_data, data_path=data_path if data_path.exists() else None,
        input_names=tuple(value.name for value in model.graph.inputs),
        output_names=tuple(value.name for value in model.graph.outputs), decomposed=_decomposed(graph))
    log.info("exported %d IR nodes to %s: %d ONNX nodes, opset %d, %d bytes of weights%s; decomposed %s",
             len(graph.nodes), path, written.node_count, written.opset, weight_bytes,
             f" in {data_path.name}" if written.data_path else "", dict(written.decomposed) or "nothing")
    return written


def _decomposed(graph: Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.definition.target in DECOMPOSITIONS:
            counts[_op_label(node)] = counts.get(_op_label(node), 0) + 1
    return counts


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _capture(module: GraphModule, args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export's graph of the module, each node tagged with its IR node; an op that cannot be traced raises
    ExportError naming its node."""
    try:
        with torch.fx.traceback.preserve_node_meta():
            return torch.export.export(module, args, strict=False)
    except Exception as error:
        for cause in _causes(error):
            if isinstance(cause, ExportError):
                raise cause from None
        raise ExportError(f"torch.export could not capture the graph: {type(error).__name__}: "
                          f"{first_line(error)}") from error


def _translate(exported: torch.export.ExportedProgram, graph: Graph, opset: int | None) -> Any:
    """The exporter's ONNXProgram of the captured graph, constant-folded, every value named uniquely; an op ONNX
    cannot express raises ExportError naming its node."""
    try:
        program = torch.onnx.export(exported, (), None, dynamo=True, opset_version=opset, optimize=False,
                                    verbose=False)
        _name_values(program.model, (), ())
        program.optimize()  # constant folding names what it makes after the value, which must be unique first
    except Exception as error:
        raise _translation_error(error, exported, graph) from error
    return program


def _translation_error(error: Exception, exported: torch.export.ExportedProgram, graph: Graph) -> ExportError:
    """An ExportError naming the IR node behind the ATen node the exporter could not translate (by the tag tracing gave
    it, else by the op the message names), and the exporter's own first reason."""
    causes = _causes(error)
    text = "\n".join(str(cause) for cause in causes)
    by_name = {node.name: node for node in graph.nodes}
    traced = {node.name: node for node in (_as_the_exporter_decomposes(exported) or exported).graph.nodes}
    culprits: dict[str, Node] = {}
    for fx_name in re.findall(r"translating node %(\w+)", text):
        tag = (traced[fx_name].meta.get("custom") or {}).get("ember_node") if fx_name in traced else None
        if tag in by_name:
            culprits[tag] = by_name[tag]
    if not culprits:
        named = {f"{namespace}.{packet}.{overload}"
                 for namespace, packet, overload in re.findall(r"op='(\w+)\.(\w+)', overload='(\w+)'", text)}
        culprits = {node.name: node for node in graph.nodes if _qualified(node) in named}
    reason = f"{type(causes[-1]).__name__}: {first_line(causes[-1])}"
    if not culprits:
        return ExportError(f"torch's ONNX exporter failed: {reason}")
    nodes = list(culprits.values())
    listed = ", ".join(f"{node.name} ({_op_label(node)})" for node in nodes[:5])
    more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    ops = ", ".join(sorted({_qualified(node) for node in nodes}))
    return ExportError(f"ONNX cannot express {ops}: node {listed}{more} ({reason})")


def _as_the_exporter_decomposes(exported: torch.export.ExportedProgram) -> torch.export.ExportedProgram | None:
    """The captured graph decomposed as the exporter does before translating, whose node names its errors give (by
    its private passes: None where they have moved)."""
    try:
        from torch.onnx._internal.exporter import _fx_passes, _registration

        return _fx_passes.decompose_with_registry(exported, _registration.ONNXRegistry.from_torchlib())
    except Exception:
        return None


def _qualified(node: Node) -> str:
    target = node.definition.target
    return qualified_name(target) if isinstance(target, torch._ops.OpOverload) else str(target)


def _causes(error: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _output_names(outputs: Sequence[str]) -> list[str]:
    """The graph's output names; a repeated one (an ONNX graph names each output once) gets its position."""
    names: list[str] = []
    for position, name in enumerate(outputs):
        names.append(f"{name}_output_{position}" if name in outputs[:position] else name)
    return names


def _name_values(model: Any, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Name the inputs and outputs of an onnx_ir Model (changed in place) as given, and every other value uniquely:
    the exporter names values after torch.export's nodes (`cat_3`), whose names the IR may give another value. An
    output named as an input or weight is that value itself (ONNX lets an output be an input); another output that
    repeats a value, or is an input or weight under another name, gets an Identity of its own."""
    import onnx_ir

    graph = model.graph
    passed_through = {**graph.initializers, **dict(zip(input_names, graph.inputs))}
    seen: set[int] = set()
    for position, name in enumerate(output_names):
        value = graph.outputs[position]
        if name in passed_through and value is not passed_through[name]:  # the exporter's copy of it
            graph.outputs[position] = passed_through[name]
            if value.producer() is not None and not value.uses() and not value.is_graph_output():
                graph.remove(value.producer(), safe=True)
        elif id(value) in seen or value.is_graph_input() or value.is_initializer():
            copy = onnx_ir.Node("", "Identity", [value], num_outputs=1, name=f"output_{position}")
            graph.append(copy)
            copy.outputs[0].shape, copy.outputs[0].type = value.shape, value.type
            graph.outputs[position] = copy.outputs[0]
        seen.add(id(graph.outputs[position]))
    named = {id(value): name for value, name in [*zip(graph.inputs, input_names), *zip(graph.outputs, output_names)]}
    taken = set(named.values())
    for value in [*graph.inputs, *graph.initializers.values(), *(output for node in graph for output in node.outputs)]:
        if id(value) in named or not value.name:
            continue
        if value.name in taken:
            suffix = 1
            while f"{value.name}__{suffix}" in taken:
                suffix += 1
            value.name = f"{value.name}__{suffix}"
        taken.add(value.name)
    for value in [*graph.inputs, *graph.outputs]:
        if id(value) in named:
            value.name = named[id(value)]


__all__ = ["DECOMPOSITIONS", "OnnxExport", "REFUSED", "export_onnx", "first_line", "grouped_mm_decomposed",
           "searchsorted_decomposed"]
