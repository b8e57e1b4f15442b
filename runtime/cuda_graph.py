"""CUDA-graph replay of a whole call: the host issues one graph launch instead of every step.

Shapes are static per Program, the arena gives every intermediate a fixed address, and the weights
are held by reference, so one capture serves every later call: inputs are copied into the captured
input buffers, the graph is replayed, and the outputs are cloned, so what the caller keeps is never
overwritten by the next replay. A call that cannot be captured (an op that syncs with the host, such
as routing that reads expert counts) leaves the Program running step by step, with one warning.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

WARM_UP_CALLS = 2


class GraphedCall:
    """One captured call of `run` on buffers shaped like `example`; raises at construction if capture fails."""

    def __init__(self, run: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]], example: Sequence[torch.Tensor]):
        self.inputs = [tensor.clone() for tensor in example]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # capture wants the lazy initialisations (cuBLAS handles, kernels) done
            for _ in range(WARM_UP_CALLS):
                run(self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = run(self.inputs)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for captured, given in zip(self.inputs, inputs):
            captured.copy_(given)
        self.graph.replay()
        return [output.clone() for output in self.outputs]
