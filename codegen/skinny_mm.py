"""ember.linears on the GPU: the linear layers of one input row, every weight read in one kernel.

With one row of input, `x @ weight.T` reads each weight once and does next to no arithmetic: its time is the
weights' bytes over the memory bandwidth plus a fixed cost per kernel, which dominates small weights (on an H200,
cuBLAS takes 16.6 µs for Llama's query, key and value projections, one kernel each, and this kernel 5.4 µs for the
three: bench/results/skinny_mm.*). Each program streams `block_n` rows of one weight, `block_k` columns at a time,
keeping a float32 sum per element and reducing it once at the end; the programs of each weight follow the previous
weight's. The op's definition and its reference (one F.linear per weight) are in ir.ops.

ember.gated_linears runs the same kernel with a skip flag read on the device (a gated feed-forward's,
optimizer.ffn_gate): where it is set, each program stores zeros and reads no weight, with no sync to the host, so a
skipped feed-forward costs a few tiny programs even inside a CUDA graph.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ir.ops import gated_linears_reference, linears_reference

MAX_WEIGHTS = 4
"""The most weights one launch reads (the kernel's weight arguments); more go in further launches."""

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class Tiling:
    """Weight rows a program computes, and columns it reads per step."""

    block_n: int
    block_k: int
    num_warps: int = 4


def tiling(rows: int, depth: int) -> Tiling:
    """Four rows per program up to 4,096 rows in all, eight beyond; 512 columns a step, or all of a shorter row: the
    fastest of a first sweep on an H200. (The committed sweep, bench/results/skinny_mm_tilings.*, finds two rows and
    1,024 columns faster still on every Llama shape; decoding has not been measured with them yet.)"""
    return Tiling(4 if rows <= 4096 else 8, min(512, max(16, 1 << (depth - 1).bit_length())))


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def linears(x_ptr, x_col, K, w0, w1, w2, w3, r0, r1, r2, r3, b0, b1, b2, b3, o0, o1, o2, o3, n0, n1, n2, n3,
                s1, s2, s3, skip_ptr, WEIGHTS: tl.constexpr, BIASES: tl.constexpr, GATED: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # which weight this program's rows belong to, and where its blocks start
        block = tl.program_id(0)
        w_ptr, w_row, bias_ptr, out_ptr, N, start, biased = w0, r0, b0, o0, n0, 0, BIASES & 1
        if block >= s1:
            w_ptr, w_row, bias_ptr, out_ptr, N, start, biased = w1, r1, b1, o1, n1, s1, BIASES & 2
        if WEIGHTS > 2 and block >= s2:
            w_ptr, w_row, bias_ptr, out_ptr, N, start, biased = w2, r2, b2, o2, n2, s2, BIASES & 4
        if WEIGHTS > 3 and block >= s3:
            w_ptr, w_row, bias_ptr, out_ptr, N, start, biased = w3, r3, b3, o3, n3, s3, BIASES & 8
        n = (block - start) * BLOCK_N + tl.arange(0, BLOCK_N)
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        runs = True
        if GATED:  # a skipped row's results are zero: no weight is read
            runs = tl.load(skip_ptr) == 0
        if runs:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(w_ptr + n[:, None] * w_row + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K),
                            other=0.0)
                x = tl.load(x_ptr + k * x_col, mask=k < K, other=0.0)
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            total = tl.sum(acc, axis=1)
            if biased != 0:
                total += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, total.to(out_ptr.dtype.element_ty), mask=n < N)

    return linears


def takes(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> bool:
    """Whether the kernel computes this call: one row on a GPU (or on the CPU in Triton's interpreter), in a float
    dtype every operand shares, each weight 2-D with contiguous rows, each bias 1-D and contiguous."""
    device = x.device
    on_device = x.is_cuda or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return (on_device and x.dtype in DTYPES and x.numel() == x.shape[-1] > 0
            and all(w.dim() == 2 and w.stride(1) == 1 and w.dtype == x.dtype and w.device == device for w in weights)
            and all(b is None or (b.dim() == 1 and b.stride(0) == 1 and b.dtype == x.dtype and b.device == device)
                    for b in biases))


def linears(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
            chosen: Tiling | None = None) -> list[torch.Tensor]:
    """ember.linears: where `takes` says so, one kernel per MAX_WEIGHTS weights (tiled as `chosen`, by default
    `tiling`), else the reference."""
    biases = list(biases) or [None] * len(weights)
    if not takes(x, weights, biases):
        return linears_reference(x, weights, biases)
    return _launches(x, weights, biases, None, chosen)


def gated_linears(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                  skip: torch.Tensor, chosen: Tiling | None = None) -> list[torch.Tensor]:
    """ember.gated_linears: linears' kernel reading the skip flag (one bool, on x's device) where `takes` says so,
    else the reference."""
    biases = list(biases) or [None] * len(weights)
    if not (takes(x, weights, biases) and skip.numel() == 1 and skip.dtype == torch.bool and skip.device == x.device):
        return gated_linears_reference(x, weights, biases, skip)
    return _launches(x, weights, biases, skip, chosen)


def _launches(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
              skip: torch.Tensor | None, chosen: Tiling | None) -> list[torch.Tensor]:
    """The results of one launch per MAX_WEIGHTS weights, gated by `skip` unless it is None."""
    results = [torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device) for weight in weights]
    for first in range(0, len(weights), MAX_WEIGHTS):
        _launch(x, weights[first: first + MAX_WEIGHTS], biases[first: first + MAX_WEIGHTS],
                results[first: first + MAX_WEIGHTS], chosen, skip)
    return results


def _launch(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
            results: Sequence[torch.Tensor], chosen: Tiling | None, skip: torch.Tensor | None = None) -> None:
    depth = x.shape[-1]
    rows = [weight.shape[0] for weight in weights]
    tiles = chosen or tiling(sum(rows), depth)
    blocks = [-(-count // tiles.block_n) for count in rows]
    starts = [sum(blocks[:index]) for index in range(1, MAX_WEIGHTS)]
    padding = MAX_WEIGHTS - len(weights)
    ws = [*weights, *[weights[0]] * padding]
    bs = [b if b is not None else results[0] for b in [*biases, *[None] * padding]]
    outs = [*results, *[results[0]] * padding]
    ns = [*rows, *[0] * padding]
    row_strides = [w.stride(0) for w in ws]
    present = sum(1 << index for index, bias in enumerate(biases) if bias is not None)
    _kernel()[(sum(blocks),)](x, x.stride(-1), depth, *ws, *row_strides, *bs, *outs, *ns, *starts,
                              x if skip is None else skip, WEIGHTS=len(weights), BIASES=present,
                              GATED=skip is not None, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                              num_warps=tiles.num_warps)


_LIBRARY = torch.library.Library("ember", "IMPL")
_LIBRARY.impl("linears", linears, "CUDA")
_LIBRARY.impl("gated_linears", gated_linears, "CUDA")
