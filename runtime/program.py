"""Program: a compiled model, callable like the original, with the report of how it was built.

The report prints as tables (rich, or plain text with `print`), so a user sees what compiling did at a glance.
"""
from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console, Group
from rich.table import Table
from torch.utils import _pytree as pytree

from ..errors import InputError
from ..codegen import GroupKernel
from ..ir import ArenaLayout, Graph, Node, TensorType
from ..ir.plans import FusionPlan
from ..ir.schedule import Schedule
from ..units import format_bytes, format_us
from .executor import Executor


@dataclass(frozen=True, slots=True)
class CompileReport:
    """What compiling did: graph size, op coverage, externs and time per stage."""

    node_count: int
    op_coverage: float
    extern_ops: Mapping[str, int]
    stage_seconds: Mapping[str, float]
    native_ops: Mapping[str, int] = field(default_factory=dict)
    memory: Mapping[str, Any] = field(default_factory=dict)
    """The arena: size, lower bound, plan status and gap, planning time (empty when compiled without one)."""
    fusion: Mapping[str, Any] = field(default_factory=dict)
    """Fused groups kept and turned down, with the predicted times behind each decision (empty without fusion)."""
    cuda_graphs: Mapping[str, Any] = field(default_factory=dict)
    """Whether a call on a GPU is captured and replayed, and why: asked for, or the cost model's predicted host
    and device time."""
    pass_changes: Mapping[str, Mapping[str, Mapping[str, int]]] = field(default_factory=dict)
    """Graph pass -> the nodes it removed, added and rewritten, by op (pipeline.graph_changes)."""
    pass_decisions: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Graph pass -> why it changed what it did, with the numbers behind it (optimizer.decisions)."""
    layer_skip: Mapping[str, Any] = field(default_factory=dict)
    """The skip plan applied (SkipPlan.to_dict: what was removed, the budget, calibration and held-out numbers);
    empty without layer skipping."""
    ffn_gate: Mapping[str, Any] = field(default_factory=dict)
    """The ffn gate asked for (FFNGate.to_dict: threshold, cold, warmup); empty without it. How many feed-forwards
    it gated is among pass_decisions."""
    expert_placement: Mapping[str, Any] = field(default_factory=dict)
    """The expert placement given (Placement.to_dict: each expert's GPUs per layer, the method, its fitted
    crossing share and gap); empty without one."""

    def __rich__(self) -> Group:
        return render_compile_report(self)

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=TEXT_WIDTH, force_terminal=False, color_system=None)
        console.print(self)
        return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


TEXT_WIDTH = 100
"""Columns of `str(report)`: wide enough for every table, narrow enough for a log."""

LISTED_OPS = 8
"""Native ops named in the summary, most frequent first; the rest are counted."""


def render_compile_report(report: CompileReport) -> Group:
    """The report as tables: a summary (nodes, coverage, memory, fusion, CUDA graphs), time per stage, extern ops."""
    summary = _table("ember compile report", show_header=False)
    summary.add_column("what", style="bold")
    summary.add_column("value")
    native = sum(report.native_ops.values())
    extern = sum(report.extern_ops.values())
    summary.add_row("nodes", f"{report.node_count} ({native} native, {extern} extern)")
    summary.add_row("op coverage", f"{report.op_coverage:.1%} of nodes run natively")
    if report.native_ops:
        summary.add_row("native ops", _counts(report.native_ops, LISTED_OPS))
    for what, value in _memory_rows(report.memory):
        summary.add_row(what, value)
    for what, value in _fusion_rows(report.fusion):
        summary.add_row(what, value)
    summary.add_row("CUDA graphs", _cuda_graphs_line(report.cuda_graphs))
    if report.layer_skip:
        summary.add_row("layer skipping", _skip_line(report.layer_skip))
    if report.ffn_gate:
        summary.add_row("ffn gate", ", ".join(f"{key} {value}" for key, value in report.ffn_gate.items()))
    if report.expert_placement:
        plan = report.expert_placement
        summary.add_row("expert placement", f"{plan['method']} on {plan['gpus']} GPUs, {len(plan['gpus_of'])} MoE layers "
                        f"x {plan['num_experts']} experts; {plan['fitted_cost']:.3f} of fitted transitions cross GPUs "
                        f"({plan['status']})")
    stages = _table("time per stage")
    stages.add_column("stage")
    stages.add_column("time", justify="right")
    stages.add_column("share", justify="right")
    total_s = sum(report.stage_seconds.values())
    for stage, seconds in report.stage_seconds.items():
        stages.add_row(stage, format_us(seconds * 1e6), f"{seconds / total_s:.1%}" if total_s else "-")
    stages.add_section()
    stages.add_row("total", format_us(total_s * 1e6), "100.0%" if total_s else "-", style="bold")
    parts = [summary, stages]
    if report.pass_changes:
        passes = _table("graph passes that changed the graph")
        passes.add_column("pass")
        passes.add_column("changed")
        passes.add_column("why")
        for name, changes in report.pass_changes.items():
            decisions = Counter(report.pass_decisions.get(name, ()))
            passes.add_row(name, "; ".join(f"{kind} {_counts(counts, LISTED_OPS)}" for kind, counts in changes.items()),
                           "\n".join(decision if count == 1 else f"{decision} (×{count})"
                                     for decision, count in decisions.items()))
        parts.append(passes)
    if report.extern_ops:
        externs = _table("extern ops (ATen)")
        externs.add_column("op")
        externs.add_column("nodes", justify="right")
        for op, count in sorted(report.extern_ops.items(), key=lambda item: (-item[1], item[0])):
            externs.add_row(op, str(count))
        parts.append(externs)
    return Group(*parts)


def _skip_line(plan: Mapping[str, Any]) -> str:
    loss = (f"calibration perplexity {plan['calibration_loss']:+.1%}" if plan["metric"] == "perplexity"
            else f"calibration divergence {plan['calibration_loss']:.4f}")
    return (f"{len(plan['removed'])} of {plan['sublayers']} sublayers removed by {plan['method']} "
            f"({plan['flops_removed']:.1%} of FLOPs, predicted {plan['predicted_speedup']:.2f}x); {loss}, "
            f"budget {plan['budget']:g}")


def _table(title: str, *, show_header: bool = True) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.ROUNDED, show_header=show_header)


def _counts(counts: Mapping[str, int], listed: int) -> str:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{op} ×{count}" for op, count in ranked[:listed])
    return text + (f", and {len(ranked) - listed} more" if len(ranked) > listed else "")


def _memory_rows(memory: Mapping[str, Any]) -> list[tuple[str, str]]:
    if not memory:
        return [("arena", "none (compiled with arena=False)")]
    return [
        ("arena", f"{format_bytes(memory['arena_bytes'])} ({memory['arenas']} arena{'s' * (memory['arenas'] != 1)})"),
        ("peak memory", f"{format_bytes(memory['peak_bytes'])} predicted, lower bound "
                        f"{format_bytes(memory['lower_bound_bytes'])}"),
        ("memory plan", f"{memory['status']}, gap {memory['gap']:.1%}, solved in {format_us(memory['plan_seconds'] * 1e6)}"),
    ]


def _fusion_rows(fusion: Mapping[str, Any]) -> list[tuple[str, str]]:
    if not fusion:
        return [("fusion", "off (no generated kernels)")]
    rows = [("fusion", f"{fusion['groups']} group(s) kept ({fusion['fused_nodes']} nodes), "
                       f"{fusion['rejected']} turned down")]
    kept = [decision for decision in fusion["decisions"] if decision["kept"]]
    if kept:
        rows.append(("fused time", f"{format_us(sum(d['unfused_us'] for d in kept))} unfused → "
                                   f"{format_us(sum(d['fused_us'] for d in kept))} fused (kept groups, predicted)"))
    return rows


def _cuda_graphs_line(cuda_graphs: Mapping[str, Any]) -> str:
    if not cuda_graphs:
        return "not decided"
    line = ("captured" if cuda_graphs["capture"] else "not captured") + f" ({cuda_graphs['decided_by']})"
    if "host_us" in cuda_graphs:
        line += (f": predicted host dispatch {format_us(cuda_graphs['host_us'])}, "
                 f"device {format_us(cuda_graphs['device_us'])}")
    return line


def coverage_report(graph: Graph, stage_seconds: Mapping[str, float], memory: Mapping[str, Any] | None = None,
                    fusion: Mapping[str, Any] | None = None, cuda_graphs: Mapping[str, Any] | None = None,
                    pass_changes: Mapping[str, Any] | None = None,
                    pass_decisions: Mapping[str, Sequence[str]] | None = None,
                    layer_skip: Mapping[str, Any] | None = None,
                    ffn_gate: Mapping[str, Any] | None = None,
                    expert_placement: Mapping[str, Any] | None = None) -> CompileReport:
    """Count native and extern nodes of the final graph."""
    native: dict[str, int] = {}
    extern: dict[str, int] = {}
    for node in graph.nodes:
        counts, key = (extern, node.target) if node.is_extern else (native, node.op)
        counts[key] = counts.get(key, 0) + 1
    total = len(graph.nodes)
    coverage = 1.0 if total == 0 else sum(native.values()) / total
    return CompileReport(total, coverage, extern, dict(stage_seconds), native, dict(memory or {}), dict(fusion or {}),
                         dict(cuda_graphs or {}), dict(pass_changes or {}), dict(pass_decisions or {}),
                         dict(layer_skip or {}), dict(ffn_gate or {}), dict(expert_placement or {}))


class Program:
    """A compiled model. Call it like the model; `graph` is the final IR, `report` says how it was built.
    A call that autograd records runs `captured` (the graph as captured, before any pass) step by step."""

    def __init__(
        self,
        graph: Graph,
        report: CompileReport,
        *,
        in_spec: pytree.TreeSpec | None = None,
        out_spec: pytree.TreeSpec | None = None,
        unflatten: Callable[[list[Any], pytree.TreeSpec], Any] = pytree.tree_unflatten,
        arg_count: int | None = None,
        kwarg_names: tuple[str, ...] = (),
        constant_inputs: Mapping[int, Any] | None = None,
        mutated_buffers: tuple[torch.Tensor, ...] = (),
        mutated_inputs: tuple[int, ...] = (),
        check_inputs: bool = True,
        schedule: Schedule | None = None,
        fusion: FusionPlan | None = None,
        layout: ArenaLayout | None = None,
        work: Sequence[Node | GroupKernel] | None = None,
        cuda_graphs: bool = False,
        name: str = "program",
        debug_dir: str | None = None,
        captured: Graph | None = None,
    ):
        self.graph = graph
        self.report = report
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.unflatten = unflatten
        self.arg_count = arg_count
        self.kwarg_names = kwarg_names
        self.constant_inputs = dict(constant_inputs or {})
        self.mutated_buffers = mutated_buffers
        self.mutated_inputs = mutated_inputs
        self.check_inputs = check_inputs
        self.fusion = fusion
        self.sample_inputs: list[torch.Tensor] | None = None
        """The tensor inputs of the example the program was compiled for (graph order): `save` keeps them, with the
        outputs they give, as the artifact's sample."""
        self.executor = Executor(graph, layout, work, cuda_graphs, name=name, debug_dir=debug_dir,
                                 written_back=len(mutated_buffers) + len(mutated_inputs), updated_inputs=mutated_inputs,
                                 captured=captured, schedule=schedule)
        self.derived_from = tuple({id(source): (source, source._version) for sources in graph.derived.values()
                                   for source in sources if not source.is_inference()}.values())
        """The weights a compile-time value was made from (a padded LM head, a folded table), with their versions then.
        Inference tensors keep no version and are left out (outside inference mode they cannot be updated in place)."""

    def save(self, path: str | Path, sample_inputs: Sequence[torch.Tensor] | None = None) -> Path:
        """Write the program to the directory `path`, for `ember.load` (see runtime/artifact.py); its sample is
        `sample_inputs` (tensor inputs in graph order), by default the example it was compiled for."""
        from .artifact import save_program  # artifact builds Programs: it imports this module

        return save_program(self, path, sample_inputs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = self.tensor_inputs(*args, **kwargs)
        return self.finish(self.run(tensors), tensors)

    def tensor_inputs(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """A call's tensor inputs in graph order, its structure and non-tensor inputs checked against the compiled ones."""
        if self.arg_count is not None and (len(args) != self.arg_count or set(kwargs) != set(self.kwarg_names)):
            raise InputError(
                f"expected {self.arg_count} positional argument(s) and keywords ({', '.join(self.kwarg_names)}), "
                f"got {len(args)} and ({', '.join(kwargs)})"
            )
        kwargs = {key: kwargs[key] for key in self.kwarg_names} if self.arg_count is not None else kwargs
        flat, spec = pytree.tree_flatten((args, kwargs))
        if self.in_spec is not None and spec != self.in_spec:
            raise InputError(f"expected (args, kwargs) shaped like {_shape_of(self.in_spec)}, got {_shape_of(spec)}")
        return self._tensor_inputs(flat)

    def finish(self, outputs: list[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Any:
        """The call's result from the run's flat outputs: buffers and `inputs` (the call's tensor inputs) the model
        updates in place written back, the rest in the model's own structure (a transformers ModelOutput with its
        cache, say)."""
        for buffer, value in zip(self.mutated_buffers, outputs):
            buffer.copy_(value)
        outputs = outputs[len(self.mutated_buffers):]
        for position, value in zip(self.mutated_inputs, outputs):
            if value is not inputs[position]:  # an update run in place already is the input
                inputs[position].copy_(value)
        outputs = outputs[len(self.mutated_inputs):]
        if self.out_spec is None:
            return tuple(outputs)
        return self.unflatten(outputs, self.out_spec)

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run on the flat list of tensor inputs, in graph order; returns the flat outputs. The first ones, new
        values of buffers and inputs the model updates in place, may live in a CUDA graph's memory until the next
        call: `finish` writes them back."""
        if self.check_inputs:
            check_inputs(self.graph, tensors)
        if self.stale_weights() and not self.executor.records_grad(tensors):
            raise InputError("a weight was updated in place after compiling, and a copy compiling made of it (a "
                             "padded weight) would be read stale: compile again (torch.compile(backend=\"ember\") "
                             "recompiles by itself)")
        return self.executor(tensors)

    def stale_weights(self) -> bool:
        """Whether a weight that a compile-time copy was made from has been updated in place since."""
        return any(source._version != version for source, version in self.derived_from)

    def _tensor_inputs(self, flat: list[Any]) -> list[torch.Tensor]:
        tensors = []
        for position, value in enumerate(flat):
            if position in self.constant_inputs:
                if value != self.constant_inputs[position]:
                    raise InputError(
                        f"input {position} was {self.constant_inputs[position]!r} when compiled and is {value!r} now; "
                        "non-tensor inputs are compiled in, so recompile for a new value"
                    )
            else:
                tensors.append(value)
        return tensors


class _Leaf:
    def __repr__(self) -> str:
        return "tensor"


def _shape_of(spec: pytree.TreeSpec) -> str:
    """A call's structure as Python would print it, each leaf shown as `tensor`: "((tensor,), {})"."""
    return repr(pytree.tree_unflatten([_Leaf()] * spec.num_leaves, spec))


def check_inputs(graph: Graph, tensors: list[Any]) -> None:
    """Raise InputError naming the first input whose count, type, shape, dtype or device differs."""
    if len(tensors) != len(graph.inputs):
        raise InputError(f"expected {len(graph.inputs)} tensor inputs, got {len(tensors)}")
    for value, tensor in zip(graph.inputs, tensors):
        expected: TensorType = value.type
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"input %{value.name}: expected a tensor {expected}, got {type(tensor).__name__}")
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            got = TensorType(tuple(tensor.shape), tensor.dtype, device=tensor.device.type)
            raise InputError(
                f"input %{value.name}: expected {expected}, got {got}; shapes and dtypes are compiled in, "
                "so recompile (or use torch.compile(backend=\"ember\"), which recompiles per shape)"
            )
        if tensor.device.type != expected.device:
            raise InputError(f"input %{value.name}: expected a tensor on {expected.device}, got one on {tensor.device}")
