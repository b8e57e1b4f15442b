"""The inspection report: where time and memory go, node by node, by the cost model's numbers.

Plain data (`Report`) and its terminal view, so the table, the JSON and the drawings (plots.py, graph_view.py) all
read one set of numbers; extern nodes appear as rows marked `extern`, priced by bytes moved.
"""
from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from typing import TYPE_CHECKING

from ..errors import PlanError
from ..ir import Graph
from ..ir.schedule import Schedule, schedule_of
from ..units import format_bytes, format_us
from .cost import CostModel
from .fusion import fusion_summary
from .liveness import peak_live_bytes
from .memory_plan import MemoryPlan, plan_intervals
from .routing_record import find_routers

if TYPE_CHECKING:
    from .pipeline import Compilation

COSTLIEST = 10
PLAN_SECONDS = 2.0
"""Time the arena plan may take inside a report (the full planner's default is 10 s)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One node's cost."""

    index: int
    name: str
    op: str
    kind: str
    extern: bool
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    dtype: str
    flops: int
    bytes: int
    intensity: float
    bound: str
    predicted_us: float
    share: float
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """Per-node rows, totals and memory of one model on one device."""

    model: str
    device: str
    rows: tuple[Row, ...]
    totals: Mapping[str, float]
    memory: Mapping[str, int]
    by_kind: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    fusion: Mapping[str, Any] = field(default_factory=dict)
    """Fusion groups the cost model kept and turned down on this device, with predicted times (see fusion.py)."""
    graph: Graph | None = field(default=None, repr=False, compare=False)
    """The graph that was priced (not part of the JSON), for drawing."""
    plan: MemoryPlan | None = field(default=None, repr=False, compare=False)
    """The arena plan of its buffers (not part of the JSON), for drawing."""
    order: Schedule | None = field(default=None, repr=False, compare=False)
    """The graph's own order of steps that `memory` and `plan` measure (not part of the JSON), for drawing."""
    fusion_groups: Mapping[str, str] = field(default_factory=dict)
    """The kept fusion group of each fused node, by node name."""
    arena: Mapping[str, Any] = field(default_factory=dict)
    """The arenas compile plans on this device (in its step order, fusion included): see ArenaPlan.summary."""
    capture: Mapping[str, Any] = field(default_factory=dict)
    """Whether compile would capture calls in a CUDA graph on this device, what decided it, and its numbers."""
    experts: Mapping[str, Any] = field(default_factory=dict)
    """A mixture-of-experts model's routing (MoE layers, experts, top-k) and the expert placement given, if any
    (Placement.to_dict); empty for a model without routers."""

    def costliest(self, count: int = COSTLIEST) -> list[Row]:
        """The `count` rows with the largest predicted time."""
        return sorted(self.rows, key=lambda row: row.predicted_us, reverse=True)[:count]

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(dataclasses.replace(self, graph=None, plan=None, order=None)).items()
                if key not in ("graph", "plan", "order")}
        data["costliest"] = [row.name for row in self.costliest()]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=160, force_terminal=False)
        render(self, console)
        return console.file.getvalue()


def build_report(compilation: Compilation, model: str = "model") -> Report:
    """Price every node of the compiled graph on the target's profile, with the plans compile made for it (fusion,
    arenas, capture) and, for drawing, live memory in the graph's own order."""
    graph, profile = compilation.graph, compilation.target.profile
    cost_model = CostModel(profile)
    types = graph.types()
    costs = [cost_model.node(node, types) for node in graph.nodes]
    total_us = sum(cost.predicted_us for cost in costs) or 1.0
    rows = []
    for index, (node, cost) in enumerate(zip(graph.nodes, costs)):
        rows.append(Row(
            index, node.name, node.target if node.is_extern else node.op, node.definition.kind, node.is_extern,
            tuple(types[name].shape for name in node.inputs), tuple(value.type.shape for value in node.outputs),
            str(node.outputs[0].type).split("[")[0], cost.flops, cost.bytes_moved, cost.intensity, cost.bound,
            cost.predicted_us, cost.predicted_us / total_us, node.source,
        ))
    by_kind: dict[str, dict[str, float]] = {}
    for row in rows:
        entry = by_kind.setdefault(row.kind, {"nodes": 0, "flops": 0, "bytes": 0, "predicted_us": 0.0})
        entry["nodes"] += 1
        entry["flops"] += row.flops
        entry["bytes"] += row.bytes
        entry["predicted_us"] += row.predicted_us
    order = schedule_of(graph)
    memory, plan = memory_summary(graph, order)
    totals = {
        "flops": sum(row.flops for row in rows), "bytes": sum(row.bytes for row in rows),
        "predicted_us": sum(row.predicted_us for row in rows), "nodes": len(rows),
        "extern_nodes": sum(row.extern for row in rows),
    }
    fusion = compilation.fusion
    groups = {name: group.name for group in fusion.groups for name in group.nodes} if fusion else {}
    arena = compilation.arena.summary() if compilation.arena else {}
    return Report(model, profile.name, tuple(rows), totals, memory, by_kind, fusion_summary(fusion), graph, plan, order,
                  groups, arena, dict(compilation.capture), experts_summary(compilation))


def experts_summary(compilation: Compilation) -> dict[str, Any]:
    """The routers of a mixture-of-experts graph and the placement given for its experts; empty without routers."""
    try:
        routers = find_routers(compilation.graph)
    except PlanError:
        return {}
    placement = compilation.options.expert_placement
    return {"moe_layers": len(routers), "experts": routers[0].num_experts, "k": routers[0].k,
            "placement": placement.to_dict() if placement is not None else None}


def memory_summary(graph: Graph, order: Schedule, time_limit: float = PLAN_SECONDS) -> tuple[dict[str, Any], MemoryPlan]:
    """Live memory of `graph` in the order of steps `order` and the arena plans of its buffers: lower bound, no
    reuse, greedy, planned."""
    all_buffers = order.buffers
    peak, peak_step = peak_live_bytes(order)
    intervals = ([b.size_bytes for b in all_buffers], [b.start for b in all_buffers], [b.end for b in all_buffers])
    greedy = plan_intervals(*intervals, method="greedy")
    planned = plan_intervals(*intervals, method="mip", time_limit=time_limit)
    memory = {
        "weights_bytes": sum(tensor.nbytes for tensor in graph.weights.values()),
        "inputs_bytes": sum(value.type.nbytes for value in graph.inputs),
        "peak_live_bytes": peak,
        "peak_step": peak_step,
        "no_reuse_bytes": sum(buffer.size_bytes for buffer in all_buffers),
        "lower_bound_bytes": planned.lower_bound,
        "greedy_bytes": greedy.arena_bytes,
        "planned_bytes": planned.arena_bytes,
        "plan_status": planned.status,
        "plan_gap": planned.gap,
        "plan_seconds": planned.solve_seconds,
    }
    return memory, planned


# ---------------------------------------------------------------------------------------------
# Renderers

def render(report: Report, console: Console, *, all_rows: bool = False) -> None:
    """The terminal view: totals, time by op kind, memory, and the costliest nodes (or all of them)."""
    totals, memory = report.totals, report.memory
    console.print(
        f"[bold]{report.model}[/] on [cyan]{report.device}[/]: {totals['nodes']} nodes "
        f"({totals['extern_nodes']} extern), {totals['flops'] / 1e9:,.2f} GFLOP, {format_bytes(totals['bytes'])} moved, "
        f"predicted {format_us(totals['predicted_us'])}"
    )
    kinds = Table(title="time by op kind")
    for column in ("kind", "nodes", "GFLOP", "moved", "predicted µs", "share"):
        kinds.add_column(column, justify="left" if column == "kind" else "right")
    for kind, entry in sorted(report.by_kind.items(), key=lambda item: -item[1]["predicted_us"]):
        kinds.add_row(kind, str(entry["nodes"]), f"{entry['flops'] / 1e9:,.2f}", format_bytes(entry["bytes"]),
                      f"{entry['predicted_us']:,.1f}", f"{entry['predicted_us'] / max(totals['predicted_us'], 1e-9):.1%}")
    console.print(kinds)
    console.print(
        f"memory: weights {format_bytes(memory['weights_bytes'])}; activations peak "
        f"{format_bytes(memory['peak_live_bytes'])} live at step {memory['peak_step']} in eager order "
        f"(the lower bound of any arena in this order; no reuse would need {format_bytes(memory['no_reuse_bytes'])})"
    )
    console.print(
        f"one arena in that order (drawn by --plot-memory): lower bound {format_bytes(memory['lower_bound_bytes'])}, "
        f"greedy {format_bytes(memory['greedy_bytes'])}, planned {format_bytes(memory['planned_bytes'])} "
        f"({memory['plan_status']}, gap {memory['plan_gap']:.1%}, {memory['plan_seconds']:.2f} s)"
    )
    arena = report.arena
    if arena:
        console.print(
            f"arena plan as compile builds it ({arena['arenas']} arena(s), in its step order): largest "
            f"{format_bytes(arena['arena_bytes'])}, predicted peak {format_bytes(arena['peak_bytes'])}, lower bound "
            f"{format_bytes(arena['lower_bound_bytes'])} ({arena['status']}, gap {arena['gap']:.1%}, "
            f"{arena['plan_seconds']:.2f} s)"
        )
    fusion = report.fusion
    if fusion:
        kept = [d for d in fusion["decisions"] if d["kept"]]
        kinds = ", ".join(f"{sum(d['kind'] == kind for d in kept)} {kind}" for kind in ("reduction", "pointwise"))
        console.print(
            f"fusion: {fusion['groups']} groups kept ({kinds}; {fusion['fused_nodes']} nodes), "
            f"{fusion['rejected']} turned down; kept groups predicted {format_us(sum(d['unfused_us'] for d in kept))} "
            f"unfused → {format_us(sum(d['fused_us'] for d in kept))} fused"
        )
    if report.capture:
        decision = report.capture
        numbers = (f" (host {format_us(decision['host_us'])} against device {format_us(decision['device_us'])})"
                   if "host_us" in decision else "")
        console.print(f"CUDA graphs: {'captured' if decision['capture'] else 'not captured'}, decided by "
                      f"{decision['decided_by']}{numbers}")
    if report.experts:
        experts = report.experts
        plan = experts["placement"]
        where = (f"placed on {plan['gpus']} GPUs by {plan['method']} ({plan['replicas']} replicas per layer), "
                 f"{plan['fitted_cost']:.3f} of fitted top-{plan['k']} transitions cross GPUs ({plan['status']})"
                 if plan else "no placement given (ember place MODEL --gpus N fits one)")
        console.print(f"mixture of experts: {experts['moe_layers']} MoE layers x {experts['experts']} experts, "
                      f"top-{experts['k']}; {where}")
    rows = report.rows if all_rows else report.costliest()
    table = Table(title="every node" if all_rows else f"the {len(rows)} costliest nodes")
    numeric = ("#", "GFLOP", "moved", "FLOP/B", "µs", "share")
    for column in ("#", "node", "op", "shapes", "dtype", "GFLOP", "moved", "FLOP/B", "bound", "µs", "share"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for row in rows:
        shapes = " ".join(format_shape(s) for s in row.input_shapes) + " → " + " ".join(format_shape(s) for s in row.output_shapes)
        op = f"{row.op} [extern]" if row.extern else row.op
        table.add_row(str(row.index), row.name, op, shapes, row.dtype, f"{row.flops / 1e9:,.3f}", format_bytes(row.bytes),
                      f"{row.intensity:,.1f}", row.bound, f"{row.predicted_us:,.1f}", f"{row.share:.1%}")
    console.print(table)


def format_shape(shape: tuple[int, ...]) -> str:
    """`shape` as `[2,768]`, as the table and the graph view print it."""
    return "[" + ",".join(map(str, shape)) + "]"
