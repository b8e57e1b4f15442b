"""The inspection report: where time and memory go, node by node, by the cost model's numbers.

Plain data (`Report`) plus renderers: a rich table, JSON, a roofline plot and the graph coloured by
predicted time. Extern nodes appear as rows marked `extern`, priced by bytes moved.
"""
from __future__ import annotations

import dataclasses
import html
import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..ir import Graph
from .cost import CostModel, DeviceProfile
from .liveness import buffers, live_bytes
from .fusion import fusion_summary, plan_fusion
from .memory_plan import MemoryPlan, plan_intervals

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

    def costliest(self, count: int = COSTLIEST) -> list[Row]:
        """The `count` rows with the largest predicted time."""
        return sorted(self.rows, key=lambda row: row.predicted_us, reverse=True)[:count]

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(dataclasses.replace(self, graph=None, plan=None)).items()
                if key not in ("graph", "plan")}
        data["costliest"] = [row.name for row in self.costliest()]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=160, force_terminal=False)
        render(self, console)
        return console.file.getvalue()


def build_report(graph: Graph, profile: DeviceProfile, model: str = "model") -> Report:
    """Price every node of `graph` on `profile` and measure live memory in execution order."""
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
    memory, plan = memory_summary(graph)
    totals = {
        "flops": sum(row.flops for row in rows), "bytes": sum(row.bytes for row in rows),
        "predicted_us": sum(row.predicted_us for row in rows), "nodes": len(rows),
        "extern_nodes": sum(row.extern for row in rows),
    }
    fusion = fusion_summary(plan_fusion(graph, CostModel(profile)))
    return Report(model, profile.name, tuple(rows), totals, memory, by_kind, fusion, graph, plan)


def memory_summary(graph: Graph, time_limit: float = PLAN_SECONDS) -> tuple[dict[str, Any], MemoryPlan]:
    """Live memory of `graph` in its order and the arena plans of its buffers: lower bound, no reuse, greedy, planned."""
    all_buffers = buffers(graph)
    per_step = live_bytes(all_buffers, len(graph.nodes))
    peak = max(per_step, default=0)
    intervals = ([b.size_bytes for b in all_buffers], [b.start for b in all_buffers], [b.end for b in all_buffers])
    greedy = plan_intervals(*intervals, method="greedy")
    planned = plan_intervals(*intervals, method="mip", time_limit=time_limit)
    memory = {
        "weights_bytes": sum(tensor.nbytes for tensor in graph.weights.values()),
        "inputs_bytes": sum(value.type.nbytes for value in graph.inputs),
        "peak_live_bytes": peak,
        "peak_step": per_step.index(peak) if per_step else 0,
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
        f"({totals['extern_nodes']} extern), {totals['flops'] / 1e9:,.2f} GFLOP, {totals['bytes'] / 1e6:,.1f} MB moved, "
        f"predicted {totals['predicted_us'] / 1e3:,.3f} ms"
    )
    kinds = Table(title="time by op kind")
    for column in ("kind", "nodes", "GFLOP", "MB", "predicted µs", "share"):
        kinds.add_column(column, justify="left" if column == "kind" else "right")
    for kind, entry in sorted(report.by_kind.items(), key=lambda item: -item[1]["predicted_us"]):
        kinds.add_row(kind, str(entry["nodes"]), f"{entry['flops'] / 1e9:,.2f}", f"{entry['bytes'] / 1e6:,.1f}",
                      f"{entry['predicted_us']:,.1f}", f"{entry['predicted_us'] / max(totals['predicted_us'], 1e-9):.1%}")
    console.print(kinds)
    console.print(
        f"memory: weights {memory['weights_bytes'] / 2**20:,.1f} MiB; activations peak "
        f"{memory['peak_live_bytes'] / 2**20:,.1f} MiB live at step {memory['peak_step']} in eager order "
        f"(the lower bound of any arena in this order; no reuse would need {memory['no_reuse_bytes'] / 2**20:,.1f} MiB)"
    )
    console.print(
        f"arena plan (256-byte aligned): lower bound {memory['lower_bound_bytes'] / 2**20:,.1f} MiB, greedy "
        f"{memory['greedy_bytes'] / 2**20:,.1f} MiB, planned {memory['planned_bytes'] / 2**20:,.1f} MiB "
        f"({memory['plan_status']}, gap {memory['plan_gap']:.1%}, {memory['plan_seconds']:.2f} s)"
    )
    fusion = report.fusion
    if fusion:
        kept = [d for d in fusion["decisions"] if d["kept"]]
        console.print(
            f"fusion: {fusion['groups']} pointwise groups kept ({fusion['fused_nodes']} nodes), "
            f"{fusion['rejected']} turned down; kept groups predicted {sum(d['unfused_us'] for d in kept):,.1f} µs "
            f"unfused → {sum(d['fused_us'] for d in kept):,.1f} µs fused"
        )
    rows = report.rows if all_rows else report.costliest()
    table = Table(title="every node" if all_rows else f"the {len(rows)} costliest nodes")
    for column in ("#", "node", "op", "shapes", "dtype", "GFLOP", "MB", "FLOP/B", "bound", "µs", "share"):
        table.add_column(column, justify="right" if column in ("#", "GFLOP", "MB", "FLOP/B", "µs", "share") else "left")
    for row in rows:
        shapes = " ".join(_shape(s) for s in row.input_shapes) + " → " + " ".join(_shape(s) for s in row.output_shapes)
        op = f"{row.op} [extern]" if row.extern else row.op
        table.add_row(str(row.index), row.name, op, shapes, row.dtype, f"{row.flops / 1e9:,.3f}", f"{row.bytes / 1e6:,.2f}",
                      f"{row.intensity:,.1f}", row.bound, f"{row.predicted_us:,.1f}", f"{row.share:.1%}")
    console.print(table)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def plot_roofline(report: Report, profile: DeviceProfile, path: str | Path) -> Path:
    """A roofline PNG: each kernel at (intensity, achieved FLOP/s), under the device's roofs."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 6))
    intensities = [10 ** x for x in _frange(-2, 4, 0.05)]
    bandwidth = profile.memory_bandwidth_gbps * 1e9
    roofs = [(unit, key, tflops) for unit, rates in profile.peak_tflops.items() for key, tflops in rates.items()
             if key in ("bf16", "fp32") and not (unit == "cuda" and key == "bf16")]
    for (unit, dtype_key, tflops), style in zip(roofs, ("--", ":", "-.")):
        roof = [min(tflops * 1e12, bandwidth * x) / 1e12 for x in intensities]
        axes.plot(intensities, roof, linestyle=style, color="0.3", linewidth=1, label=f"{unit} {dtype_key} roof")
    kinds = sorted({row.kind for row in report.rows if row.flops and row.predicted_us})
    for kind in kinds:
        points = [row for row in report.rows if row.kind == kind and row.flops and row.predicted_us]
        axes.scatter([row.intensity for row in points], [row.flops / row.predicted_us / 1e6 for row in points],
                     s=[10 + 300 * row.share for row in points], alpha=0.6, label=kind)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("arithmetic intensity (FLOP / byte)")
    axes.set_ylabel("predicted TFLOP/s")
    axes.set_title(f"{report.model} on {report.device}: roofline (marker area ∝ share of time)")
    axes.legend(fontsize=7, loc="lower right")
    axes.grid(True, which="both", alpha=0.3)
    target = Path(path)
    figure.savefig(target, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return target


def plot_memory(graph: Graph, memory: Mapping[str, Any], plan: MemoryPlan, path: str | Path, title: str = "model") -> Path:
    """A PNG of memory over execution steps: bytes live per step, and the arena plan as one box per buffer
    (offset by lifetime). `memory` and `plan` are `memory_summary(graph)`'s."""
    plt = _pyplot()
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    all_buffers = buffers(graph)
    per_step = live_bytes(all_buffers, len(graph.nodes))
    mib = 2.0 ** 20
    figure, (live, boxes) = plt.subplots(2, 1, figsize=(11, 8), sharex=True, height_ratios=(1, 2))
    live.step(range(len(per_step)), [b / mib for b in per_step], where="post", color="tab:blue", label="live")
    for key, style, label in (("lower_bound_bytes", ":", "lower bound"), ("greedy_bytes", "--", "greedy arena"),
                              ("planned_bytes", "-", "planned arena")):
        live.axhline(memory[key] / mib, linestyle=style, color="0.3", linewidth=1, label=label)
    live.set_ylabel("MiB")
    live.set_title(f"{title}: live memory by step, and the arena plan ({plan.status}, gap {plan.gap:.1%})")
    live.legend(fontsize=7, loc="upper right")
    sizes = [-(-b.size_bytes // 256) * 256 for b in all_buffers]
    patches = [Rectangle((b.start, offset / mib), b.end + 1 - b.start, size / mib)
               for b, offset, size in zip(all_buffers, plan.offsets, sizes)]
    boxes.add_collection(PatchCollection(patches, facecolor="tab:orange", edgecolor="0.2", linewidth=0.3, alpha=0.8))
    boxes.axhline(plan.arena_bytes / mib, color="0.3", linewidth=1)
    boxes.set_xlim(0, max(len(per_step), 1))
    boxes.set_ylim(0, max(plan.arena_bytes / mib, 1e-6) * 1.05)
    boxes.set_xlabel("execution step")
    boxes.set_ylabel("arena offset (MiB)")
    target = Path(path)
    figure.savefig(target, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return target


def write_graph(report: Report, path: str | Path) -> Path:
    """The graph coloured by predicted time, layered in topological order: `.svg`, or `.html` (the SVG
    and a table of every node, costliest first)."""
    plt = _pyplot()
    import networkx as nx

    target = Path(path)
    if target.suffix not in (".html", ".svg"):
        raise ValueError(f"graph output must be .html or .svg, not {target.suffix or 'no suffix'}")
    if report.graph is None:
        raise ValueError("this report carries no graph (reports read back from JSON do not)")
    graph = report.graph
    compute = graph.to_networkx().subgraph(node.name for node in graph.nodes).copy()
    for layer, names in enumerate(nx.topological_generations(compute)):
        for name in names:
            compute.nodes[name]["layer"] = layer
    positions = nx.multipartite_layout(compute, subset_key="layer", align="horizontal")
    by_name = {row.name: row for row in report.rows}
    times = [by_name[name].predicted_us for name in compute.nodes]
    figure, axes = plt.subplots(figsize=(12, max(6, 0.25 * (1 + max(nx.get_node_attributes(compute, "layer").values(), default=0)))))
    nx.draw_networkx_edges(compute, positions, ax=axes, alpha=0.3, arrows=False)
    collection = nx.draw_networkx_nodes(compute, positions, ax=axes, node_size=60, node_color=times,
                                        cmap="inferno_r", vmin=0, vmax=max(times, default=1))
    figure.colorbar(collection, ax=axes, label="predicted µs")
    axes.invert_yaxis()
    axes.set_title(f"{report.model} on {report.device}: nodes coloured by predicted time")
    axes.axis("off")
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    svg = buffer.getvalue()
    if target.suffix == ".svg":
        target.write_text(svg)
        return target
    listing = "\n".join(
        f"<tr><td>{row.index}</td><td>{html.escape(row.name)}</td><td>{html.escape(row.op)}</td><td>{row.bound}</td>"
        f"<td>{row.predicted_us:,.1f}</td><td>{row.share:.1%}</td></tr>"
        for row in report.costliest(len(report.rows))
    )
    target.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.model)}</title></head><body>"
        f"<h1>{html.escape(report.model)} on {html.escape(report.device)}</h1>"
        f"<p>predicted {report.totals['predicted_us'] / 1e3:,.3f} ms over {report.totals['nodes']} nodes</p>"
        f"{svg}<table border='1'><tr><th>#</th><th>node</th><th>op</th><th>bound</th><th>µs</th><th>share</th></tr>"
        f"{listing}</table></body></html>\n"
    )
    return target


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'ember[plot]'") from error
    return plt


def _frange(start: float, stop: float, step: float) -> list[float]:
    return [start + step * i for i in range(int(math.ceil((stop - start) / step)))]
