"""Memory questions over a schedule (`ir.schedule`): bytes live per step, the peak, and which updates of the
model's inputs can be written over them."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..ir import Graph
from ..ir.schedule import Buffer, Schedule, ScheduleStep, Writes, dense, same_memory_type
from ..ir.schema import inplace_overload
from .intervals import live_per_step


def updates_written_over(schedule: Schedule, graph: Graph, updates: Mapping[str, str]) -> dict[str, str]:
    """Update -> the input it is written over, for each input the model updates (`updates`: input -> the value
    written back into it after the call) where that is safe: a step of its own (not inside a fused group) reading
    the input, either an overwriting op (above, not accumulating) over it or an elementwise op (a static cache's
    position counter, `count.add_(n)`), the last step to read the input or any view of it, the input dense and
    laid out as the update, returned once, as the update. Functional, a cache update copies the whole input and
    the write-back copies its result again: two copies of every layer's keys and values per decoded token.

    Only an overwriting op may run twice in place and leave what running once does; a capture's warm-up calls
    leave the other inputs as they are (`unrepeatable_updates`)."""
    steps = schedule.steps
    producers = {value.name: node for node in graph.nodes for value in node.outputs}
    types = graph.types()
    written: dict[str, str] = {}
    for source, value in updates.items():
        node = producers.get(value)
        if node is None or value not in schedule.made or steps[schedule.made[value]].name != node.name \
                or node.is_extern or source not in node.inputs \
                or source in graph.outputs or list(graph.outputs).count(value) != 1 \
                or not same_memory_type(types[source], types[value]) or not dense(types[source]):
            continue
        if node.definition.overwrites:
            fits = (node.inputs[0] == source and not node.attrs.get("accumulate", False)
                    and inplace_overload(node.definition.target) is not None)
        else:
            how = steps[schedule.made[value]].how
            fits = how is Writes.ELEMENTWISE or (how is Writes.IN_PLACE and node.inputs[0] == source)
        views = _views_of(source, steps)
        last_read = max(at for at, step in enumerate(steps) if views.intersection(step.reads))
        if fits and last_read == schedule.made[value] and views.intersection(node.inputs) == {source}:
            written[value] = source
    return written


def unrepeatable_updates(graph: Graph, written: Mapping[str, str]) -> frozenset[str]:
    """The inputs among those `written` over (update -> input) whose update running twice leaves another value
    than running once (a counter's add, unlike a cache's index_copy)."""
    producers = {value.name: node for node in graph.nodes for value in node.outputs}
    return frozenset(source for value, source in written.items()
                     if value in producers and not producers[value].definition.overwrites)


def _views_of(source: str, steps: Sequence[ScheduleStep]) -> set[str]:
    """`source` and every value viewing its memory, through chains of view steps."""
    views = {source}
    for step in steps:
        if step.how is Writes.VIEW and step.reads and step.reads[0] in views:
            views.update(value.name for value in step.writes)
    return views


def live_bytes(all_buffers: Sequence[Buffer], steps: int, alignment: int = 1) -> np.ndarray:
    """Bytes live at each step, each buffer's size rounded up to `alignment`."""
    return live_per_step([b.size_bytes for b in all_buffers], [b.start for b in all_buffers],
                         [b.end for b in all_buffers], steps, alignment)


def peak_live_bytes(schedule: Schedule) -> tuple[int, int]:
    """(max over steps of live bytes, the first step reaching it): the lower bound of any arena in this order."""
    per_step = live_bytes(schedule.buffers, len(schedule.steps))
    if not per_step.size:
        return 0, 0
    step = int(per_step.argmax())
    return int(per_step[step]), step
