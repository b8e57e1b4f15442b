"""Matplotlib plots of a report: a roofline with the costliest nodes named, and memory over execution steps.

PNGs for a person to see where time and memory go; matplotlib is optional (`ember[plot]`), so only this module loads it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..ir import ALIGNMENT
from ..ir.schedule import Schedule
from .cost import DeviceProfile
from .inspect import COSTLIEST, Report, Row
from .liveness import live_bytes
from .memory_plan import MemoryPlan

LABEL_FONT_PT = 7


def plot_roofline(report: Report, profile: DeviceProfile, path: str | Path) -> Path:
    """A roofline PNG: each kernel at (intensity, achieved FLOP/s), under the device's roofs; the costliest points
    carry their node's name."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 6))
    intensities = [10 ** x for x in _frange(-2, 4, 0.05)]
    bandwidth = profile.memory_bandwidth_gbps * 1e9
    roofs = [(unit, key, tflops) for unit, rates in profile.peak_tflops.items() for key, tflops in rates.items()
             if key in ("bf16", "fp32") and not (unit == "cuda" and key == "bf16")]
    for (unit, dtype_key, tflops), style in zip(roofs, ("--", ":", "-.")):
        roof = [min(tflops * 1e12, bandwidth * x) / 1e12 for x in intensities]
        axes.plot(intensities, roof, linestyle=style, color="0.3", linewidth=1, label=f"{unit} {dtype_key} roof")
    plotted = [row for row in report.rows if row.flops and row.predicted_us]
    for kind in sorted({row.kind for row in plotted}):
        points = [row for row in plotted if row.kind == kind]
        axes.scatter([row.intensity for row in points], [_tflops(row) for row in points],
                     s=[10 + 300 * row.share for row in points], alpha=0.6, label=kind)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("arithmetic intensity (FLOP / byte)")
    axes.set_ylabel("predicted TFLOP/s")
    axes.set_title(f"{report.model} on {report.device}: roofline (marker area ∝ share of time)")
    axes.legend(fontsize=7, loc="lower right")
    axes.grid(True, which="both", alpha=0.3)
    _name_costliest_points(axes, plotted)
    target = Path(path)
    figure.savefig(target, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return target


def _tflops(row: Row) -> float:
    return row.flops / row.predicted_us / 1e6


def _name_costliest_points(axes: Any, rows: list[Row], count: int = COSTLIEST) -> None:
    """Label the `count` costliest points with their node's name (nodes at one point share a label: "name +2
    alike"), each label at the first spot beside its point that covers no labelled point and no earlier label."""
    points: dict[tuple[float, float], list[Row]] = {}
    for row in sorted(rows, key=lambda row: row.predicted_us, reverse=True):
        points.setdefault((round(math.log10(row.intensity), 3), round(math.log10(_tflops(row)), 3)), []).append(row)
    chosen = sorted(points.values(), key=lambda alike: alike[0].predicted_us, reverse=True)[:count]
    axes.figure.canvas.draw()
    renderer = axes.figure.canvas.get_renderer()
    to_points = 72 / axes.figure.dpi
    right_pt = axes.get_window_extent().x1 * to_points
    anchors = [tuple(value * to_points for value in axes.transData.transform((alike[0].intensity, _tflops(alike[0]))))
               for alike in chosen]
    placed = [(x - 4, y - 4, x + 4, y + 4) for x, y in anchors]
    for alike, (x_pt, y_pt) in sorted(zip(chosen, anchors), key=lambda pair: -pair[1][1]):
        head = alike[0]
        text = head.name + (f" +{len(alike) - 1} alike" if len(alike) > 1 else "")
        probe = axes.text(0, 0, text, fontsize=LABEL_FONT_PT)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        width_pt, height_pt = extent.width * to_points, extent.height * to_points + 1
        sides = (1, -1) if x_pt + 8 + width_pt < right_pt else (-1, 1)
        for lift, side in ((lift * height_pt, side) for lift in (0, 1, -1, 2, -2, 3, -3, 4, -4) for side in sides):
            left = x_pt + 8 if side > 0 else x_pt - 8 - width_pt
            box = (left, y_pt + lift - height_pt / 2, left + width_pt, y_pt + lift + height_pt / 2)
            if not any(box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]
                       for other in placed):
                break
        placed.append(box)
        axes.annotate(text, (head.intensity, _tflops(head)), xytext=(box[0] - x_pt, lift), textcoords="offset points",
                      fontsize=LABEL_FONT_PT, va="center", ha="left", color="0.1",
                      bbox={"boxstyle": "square,pad=0", "facecolor": "white", "edgecolor": "none", "alpha": 0.7},
                      arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.5} if lift else None)


def plot_memory(order: Schedule, memory: Mapping[str, Any], plan: MemoryPlan, path: str | Path, title: str = "model") -> Path:
    """A PNG of memory over the steps of `order`: bytes live per step, and the arena plan as one box per buffer
    (offset by lifetime). `memory` and `plan` are `memory_summary(graph, order)`'s."""
    plt = _pyplot()
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    all_buffers = order.buffers
    per_step = live_bytes(all_buffers, len(order.steps))
    scale, unit = _axis_unit(max([*per_step, plan.arena_bytes, memory["greedy_bytes"]]))
    figure, (live, boxes) = plt.subplots(2, 1, figsize=(11, 8), sharex=True, height_ratios=(1, 2))
    live.step(range(len(per_step)), [b / scale for b in per_step], where="post", color="tab:blue", label="live")
    for key, style, label in (("lower_bound_bytes", ":", "lower bound"), ("greedy_bytes", "--", "greedy arena"),
                              ("planned_bytes", "-", "planned arena")):
        live.axhline(memory[key] / scale, linestyle=style, color="0.3", linewidth=1, label=label)
    live.set_ylabel(unit)
    live.set_title(f"{title}: live memory by step, and the arena plan ({plan.status}, gap {plan.gap:.1%})")
    live.legend(fontsize=7, loc="upper right")
    sizes = [-(-b.size_bytes // ALIGNMENT) * ALIGNMENT for b in all_buffers]
    patches = [Rectangle((b.start, offset / scale), b.end + 1 - b.start, size / scale)
               for b, offset, size in zip(all_buffers, plan.offsets, sizes)]
    boxes.add_collection(PatchCollection(patches, facecolor="tab:orange", edgecolor="0.2", linewidth=0.3, alpha=0.8))
    boxes.axhline(plan.arena_bytes / scale, color="0.3", linewidth=1)
    boxes.set_xlim(0, max(len(per_step), 1))
    boxes.set_ylim(0, max(plan.arena_bytes / scale, 1e-6) * 1.05)
    boxes.set_xlabel("execution step")
    boxes.set_ylabel(f"arena offset ({unit})")
    target = Path(path)
    figure.savefig(target, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return target


def _axis_unit(largest_bytes: float) -> tuple[float, str]:
    """The binary unit that keeps `largest_bytes` at 1 or more, as (its size in bytes, its name), for a plot axis."""
    for power, unit in reversed(list(enumerate(("B", "KiB", "MiB", "GiB", "TiB")))):
        if largest_bytes >= 1024 ** power:
            return 1024.0 ** power, unit
    return 1.0, "B"


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
