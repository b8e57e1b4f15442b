"""Tensor types of IR values: shape, dtype and, where they matter, strides.

Shapes are static: a graph is specialised to the shapes it was captured with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
}
SUPPORTED_DTYPES = frozenset(DTYPE_NAMES)
"""Dtypes that native ops handle; a node touching any other dtype becomes an extern."""


@dataclass(frozen=True, slots=True)
class TensorType:
    """The static type of a tensor value; `device` is the device type ("cpu", "cuda"), since op rules
    differ by device (the dtypes a kernel accepts, the dtype of its saved statistics)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    strides: tuple[int, ...] | None = None
    device: str = "cpu"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def layout(self) -> tuple[int, ...]:
        """The strides to allocate at: the recorded ones, or row-major when none were recorded."""
        return self.strides if self.strides is not None else contiguous_strides(self.shape)

    @property
    def storage_bytes(self) -> int:
        """Bytes from the first element to the last at these strides: what a buffer of this type must hold."""
        if self.numel == 0:
            return 0
        return (1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.layout))) * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        return self.strides is None or self.strides == contiguous_strides(self.shape)

    def same_as(self, other: TensorType) -> bool:
        """Shape, dtype and device agree (strides are layout, not type)."""
        return self.shape == other.shape and self.dtype == other.dtype and self.device == other.device

    def __str__(self) -> str:
        name = DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))
        text = f"{name}[{', '.join(map(str, self.shape))}]"
        if not self.is_contiguous:
            text += f"@({', '.join(map(str, self.strides))})"
        return text if self.device == "cpu" else f"{text}:{self.device}"


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of a dense tensor of this shape."""
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def type_of(tensor: torch.Tensor) -> TensorType:
    """The TensorType of a real, fake or meta tensor; raises TypeError on symbolic sizes."""
    shape = tuple(tensor.shape)
    if not all(type(size) is int for size in shape):
        raise TypeError(f"symbolic shape {shape}")
    strides = tuple(tensor.stride()) if tensor.layout == torch.strided else None
    if strides is not None and not all(type(stride) is int for stride in strides):
        strides = None
    return TensorType(shape, tensor.dtype, strides, tensor.device.type)
