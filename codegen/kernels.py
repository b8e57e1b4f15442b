"""Kernel handles the runtime calls: compiled once, launched on tensors."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import load_kernel
from .pointwise import PointwiseSource


@dataclass(slots=True)
class PointwiseKernel:
    """A generated pointwise kernel: call it with its input tensors and the output tensors to fill."""

    source: PointwiseSource
    debug_dir: str | None = None
    _function: Any = field(default=None, repr=False)

    def __call__(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        if self._function is None:
            self._function = load_kernel(self.source.name, self.source.source, self.debug_dir)
        if self.source.numel == 0:
            return
        grid = (-(-self.source.numel // self.source.block),)
        self._function[grid](*inputs, *outputs, self.source.numel, BLOCK=self.source.block)
