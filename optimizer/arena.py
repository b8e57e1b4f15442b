"""Where each intermediate lives: the memory plan of a graph, as arenas over windows of its steps.

A call allocates each arena when its window starts and frees it when its window ends, so the arenas of
a program never all hold memory at once. The windows are the longest runs of steps for which one arena,
together with what lives outside it, keeps the call's peak at the lower bound (the most bytes live at any
step). Each arena is planned on its own (greedy, search, MIP). The value types that live outside an
arena are each allocated on every call by the step that makes them:

- graph outputs, and the buffers they view, which the caller keeps after the call;
- values whose life crosses from one window into another;
- outputs whose shape or dtype the op leaves to the implementation (normalizations' saved statistics);
- results of ops that cannot write into memory they are handed (attention, factories, ember's grouped
  matmul). In the arena these would be computed elsewhere and copied in, costing a copy and a slot for
  nothing.

One persistent arena could not match torch.compile's peak: the arena plus the outputs it hands out stay
above the lower bound whenever the intermediates peak before the outputs are made (a language model's
logits). Under CUDA graphs the arenas are allocated once, at capture, from the graph's own pool.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..ir import ALIGNMENT, Arena, ArenaLayout, Graph, TensorType
from ..ir.schedule import Buffer, Schedule, schedule_of
from .liveness import live_bytes, unrepeatable_updates, updates_written_over
from .memory_plan import MemoryPlan, plan_intervals
from .memory_verify import verify_plan


@dataclass(frozen=True, slots=True)
class ArenaPlan:
    """Where every arena-resident intermediate lives (the runtime's layout), and the plans behind it."""

    layout: ArenaLayout
    plans: tuple[MemoryPlan, ...]
    """One per arena, in the order of `layout.arenas`."""
    fresh: tuple[str, ...]
    """Owning intermediates allocated on each call by the step that makes them (see the module docstring)."""
    lower_bound: int
    """The most bytes live at any step, every buffer counted: no call of this program can peak lower."""
    peak_bytes: int
    """The predicted peak of a call: at each step, the open arenas plus the live values outside them."""
    seconds: float

    @property
    def slots(self) -> Mapping[str, tuple[int, int, TensorType]]:
        return self.layout.slots

    def summary(self) -> dict[str, float | int | str]:
        """Plain numbers for reports: arenas, predicted peak, lower bound, worst status and gap, planning time."""
        statuses = [plan.status for plan in self.plans]
        worst = next((s for s in ("heuristic", "feasible") if s in statuses), "optimal")
        return {"arenas": len(self.plans), "arena_bytes": max((p.arena_bytes for p in self.plans), default=0),
                "peak_bytes": self.peak_bytes, "lower_bound_bytes": self.lower_bound, "status": worst,
                "gap": max((plan.gap for plan in self.plans), default=0.0), "plan_seconds": self.seconds,
                "resident_values": len(self.slots), "fresh_values": len(self.fresh),
                "reused_values": len(self.layout.reuses)}


def plan_arena(graph: Graph, schedule: Schedule | None = None, *, updates: Mapping[str, str] | None = None,
               alignment: int = ALIGNMENT, time_limit: float = 10.0, verify: bool = False) -> ArenaPlan:
    """Plan the arenas of `graph` in the order of `schedule` (by default, its nodes' order); the plans share
    `time_limit` in proportion to their buffers. `updates` (input -> the output written back into it after each
    call) says which inputs the model updates, so that their updates may be written over them."""
    started = time.perf_counter()
    schedule = schedule_of(graph) if schedule is None else schedule
    bases = schedule.bases
    outside = {bases[name] for name in graph.outputs if name in bases}
    steps = {step.name for step in schedule.steps}
    for node in graph.nodes:
        if node.name in steps and not node.fills_given_memory and not node.returns_view:
            outside.update(value.name for value in node.outputs)
    all_buffers = schedule.buffers
    step_count = len(schedule.steps)
    windows = arena_windows(all_buffers, outside, step_count, alignment)
    members: list[list[Buffer]] = [[] for _ in windows]
    window_of = np.full(step_count, -1)
    for index, (first, last) in enumerate(windows):
        window_of[first:last + 1] = index
    for buffer in all_buffers:
        index = window_of[buffer.start]
        if buffer.name not in outside and buffer.end <= windows[index][1]:
            members[index].append(buffer)
    members = [group for group in members if group]
    resident_count = sum(len(group) for group in members)
    types = graph.types()
    plans, arenas, slots = [], [], {}
    for index, group in enumerate(members):
        first = min(b.start for b in group)
        sizes, starts, ends = [b.size_bytes for b in group], [b.start - first for b in group], [b.end - first for b in group]
        plan = plan_intervals(sizes, starts, ends, alignment=alignment,
                              time_limit=time_limit * len(group) / resident_count, method="mip")
        if verify:
            verify_plan(plan, sizes, starts, ends, alignment=alignment)
        plans.append(plan)
        arenas.append(Arena(plan.arena_bytes, first, max(b.end for b in group)))
        slots.update((b.name, (index, offset, types[b.name])) for b, offset in zip(group, plan.offsets))
    fresh = sorted(b.name for b in all_buffers if b.name not in slots)
    written = updates_written_over(schedule, graph, updates or {})
    layout = ArenaLayout(slots, tuple(arenas), {**schedule.reused, **written},
                         unrepeatable_updates(graph, written))
    lower = int(live_bytes(all_buffers, step_count, alignment).max(initial=0))
    return ArenaPlan(layout, tuple(plans), tuple(fresh), lower, _peak(all_buffers, layout, step_count, alignment),
                     time.perf_counter() - started)


def arena_windows(all_buffers: Sequence[Buffer], outside: set[str], steps: int,
                  alignment: int = ALIGNMENT) -> list[tuple[int, int]]:
    """Consecutive step windows [first, last], each as long as it can be while one arena for the buffers
    inside it, plus every buffer live outside it, stays within the lower bound at each of its steps."""
    live = live_bytes(all_buffers, steps, alignment)
    bound = live.max(initial=0)
    ending: dict[int, list[Buffer]] = {}
    for buffer in all_buffers:
        if buffer.name not in outside:
            ending.setdefault(buffer.end, []).append(buffer)
    windows, first = [], 0
    while first < steps:
        inside = np.zeros(steps, dtype=np.int64)
        longest = first
        for last in range(first, steps):
            for buffer in ending.get(last, ()):
                if buffer.start >= first:
                    inside[buffer.start:buffer.end + 1] += -(-buffer.size_bytes // alignment) * alignment
            span = slice(first, last + 1)
            if inside[span].max() + (live[span] - inside[span]).max() <= bound:
                longest = last
        windows.append((first, longest))
        first = longest + 1
    return windows


def _peak(all_buffers: Sequence[Buffer], layout: ArenaLayout, steps: int, alignment: int) -> int:
    """The most bytes a call holds at once: the open arenas and the live values outside them."""
    held = live_bytes([b for b in all_buffers if b.name not in layout.slots], steps, alignment)
    for arena in layout.arenas:
        held[arena.first_step:arena.last_step + 1] += arena.size_bytes
    return int(held.max(initial=0))
