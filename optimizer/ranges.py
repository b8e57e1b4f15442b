"""What the graph proves about integer values: the range each one's elements lie in, where it follows from how
it was made (expert choices from `topk` over E experts lie in [0, E)), and the passes that use it.

A mixture-of-experts layer as transformers writes it sorts its tokens' expert choices, counts them per expert
(`histc`), and turns the counts into the grouped matmul's offsets (`cumsum`); it masks tokens whose choice is
past the last expert (`>= E`: none are). From the ranges, the counts take in every choice, so the last offset
is the row count and the grouped matmul has no tail to zero; the mask is false everywhere, so the fill is
the value as it is; and as every choice has a bin of its own, the offsets are where each expert's run ends in
the sorted choices: one `searchsorted` instead of a cast, a histogram and a scan. On Mixtral each layer saves a
comparison, two tail kernels and three launches (four, where the scan takes two) per call.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..ir import Graph, Node, TensorType, Value
from ..ir.ops import op_name
from ..ir.types import type_of
from .canonicalize import eliminate_dead_code
from .decisions import record

log = logging.getLogger(__name__)

_CUMSUM, _HISTC, _SORT = torch.ops.aten.cumsum.default, torch.ops.aten.histc.default, torch.ops.aten.sort.default
_MASKED_FILL, _GROUPED_MM = torch.ops.aten.masked_fill.Scalar, torch.ops.ember.grouped_mm.default
"""The ops whose patterns the passes here match, by their overloads (the op table's targets)."""

Range = tuple[int, int]
"""The least and greatest value an integer tensor's elements can take."""

EXACT_INTEGERS = {torch.float64: 1 << 53, torch.float32: 1 << 24, torch.float16: 1 << 11, torch.bfloat16: 1 << 8}
"""The largest integer each floating dtype, and every integer below it, holds exactly (transformers counts experts
in float32 on the CPU)."""


def integer_ranges(graph: Graph) -> dict[str, Range]:
    """Each integer-valued tensor whose range the graph proves: the indices `topk` and `sort` return (positions
    along the dim they work on), and what keeps some of such a value's elements (a view, a copy, a sort's values,
    a cast to a type that holds every integer in the range)."""
    types, ranges = graph.types(), {}
    for node in graph.nodes:
        for value, position in zip(node.outputs, node.result_positions):
            known = _range(node, position, types, ranges)
            if known is not None and _holds(value.type.dtype, known):
                ranges[value.name] = known
    return ranges


def _range(node: Node, position: int, types: Mapping[str, TensorType], ranges: Mapping[str, Range]) -> Range | None:
    source = types[node.inputs[0]] if node.inputs else None
    definition = node.definition
    if position == definition.index_result:
        return (0, source.shape[node.attrs.get("dim", -1)] - 1) if source is not None and source.shape else None
    return ranges.get(node.inputs[0]) if definition.keeps_values else None


def _holds(dtype: torch.dtype, known: Range) -> bool:
    """Whether `dtype` holds every integer in `known` exactly."""
    if dtype in EXACT_INTEGERS:
        return -EXACT_INTEGERS[dtype] <= known[0] and known[1] <= EXACT_INTEGERS[dtype]
    if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        return False
    info = torch.iinfo(dtype)
    return info.min <= known[0] and known[1] <= info.max


def counted_total(name: str, producer: Mapping[str, Node], types: Mapping[str, TensorType],
                  ranges: Mapping[str, Range]) -> int | None:
    """The last element of `name` when the graph proves it: a running sum (`cumsum` along its one dim) of a
    histogram (`histc`) that counts every element of its input, whose range lies within the bins; that is, the
    input's element count."""
    node = producer.get(name)
    while node is not None and node.definition.converts:
        node = producer.get(node.inputs[0])
    histogram = _summed_histogram(node, producer, types)
    if histogram is None:
        return None
    counted = histogram.inputs[0]
    low, high = histogram.attrs.get("min", 0), histogram.attrs.get("max", 0)
    known = ranges.get(counted)
    if not (low == high == 0 or known is not None and low <= known[0] and known[1] <= high):
        return None  # min == max == 0 bins the data's own extent: every element counted
    return math.prod(types[counted].shape)


def _summed_histogram(node: Node | None, producer: Mapping[str, Node], types: Mapping[str, TensorType]) -> Node | None:
    """The histogram (`histc`, through integer casts of its counts) that `node` is a running sum of along its one
    dim, or None."""
    if node is None or node.definition.target != _CUMSUM or len(types[node.inputs[0]].shape) != 1:
        return None
    histogram = producer.get(node.inputs[0])
    while (histogram is not None and histogram.definition.converts
           and not histogram.outputs[0].type.dtype.is_floating_point):
        histogram = producer.get(histogram.inputs[0])
    return histogram if histogram is not None and histogram.definition.target == _HISTC else None


def cover_grouped_rows(graph: Graph) -> Graph:
    """Each grouped matmul whose offsets end at its row count, marked `rows_covered`: it has no rows past the
    last offset to zero."""
    ranges, types = integer_ranges(graph), graph.types()
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    nodes = []
    for node in graph.nodes:
        if node.definition.target != _GROUPED_MM or node.attrs.get("rows_covered"):
            nodes.append(node)
            continue
        rows = types[node.inputs[0]].shape[0]
        if counted_total(node.inputs[2], producer, types, ranges) == rows:
            record(f"a grouped matmul's offsets proven to end at its {rows} rows (a running sum of a histogram "
                   "counting every routed row): no tail to zero")
            node = dataclasses.replace(node, attrs={**node.attrs, "rows_covered": True})
        nodes.append(node)
    if all(a is b for a, b in zip(nodes, graph.nodes)):
        return graph
    return dataclasses.replace(graph, nodes=tuple(nodes))


MAX_SEARCHED_BINS = 1 << 16
"""The most bins a histogram may have for its running sum to become a search: histc places a value in its bin in
floating point, which puts each integer in its own bin exactly while there are few bins."""


def offsets_by_search(graph: Graph) -> Graph:
    """Each running sum of a histogram that gives every integer of its sorted input a bin of its own, and counts
    every element, made one `searchsorted` of the sorted input for each bin's value: element b counts the inputs
    <= lo + b, which is the running sum at b. The bins' values are a constant of the graph."""
    ranges, types = integer_ranges(graph), graph.types()
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    nodes, params, weights = list(graph.nodes), list(graph.params), dict(graph.weights)
    for position, node in enumerate(nodes):
        found = _searched_histogram(node, producer, types, ranges)
        if found is None:
            continue
        sequence, low, bins = found
        sequence_type = types[sequence]
        try:
            with unset_fake_temporarily():  # the backend compiles under fake tensors; a constant is real
                values = torch.arange(low, low + bins, dtype=sequence_type.dtype, device=sequence_type.device)
        except RuntimeError as error:  # a device this machine lacks
            log.debug("%s stays a scan: its bins' values cannot be made here (%s)", node.name, error)
            continue
        record(f"a running sum over a {bins}-bin histogram of {sequence_type.shape} sorted integers made one "
               "searchsorted of them (one bin per integer their proved range holds)")
        boundaries = Value(f"{node.name}_bins", type_of(values))
        params.append(boundaries)
        weights[boundaries.name] = values
        nodes[position] = Node(node.name, op_name(torch.ops.aten.searchsorted.Tensor), (sequence, boundaries.name),
                               {"out_int32": node.outputs[0].type.dtype == torch.int32, "right": True, "side": None,
                                "sorter": None}, node.outputs,
                               source=node.source)
    if len(params) == len(graph.params):
        return graph
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(nodes), params=tuple(params), weights=weights))


def _searched_histogram(node: Node, producer: Mapping[str, Node], types: Mapping[str, TensorType],
                        ranges: Mapping[str, Range]) -> tuple[str, int, int] | None:
    """(the sorted sequence, the first bin's value, the bin count) when `node` is an integer running sum along the
    one dim of a histogram (through integer casts) of a sorted 1-D sequence (through casts that hold its values),
    with one bin per integer from lo to hi and every element within them; None otherwise."""
    result = node.outputs[0].type.dtype if len(node.outputs) == 1 else None
    histogram = _summed_histogram(node, producer, types)
    if histogram is None or result not in (torch.int32, torch.int64):
        return None
    counted, bins = histogram.inputs[0], histogram.attrs.get("bins", 100)
    low, high = histogram.attrs.get("min", 0), histogram.attrs.get("max", 0)
    known = ranges.get(counted)
    if (known is None or not all(float(bound).is_integer() for bound in (low, high))
            or not 1 < bins == high - low + 1 <= MAX_SEARCHED_BINS or not low <= known[0] <= known[1] <= high):
        return None
    sequence = producer.get(counted)
    while sequence is not None and sequence.definition.converts and sequence.inputs[0] in ranges:
        sequence = producer.get(sequence.inputs[0])
    if sequence is None or sequence.definition.target != _SORT or sequence.attrs.get("descending", False) \
            or len(types[sequence.inputs[0]].shape) != 1:
        return None
    values = next(value.name for value, position in zip(sequence.outputs, sequence.result_positions) if position == 0)
    return values, int(low), bins


def drop_decided_masks(graph: Graph) -> Graph:
    """A fill through a mask the ranges prove false everywhere (a comparison no element can pass) is a copy of
    the value, and the comparison goes."""
    ranges = integer_ranges(graph)
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    types = graph.types()
    nodes = []
    for node in graph.nodes:
        if (node.definition.target == _MASKED_FILL and _never(node.inputs[1], producer, ranges)
                and types[node.inputs[0]] == node.outputs[0].type):
            record(f"a fill through a mask that its comparison's proved range makes false everywhere "
                   f"({types[node.inputs[1]].shape}): a copy")
            node = Node(node.name, op_name(torch.ops.aten.clone.default), node.inputs[:1], {}, node.outputs, source=node.source)
        nodes.append(node)
    if all(a is b for a, b in zip(nodes, graph.nodes)):
        return graph
    return eliminate_dead_code(dataclasses.replace(graph, nodes=tuple(nodes)))


def _never(mask: str, producer: Mapping[str, Node], ranges: Mapping[str, Range]) -> bool:
    """Whether `mask` (through views) is a comparison of a value with a number that no value in its range passes."""
    node = producer.get(mask)
    while node is not None and node.definition.keeps_values:
        node = producer.get(node.inputs[0])
    if node is None or node.definition.compares is None or node.inputs[0] not in ranges:
        return False
    compare, (low, high), number = node.definition.compares, ranges[node.inputs[0]], node.attrs.get("other")
    return isinstance(number, (int, float)) and not compare(low, number) and not compare(high, number)
