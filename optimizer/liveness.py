"""Buffer lifetimes in execution order: what memory planning and `inspect` measure peaks from.

A buffer is a node output that owns memory; views share their base's buffer and extend its life. An
elementwise step (a fused pointwise or row kernel, an ATen pointwise op with out=) writes a result over an
input it reads for the last time when both have the same type, as Inductor does: the result then shares the
input's buffer. Graph inputs and weights are not buffers (they live outside the program's arena).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from ..ir import Graph, Node, TensorType, Value
from ..ir.schema import inplace_overload
from .intervals import live_per_step

if TYPE_CHECKING:
    from ..ir.plans import FusionPlan


@dataclass(frozen=True, slots=True)
class Buffer:
    """An intermediate that owns memory, live on the closed step interval [start, end]."""

    name: str
    size_bytes: int
    start: int
    end: int


StepHow = Literal["view", "elementwise", "in_place", "other"]
"""How a step writes its results: "view" (its results view its first input), "elementwise" (each result element
is computed, in one program, from input elements at its own index or row, so a result may overwrite an input of
its type), "in_place" (elementwise, or overwriting positions of its first input, but only over its first input,
through the op's in-place variant) or "other"."""


class StepSpec(NamedTuple):
    """One step of execution: a node, or a fusion group run as one kernel."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[Value, ...]
    how: StepHow


def _how(node: Node) -> StepHow:
    if node.returns_view:
        return "view"
    if node.definition.overwrites and inplace_overload(node.definition.target) is not None:
        return "in_place"  # its first input with positions written: written over it where it dies, not copied first
    if node.definition.kind != "pointwise" or node.is_cast or node.is_extern:
        return "other"
    if node.fills_given_memory:
        return "elementwise"
    return "in_place" if inplace_overload(node.definition.target) is not None else "other"


def steps_of(graph: Graph, fusion: FusionPlan | None = None) -> list[StepSpec]:
    """The graph's steps in execution order: its nodes, or with a fusion plan, its schedule (a group is one
    step that writes only the values read after it)."""
    nodes = {node.name: node for node in graph.nodes}
    if fusion is None:
        return [StepSpec(node.name, node.inputs, node.outputs, _how(node)) for node in graph.nodes]
    groups = {group.name: group for group in fusion.groups}
    types = graph.types()
    steps: list[StepSpec] = []
    for name in fusion.schedule:
        if name in groups:
            group = groups[name]
            steps.append(StepSpec(name, group.inputs, tuple(Value(v, types[v]) for v in group.outputs), "elementwise"))
        else:
            node = nodes[name]
            steps.append(StepSpec(name, node.inputs, node.outputs, _how(node)))
    return steps


def base_of(graph: Graph, fusion: FusionPlan | None = None) -> dict[str, str]:
    """Intermediate value -> the owning intermediate whose memory it uses: itself, unless it is a view or an
    elementwise result written over an input (see `reuses`)."""
    return _bases(graph, fusion)[0]


def reuses(graph: Graph, fusion: FusionPlan | None = None) -> dict[str, str]:
    """Result -> the input its step writes it over: one of the same type (shape, strides, dtype), dense, in an
    intermediate's memory that nothing reads later nor through another value in that step, and neither of
    them a graph output."""
    return _bases(graph, fusion)[1]


def updates_written_over(graph: Graph, updates: Mapping[str, str], fusion: FusionPlan | None = None) -> dict[str, str]:
    """Update -> the input it is written over, for each input the model updates (`updates`: input -> the value
    written back into it after the call) where that is safe: a step of its own (not inside a fused group) reading
    the input, either an overwriting op (above, not accumulating) over it or an elementwise op (a static cache's
    position counter, `count.add_(n)`), the last step to read the input or any view of it, the input dense and
    laid out as the update, returned once, as the update. Functional, a cache update copies the whole input and
    the write-back copies its result again: two copies of every layer's keys and values per decoded token.

    Only an overwriting op may run twice in place and leave what running once does; a capture's warm-up calls
    leave the other inputs as they are (`unrepeatable_updates`)."""
    steps = steps_of(graph, fusion)
    step_of = {step.name: index for index, step in enumerate(steps)}
    producers = {value.name: node for node in graph.nodes for value in node.outputs}
    grouped = {name for group in fusion.groups for name in group.nodes} if fusion is not None else set()
    types = graph.types()
    written: dict[str, str] = {}
    for source, value in updates.items():
        node = producers.get(value)
        if node is None or node.name in grouped or node.is_extern or source not in node.inputs \
                or source in graph.outputs or list(graph.outputs).count(value) != 1 \
                or not _same_memory_type(types[source], types[value]) or not _dense(types[source]):
            continue
        if node.definition.overwrites:
            fits = (node.inputs[0] == source and not node.attrs.get("accumulate", False)
                    and inplace_overload(node.definition.target) is not None)
        else:
            how = _how(node)
            fits = how == "elementwise" or (how == "in_place" and node.inputs[0] == source)
        views = _views_of(source, steps)
        last_read = max(at for at, step in enumerate(steps) if views.intersection(step.reads))
        if fits and last_read == step_of[node.name] and views.intersection(node.inputs) == {source}:
            written[value] = source
    return written


def unrepeatable_updates(graph: Graph, written: Mapping[str, str]) -> frozenset[str]:
    """The inputs among those `written` over (update -> input) whose update running twice leaves another value
    than running once (a counter's add, unlike a cache's index_copy)."""
    producers = {value.name: node for node in graph.nodes for value in node.outputs}
    return frozenset(source for value, source in written.items()
                     if value in producers and not producers[value].definition.overwrites)


def _views_of(source: str, steps: Sequence[StepSpec]) -> set[str]:
    """`source` and every value viewing its memory, through chains of view steps."""
    views = {source}
    for step in steps:
        if step.how == "view" and step.reads and step.reads[0] in views:
            views.update(value.name for value in step.writes)
    return views


def _dense(type_: TensorType) -> bool:
    return type_.storage_bytes == math.prod(type_.shape) * type_.dtype.itemsize


def _bases(graph: Graph, fusion: FusionPlan | None) -> tuple[dict[str, str], dict[str, str]]:
    steps = steps_of(graph, fusion)
    last_read: dict[str, int] = {}
    for index, (_, reads, _, _) in enumerate(steps):
        for name in reads:
            last_read[name] = index
    kept = set(graph.outputs)
    last_read.update((name, len(steps)) for name in kept)  # returned values are read after the last step
    types = graph.types()
    bases: dict[str, str] = {}
    base_last: dict[str, int] = {}  # owning value -> the last step reading it or anything sharing its memory
    reused: dict[str, str] = {}
    for index, (_, reads, writes, how) in enumerate(steps):
        taken: set[str] = set()
        for value in writes:
            name = value.name
            if how == "view":
                if reads and reads[0] in bases:
                    bases[name] = bases[reads[0]]
                else:
                    continue  # a view of an input or weight owns nothing of the program's
            else:
                bases[name] = name
                if how in ("elementwise", "in_place") and name not in kept:
                    candidates = reads[:1] if how == "in_place" else reads
                    source = _overwritable(name, candidates, reads, index, bases, base_last, types, kept | taken)
                    if source is not None:
                        reused[name], bases[name] = source, bases[source]
                        taken.add(bases[source])
            base = bases[name]
            base_last[base] = max(base_last.get(base, index), last_read.get(name, index))
    return bases, reused


def _overwritable(name: str, candidates: tuple[str, ...], reads: tuple[str, ...], step: int, bases: dict[str, str],
                  base_last: dict[str, int], types: Mapping[str, TensorType], excluded: set[str]) -> str | None:
    """The input among `candidates` that result `name` may be written over, if any: an intermediate or a dense
    view of one, laid out as the result is, whose memory nothing reads later or through another input here."""
    for source in candidates:
        base = bases.get(source)
        source_type = types[source]
        if (base is not None and base not in excluded and base_last[base] == step
                and _same_memory_type(source_type, types[name]) and _dense(source_type)
                and all(other == source or bases.get(other) != base for other in reads)):
            return source
    return None


def buffers(graph: Graph, fusion: FusionPlan | None = None) -> tuple[Buffer, ...]:
    """Every owning intermediate of the graph (values inside a fused group own nothing), with its lifetime in
    steps; graph outputs live to the last step."""
    steps = steps_of(graph, fusion)
    bases = base_of(graph, fusion)
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    size: dict[str, int] = {}
    for index, (_, reads, writes, _) in enumerate(steps):
        for name in reads:
            if name in bases:
                end[bases[name]] = index
        for value in writes:
            if bases.get(value.name) == value.name:
                start[value.name] = end[value.name] = index
                size[value.name] = value.type.storage_bytes
    last = len(steps) - 1
    for name in graph.outputs:
        if name in bases:
            end[bases[name]] = last
    return tuple(Buffer(name, size[name], start[name], end[name]) for name in start)


def live_bytes(all_buffers: Sequence[Buffer], steps: int, alignment: int = 1) -> np.ndarray:
    """Bytes live at each step, each buffer's size rounded up to `alignment`."""
    return live_per_step([b.size_bytes for b in all_buffers], [b.start for b in all_buffers],
                         [b.end for b in all_buffers], steps, alignment)


def peak_live_bytes(graph: Graph, all_buffers: Sequence[Buffer] | None = None) -> tuple[int, int]:
    """(max over steps of live bytes, the first step reaching it): the lower bound of any arena in this order.
    `all_buffers`: the graph's buffers, where the caller has them."""
    per_step = live_bytes(buffers(graph) if all_buffers is None else all_buffers, len(graph.nodes))
    if not per_step.size:
        return 0, 0
    step = int(per_step.argmax())
    return int(per_step[step]), step


def _same_memory_type(a: TensorType, b: TensorType) -> bool:
    """Whether element i of one lives where element i of the other does."""
    return (a.shape, a.dtype, a.layout, a.device) == (b.shape, b.dtype, b.layout, b.device)
