"""The memory-plan verifier: it never saw the solver. Two buffers live at one step never share a byte."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import PlanError
from ..ir.layout import ALIGNMENT


def overlapping_pair(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int],
                     offsets: Sequence[int]) -> tuple[int, int] | None:
    """The first pair of buffers that are live together and share bytes, or None."""
    order = sorted(range(len(sizes)), key=lambda i: starts[i])
    active: list[int] = []
    for index in order:
        active = [j for j in active if ends[j] >= starts[index]]
        low, high = offsets[index], offsets[index] + sizes[index]
        for other in active:
            if sizes[index] and sizes[other] and low < offsets[other] + sizes[other] and offsets[other] < high:
                return (other, index)
        active.append(index)
    return None


def verify_plan(plan, sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int], *, alignment: int = ALIGNMENT) -> None:
    """Raise PlanError unless `plan` places every buffer aligned, inside its arena, apart from every
    buffer live at the same time, and its arena is at least the lower bound it claims."""
    count = len(sizes)
    if len(plan.offsets) != count:
        raise PlanError(f"the plan places {len(plan.offsets)} buffers, the problem has {count}")
    aligned = [-(-size // alignment) * alignment for size in sizes]
    for index, (offset, size) in enumerate(zip(plan.offsets, aligned)):
        if offset < 0 or offset % alignment:
            raise PlanError(f"buffer {index}: offset {offset} is not a non-negative multiple of {alignment}")
        if offset + size > plan.arena_bytes:
            raise PlanError(f"buffer {index}: [{offset}, {offset + size}) ends past the arena of {plan.arena_bytes} bytes")
    pair = overlapping_pair(aligned, starts, ends, plan.offsets)
    if pair is not None:
        first, second = pair
        raise PlanError(f"buffers {first} and {second} are live together and overlap in memory")
    if plan.arena_bytes < plan.lower_bound or not 0 <= plan.gap <= 1:
        raise PlanError(f"arena {plan.arena_bytes} is below its lower bound {plan.lower_bound}, or gap {plan.gap} is off")
