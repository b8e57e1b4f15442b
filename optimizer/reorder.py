"""Reorder operators to lower the peak of live memory, with unchanged results.

Greedy list scheduling over the dependence graph: of the nodes whose inputs are ready, run the one
whose outputs add the fewest bytes net of the inputs it lets go (ties keep the original order). The
new order is kept only when its peak is lower than the eager order's.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging

from ..ir import Graph, Node
from ..ir.schedule import schedule_of
from .liveness import peak_live_bytes

log = logging.getLogger(__name__)


def reorder_for_memory(graph: Graph) -> Graph:
    """The graph with its nodes in a topological order of lower (or equal) peak live bytes."""
    reordered = dataclasses.replace(graph, nodes=tuple(_schedule(graph)))
    before, after = peak_live_bytes(schedule_of(graph))[0], peak_live_bytes(schedule_of(reordered))[0]
    log.info("reordering: peak live bytes %d -> %d", before, after)
    return reordered if after < before else graph


def _schedule(graph: Graph) -> list[Node]:
    nodes = graph.nodes
    base = schedule_of(graph).views  # value -> the buffer that owns its bytes, whatever the order
    types = graph.types()
    owned = {name: types[name].storage_bytes for name in set(base.values())}  # buffer -> bytes
    pending_uses = {name: 0 for name in owned}
    for node in nodes:
        for name in set(node.inputs):
            if name in base:
                pending_uses[base[name]] += 1
    kept = {base[name] for name in graph.outputs if name in base}
    producer = {value.name: index for index, node in enumerate(nodes) for value in node.outputs}
    waiting_on = [len({producer[name] for name in node.inputs if name in producer}) for node in nodes]
    consumers: list[set[int]] = [set() for _ in nodes]
    for index, node in enumerate(nodes):
        for name in node.inputs:
            if name in producer:
                consumers[producer[name]].add(index)

    def delta(index: int) -> int:
        node = nodes[index]
        allocated = sum(owned.get(value.name, 0) for value in node.outputs)
        freed = sum(owned[buffer] for buffer in {base[name] for name in node.inputs if name in base}
                    if pending_uses[buffer] == 1 and buffer not in kept)
        return allocated - freed

    ready = [(delta(index), index) for index, count in enumerate(waiting_on) if count == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        _, index = heapq.heappop(ready)
        node = nodes[index]
        order.append(node)
        for buffer in {base[name] for name in node.inputs if name in base}:
            pending_uses[buffer] -= 1
        affected = set()
        for consumer in consumers[index]:
            waiting_on[consumer] -= 1
            if waiting_on[consumer] == 0:
                affected.add(consumer)
        # Freeing changes the scores of nodes already waiting: rescore the ready set.
        ready = [(delta(i), i) for _, i in ready] + [(delta(i), i) for i in affected]
        heapq.heapify(ready)
    return order
