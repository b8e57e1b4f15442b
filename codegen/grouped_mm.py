"""ember's grouped matmul on the GPU: torch's grouped GEMM, which reads the offsets on the device (no host sync,
so a call can be captured in a CUDA graph), then the rows past the last offset zeroed.

torch's grouped GEMM leaves those rows as they were; ember's grouped_mm defines them as zero. A masked
fill over the whole result would read and write every element (46 µs a call on Mixtral's up-projection on an
H200); this kernel reads the last offset on the device, and only the programs holding rows past it store zeros.
The op's definition and its reference (one matmul per expert) are in ir.ops; this registers the CUDA path.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ..ir.ops import grouped_mm_reference
from .kernels import _direct_launch
from .source import KernelSource

BLOCK_ROWS = 16
BLOCK_COLUMNS = 256


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def zero_rows_from(out_ptr, offsets_ptr, last: tl.constexpr, rows, columns, row_stride,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
        first = tl.load(offsets_ptr + last).to(tl.int64)
        start = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
        if start + BLOCK_ROWS > first:  # a block of routed rows only stores nothing: it ends here
            row = start + tl.arange(0, BLOCK_ROWS)[:, None]
            zeros = tl.zeros((BLOCK_ROWS, BLOCK_COLUMNS), dtype=out_ptr.dtype.element_ty)
            for column_start in range(0, columns, BLOCK_COLUMNS):
                column = column_start + tl.arange(0, BLOCK_COLUMNS)[None, :]
                mask = (row >= first) & (row < rows) & (column < columns)
                tl.store(out_ptr + row * row_stride + column, zeros, mask=mask)

    return zero_rows_from


def zero_rows_from_last_offset(out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Set rows `offsets[-1]:` of the 2-D, row-contiguous `out` to zero, in place; returns `out`."""
    if out.dim() != 2 or out.stride(1) != 1 or offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"expected a row-contiguous 2-D result and 1-D offsets, got {tuple(out.shape)} "
                         f"strides {out.stride()} and offsets of shape {tuple(offsets.shape)}")
    rows, columns = out.shape
    programs, scalars = -(-rows // BLOCK_ROWS), (offsets.numel() - 1, rows, columns, out.stride(0))
    if out.is_cuda and not (out.data_ptr() | offsets.data_ptr()) & 15:
        direct = _direct(out.dtype, offsets.dtype, programs, scalars, out.get_device())
        if direct is not None:  # the compiled binary, without Triton's per-launch specialization (a third of it)
            direct.launch(programs, (out, offsets))
            return out
    _kernel()[(programs,)](out, offsets, *scalars, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS)
    return out


@functools.cache
def _direct(dtype: torch.dtype, offsets_dtype: torch.dtype, programs: int, scalars: tuple[int, ...], device: int) -> Any:
    """The kernel compiled for aligned pointers and these sizes on `device`, bound for launching directly
    (codegen's DirectLaunch), or None where Triton offers no direct launch (see codegen.kernels)."""
    source = KernelSource("zero_rows_from", "", (), (), programs, scalars,
                          (("BLOCK_ROWS", BLOCK_ROWS), ("BLOCK_COLUMNS", BLOCK_COLUMNS)))
    return _direct_launch(_kernel(), source, (dtype, offsets_dtype), torch.device("cuda", device))


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, rows_covered: bool = False) -> torch.Tensor:
    """ember.grouped_mm: on a Hopper-class GPU in bfloat16, the grouped GEMM and the zeroed tail (none where the
    graph proved the offsets cover every row, optimizer.ranges); elsewhere the reference."""
    if not _device_grouped_mm(x, weight):
        return grouped_mm_reference(x, weight, offsets)
    out = torch._grouped_mm(x, weight, offs=offsets.to(torch.int32))
    return out if rows_covered else zero_rows_from_last_offset(out, offsets)


def _device_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == weight.dtype == torch.bfloat16
            and _capability(x.get_device()) >= (9, 0) and x.shape[1] % 8 == 0 and weight.shape[2] % 8 == 0)


@functools.cache
def _capability(device: int) -> tuple[int, int]:
    """A GPU's compute capability, asked of the driver once (a call asks on every grouped matmul)."""
    return torch.cuda.get_device_capability(device)


_LIBRARY = torch.library.Library("ember", "IMPL")
_LIBRARY.impl("grouped_mm", grouped_mm, "CUDA")
