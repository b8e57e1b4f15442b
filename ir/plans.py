"""Plans as plain data, made by the optimizer and read by codegen and the runtime: which nodes run as one
generated kernel, and in what order the steps run; and where expert parallelism homes each token, which the
placement simulator assumes and the runtime does."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .graph import Node


@dataclass(frozen=True, slots=True)
class FusionGroup:
    """Nodes run as one kernel; `inputs` are the values it reads from outside, `outputs` the values it writes
    (read after it, or returned). The kernel iterates over `shape`, reducing its last `reduced` dims. The
    times are predicted device time, unfused and fused: ember replays CUDA graphs, so the host's dispatch is
    not what a fusion saves."""

    name: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shape: tuple[int, ...]
    reduced: int
    unfused_us: float
    fused_us: float

    @property
    def kind(self) -> str:
        """"reduction" when the kernel reduces dims, "pointwise" otherwise."""
        return "reduction" if self.reduced else "pointwise"


@dataclass(frozen=True, slots=True)
class FusionPlan:
    """Groups kept, groups the cost model turned down, and the order of steps (a group's or a node's name)."""

    groups: tuple[FusionGroup, ...]
    rejected: tuple[FusionGroup, ...]
    schedule: tuple[str, ...]



def reads_of(nodes: Sequence[Node]) -> tuple[str, ...]:
    """The values a group of nodes reads from outside itself, in order of first read."""
    inside = {value.name for node in nodes for value in node.outputs}
    return tuple(dict.fromkeys(name for node in nodes for name in node.inputs if name not in inside))


class FusionError(ValueError):
    """A fusion plan that would compute something else: a cycle, a node twice, a shape mismatch."""


def home_ranks(tokens: int, ranks: int) -> torch.Tensor:
    """int64 [tokens]: the rank each token starts on under expert parallelism, in contiguous chunks (token t on rank
    t * ranks // tokens)."""
    return torch.arange(tokens) * ranks // tokens
