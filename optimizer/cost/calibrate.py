"""`ember calibrate`: measure the ceilings of the device at hand and write them as a DeviceProfile.

Large matmuls per dtype give the peaks, a device-to-device copy the bandwidths, a one-element op the
launch overhead, and a grid of matmul shapes the efficiency points the cost model interpolates.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from .model import ATTENTION_HEADS, CostModel, MatmulShape
from .profile import DTYPE_KEYS, DeviceProfile

log = logging.getLogger(__name__)

GPU_GRID = {"m": (16, 256, 2048, 8192), "n": (1024, 4096, 16384), "k": (1024, 4096)}
CPU_GRID = {"m": (8, 64, 256), "n": (64, 256), "k": (64, 256)}


def time_us(fn: Callable[[], object], device: torch.device, *, min_block_us: float = 2000.0, blocks: int = 5) -> float:
    """Median over `blocks` of the mean time per call, each block long enough to dwarf timer noise."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    synchronize()
    started = time.perf_counter()
    fn()
    synchronize()
    single_us = max((time.perf_counter() - started) * 1e6, 1.0)
    reps = max(1, math.ceil(min_block_us / single_us))
    for _ in range(min(reps, 10)):
        fn()
    synchronize()
    samples = []
    for _ in range(blocks):
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        synchronize()
        samples.append((time.perf_counter() - started) * 1e6 / reps)
    return statistics.median(samples)


def device_time_us(fn: Callable[[], object], device: torch.device, *, copies: int = 20) -> float:
    """Device time per call with the host out of the way: `copies` calls captured in a CUDA graph and
    replayed. On the CPU, where there is no such separation, the plain time per call."""
    if device.type != "cuda":
        return time_us(fn, device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(copies):
            fn()
    return time_us(graph.replay, device) / copies


def calibrate(device: str | torch.device | None = None, *, quick: bool = False, name: str | None = None) -> DeviceProfile:
    """Measure the device (CUDA when present, else the CPU) and return its profile."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    size = (2048 if quick else 8192) if gpu else (128 if quick else 512)
    matmul_dtypes = (torch.bfloat16, torch.float16, torch.float32) if gpu else (torch.float32,)
    peaks: dict[str, dict[str, float]] = {"tensor": {}, "cuda": {}}
    for dtype in matmul_dtypes:
        tflops = _matmul_tflops(size, size, size, dtype, device)
        unit = "tensor" if dtype in (torch.bfloat16, torch.float16) else "cuda"
        peaks[unit][DTYPE_KEYS[dtype]] = tflops
        log.info("matmul %d^3 %s: %.1f TFLOP/s", size, dtype, tflops)
    if not peaks["tensor"]:
        del peaks["tensor"]
    properties = torch.cuda.get_device_properties(device) if gpu else None
    l2_bytes = properties.L2_cache_size if gpu else 2 * 2**20
    dram_bytes = (2**28 if quick else 2**30) if gpu else 2**26
    memory_bandwidth = _copy_gbps(dram_bytes, device)
    l2_bandwidth = max(_copy_gbps(max(l2_bytes // 4, 2**16), device), memory_bandwidth)
    sm_count = properties.multi_processor_count if gpu else (os.cpu_count() or 1)
    draft = DeviceProfile(
        name=name or _default_name(device), peak_tflops=peaks, memory_bandwidth_gbps=memory_bandwidth,
        l2_bandwidth_gbps=l2_bandwidth, l2_bytes=l2_bytes, sm_count=sm_count,
        launch_overhead_us=_launch_us(device), dispatch_us={"default": 0.0}, asynchronous=gpu,
        matmul_base_efficiency=1.0, description=f"calibrated on {_device_name(device)} with torch {torch.__version__}",
        source="calibrated",
    )
    # The peak is the large square matmul itself: choose the base so the analytic model gives 1 there.
    base = 1.0 / CostModel(draft).analytic_efficiency(MatmulShape(1, size, size, size))
    points = _matmul_grid(draft, matmul_dtypes[0], CPU_GRID if not gpu or quick else GPU_GRID, device)
    attention = _attention_points(draft, device, quick)
    misaligned = _misaligned_factor(device, quick) if gpu else 1.0
    representatives = _representatives(device)
    floors = {kind: round(device_time_us(fn, device), 2) for kind, fn in representatives.items() if kind != "view"} if gpu else {}
    # Host dispatch last and twice, keeping the faster: a cold process reads slow.
    first, second = ({kind: round(time_us(fn, device, min_block_us=5000.0), 2) for kind, fn in representatives.items()}
                     for _ in range(2))
    dispatch = {kind: min(first[kind], second[kind]) for kind in first}
    dispatch["default"] = dispatch["pointwise"]
    floors["default"] = floors.get("pointwise", 0.0)
    return dataclasses.replace(
        draft, matmul_base_efficiency=base, matmul_efficiency={DTYPE_KEYS[matmul_dtypes[0]]: points},
        misaligned_matmul_factor=misaligned, attention_points=attention, dispatch_us=dispatch, kernel_floor_us=floors,
        attention_efficiency=statistics.median(point[3] for point in attention),
    )


def _launch_us(device: torch.device) -> float:
    """Device time per tiny kernel when the host is out of the way; 0 on the CPU, where the op is the dispatch."""
    if device.type != "cuda":
        return 0.0
    x = torch.zeros(16, device=device)
    return device_time_us(lambda: x.add_(1), device, copies=200)


def _representatives(device: torch.device) -> dict[str, Callable[[], object]]:
    """One small op of each kind, called through torch.ops as the executor calls it: its eager time is the
    host's dispatch for that kind, its CUDA-graph replay time the smallest kernel of the kind."""
    aten = torch.ops.aten
    a = torch.randn(4, 16, device=device)
    b = torch.randn(4, 16, device=device)
    square = torch.randn(16, 16, device=device)
    q = torch.randn(1, 2, 4, 16, device=device)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device).tril()
    index = torch.tensor([0, 2], device=device)
    representatives: dict[str, Callable[[], object]] = {
        "pointwise": lambda: aten.add.Tensor(a, b),
        "reduction": lambda: aten.sum.dim_IntList(a, [1]),
        "normalization": lambda: aten.native_layer_norm.default(a, [16], None, None, 1e-5),
        "matmul": lambda: aten.mm.default(a, square),
        "attention": lambda: aten.scaled_dot_product_attention.default(q, q, q, mask),
        "data": lambda: aten.index.Tensor(a, [index]),
        "routing": lambda: aten.topk.default(a, 2),
        "view": lambda: aten.view.default(a, [64]),
    }
    return representatives


def _misaligned_factor(device: torch.device, quick: bool) -> float:
    """Efficiency of a bf16 matmul with an odd N (GPT-2's 50257-word vocabulary) against N padded to 64."""
    m, k = (1024, 768) if quick else (4096, 768)
    odd, padded = 50257, 50304
    odd_tflops = _matmul_tflops(m, odd, k, torch.bfloat16, device)
    padded_tflops = _matmul_tflops(m, padded, k, torch.bfloat16, device)
    return round(min(1.0, odd_tflops / padded_tflops), 4)


def _matmul_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> float:
    """Device-side rate of one matmul shape (CUDA-graph replay on a GPU)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * n * k / device_time_us(lambda: a @ b, device) / 1e6


def _copy_gbps(nbytes: int, device: torch.device) -> float:
    """Device-to-device copy rate, counting bytes read plus written."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    return 2 * source.nbytes / time_us(lambda: target.copy_(source), device) / 1e3


def _matmul_grid(draft: DeviceProfile, dtype: torch.dtype, grid: dict, device: torch.device) -> tuple:
    peak = draft.peak_flops("tensor" if dtype in (torch.bfloat16, torch.float16) else "cuda", dtype)
    points = []
    for m in grid["m"]:
        for n in grid["n"]:
            for k in grid["k"]:
                achieved = _matmul_tflops(m, n, k, dtype, device) * 1e12
                points.append((m, n, k, round(min(achieved / peak, 1.0), 4)))
    return tuple(points)


def _attention_points(draft: DeviceProfile, device: torch.device, quick: bool) -> tuple:
    """Fraction of peak scaled_dot_product_attention reaches, per variant, sequence length and head dim.

    "mask" passes a contiguous boolean causal mask of shape (batch, 1, L, L), as transformers' models do
    (an expanded, stride-0 mask sends PyTorch down a slower path). Device time, by CUDA-graph replay.
    """
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    lengths = ((512,) if quick else (128, 512, 2048)) if gpu else (32,)
    head_dims = (64, 128) if quick and gpu else (32, 64, 128) if gpu else (16, 32)
    batch, heads = 4, ATTENTION_HEADS // 4
    peak = draft.peak_flops("tensor" if gpu else "cuda", dtype)
    points = []
    for length in lengths:
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device).tril()
        for head_dim in head_dims:
            q, k, v = (torch.randn(batch, heads, length, head_dim, dtype=dtype, device=device) for _ in range(3))
            flops = 4 * batch * heads * length * length * head_dim
            variants = {
                "plain": (lambda: F.scaled_dot_product_attention(q, k, v), flops),
                "causal": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), flops / 2),
                "mask": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), flops),
            }
            for variant, (fn, useful_flops) in variants.items():
                seconds = device_time_us(fn, device, copies=5) / 1e6
                points.append((variant, length, head_dim, round(min(1.0, useful_flops / seconds / peak), 4)))
    return tuple(points)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU"


def _default_name(device: torch.device) -> str:
    """`h200` from "NVIDIA H200", `cpu` for the CPU: the name `--device` finds it by."""
    if device.type != "cuda":
        return "cpu-calibrated"
    words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name(device).lower())
    return "-".join(word for word in words if word not in ("nvidia", "tesla")) + "-calibrated"
