"""Where each intermediate lives: the memory plan of a graph, as offsets of its values in one arena.

Every owning intermediate gets a slot, except those allocated fresh on each call: graph outputs (and
the buffers they view), which the caller keeps after the next call overwrites the arena; outputs whose
shape or dtype the op leaves to the implementation (normalizations' saved statistics); and results of
ops that cannot write into memory they are handed (attention, factories, ember's grouped matmul), which
in the arena would be computed elsewhere and copied in, costing a copy and a slot for nothing.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..ir import ArenaLayout, Graph, TensorType
from .fusion import FusionPlan
from .liveness import base_of, buffers
from .memory_plan import MemoryPlan, plan_intervals
from .memory_verify import verify_plan


@dataclass(frozen=True, slots=True)
class ArenaPlan:
    """Where every arena-resident intermediate lives (the runtime's layout), and the plan behind it."""

    layout: ArenaLayout
    plan: MemoryPlan
    fresh: tuple[str, ...]
    """Owning intermediates allocated on each call instead (graph outputs, implementation-defined results,
    results of ops that allocate their own)."""
    seconds: float

    @property
    def slots(self) -> Mapping[str, tuple[int, TensorType]]:
        return self.layout.slots

    @property
    def arena_bytes(self) -> int:
        return self.layout.arena_bytes

    def summary(self) -> dict[str, float | int | str]:
        """Plain numbers for reports: arena size, lower bound, status, gap, planning time, values in and out of it."""
        return {"arena_bytes": self.arena_bytes, "lower_bound_bytes": self.plan.lower_bound, "status": self.plan.status,
                "gap": self.plan.gap, "plan_seconds": self.seconds, "resident_values": len(self.slots),
                "fresh_values": len(self.fresh)}


def plan_arena(graph: Graph, *, fusion: FusionPlan | None = None, alignment: int = 256, time_limit: float = 10.0,
               verify: bool = False) -> ArenaPlan:
    """Plan the arena of `graph` in its current order, or in the fusion plan's schedule (greedy, then search
    and MIP within `time_limit`)."""
    started = time.perf_counter()
    bases = base_of(graph, fusion)
    fresh = {bases[name] for name in graph.outputs if name in bases}
    grouped = {name for group in fusion.groups for name in group.nodes} if fusion is not None else set()
    for node in graph.nodes:
        if node.name in grouped:
            continue
        aliases = any(result.alias_info is not None for result in node.definition.schema.returns)
        if not node.fills_given_memory and not aliases:  # a view returned by an extern op is copied in instead
            fresh.update(value.name for value in node.outputs)
    resident = [buffer for buffer in buffers(graph, fusion) if buffer.name not in fresh]
    sizes = [buffer.size_bytes for buffer in resident]
    starts = [buffer.start for buffer in resident]
    ends = [buffer.end for buffer in resident]
    plan = plan_intervals(sizes, starts, ends, alignment=alignment, time_limit=time_limit, method="mip")
    if verify:
        verify_plan(plan, sizes, starts, ends, alignment=alignment)
    types = graph.types()
    slots = {buffer.name: (offset, types[buffer.name]) for buffer, offset in zip(resident, plan.offsets)}
    return ArenaPlan(ArenaLayout(slots, plan.arena_bytes), plan, tuple(sorted(fresh)), time.perf_counter() - started)
