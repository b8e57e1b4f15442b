"""CUDA-graph replay of a call: the host issues one graph launch instead of every step.

Shapes are static per Program and the weights are held by reference, so one capture serves every later
call: inputs are copied into the captured input buffers and the graph is replayed. Memory a captured step
allocates (arenas included) comes from the graph's own pool, once, and the next replay overwrites it; so
the last few steps, those that make the outputs, run after the replay on their own, into memory of the
caller's (reading what the graph left in its pool, arenas still open included), and any output still in
the pool is copied out. A call that cannot be captured (an op that syncs
with the host, such as routing that reads expert counts) leaves the Program running step by step, with one
warning.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

WARM_UP_CALLS = 2


class GraphedCall:
    """`run_prefix` captured on buffers shaped like `example`, what it returns (tensors in the graph's memory)
    handed to `run_tail` after each replay; raises at construction if capture fails."""

    def __init__(self, run_prefix: Callable[[Sequence[torch.Tensor]], Any],
                 run_tail: Callable[[Sequence[torch.Tensor], Any], list[torch.Tensor]], example: Sequence[torch.Tensor]):
        self.inputs = [tensor.clone() for tensor in example]
        self.run_tail = run_tail
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # capture wants the lazy initialisations (cuBLAS handles, kernels) done
            for _ in range(WARM_UP_CALLS):
                run_prefix(self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.carried = run_prefix(self.inputs)
        self.pool = {tensor.untyped_storage().data_ptr() for tensor in pytree.tree_leaves(self.carried)
                     if isinstance(tensor, torch.Tensor)}

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for captured, given in zip(self.inputs, inputs):
            captured.copy_(given)
        self.graph.replay()
        outputs = self.run_tail(inputs, self.carried)
        return [output.clone() if output.untyped_storage().data_ptr() in self.pool else output for output in outputs]
