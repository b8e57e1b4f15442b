"""`ember calibrate`: measure the ceilings of the device at hand and write them as a DeviceProfile.

Large matmuls per dtype give the peaks, a device-to-device copy the bandwidths, a one-element op the
launch overhead, and grids of matmul, attention and convolution shapes the efficiency points the cost model
interpolates.
Other work on the machine only ever adds time, so every figure is the fastest of repeated blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ...progress import task
from .model import ATTENTION_HEADS, TENSOR_CORE_DTYPES, CostModel, MatmulShape
from .profile import DTYPE_KEYS, DeviceProfile

log = logging.getLogger(__name__)

GPU_GRID = {"m": (16, 256, 2048, 8192), "n": (1024, 4096, 16384), "k": (1024, 4096)}
CPU_GRID = {"m": (8, 64, 256), "n": (64, 256), "k": (64, 256)}
STABLE_WITHIN = 0.01
"""A block counts as an improvement when it beats the fastest so far by more than this fraction."""
SINGLE_CALLS = 200
"""Single calls timed at least for a CPU dispatch figure, then more until that many in a row improve on
none, or the budget has passed."""


@dataclass(frozen=True, slots=True)
class Timing:
    """How long `time_us` keeps measuring one thing: `blocks` blocks at least, then until `blocks` in a
    row no longer improve on the fastest, or `budget_s` has passed."""

    blocks: int = 5
    budget_s: float = 0.5


QUICK = Timing(blocks=3, budget_s=0.1)
THOROUGH = Timing()


def time_us(fn: Callable[[], object], device: torch.device, *, min_block_us: float | None = None,
            blocks: int = THOROUGH.blocks, budget_s: float = THOROUGH.budget_s) -> float:
    """Least mean time per call over blocks of back-to-back calls.

    The least, not the median: another process can only slow a block down, so the fastest is the one
    nearest the call's own cost. Blocks last `min_block_us` (default 200 µs on the CPU, where the
    clock costs nanoseconds; 2 ms on a GPU, to dwarf the synchronisation); after `blocks` of them more
    follow until `blocks` in a row no longer improve on the fastest, or `budget_s` has passed.
    """
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    block_us = min_block_us if min_block_us is not None else (2000.0 if device.type == "cuda" else 200.0)
    single_us = min(_block_us(fn, 1, synchronize) for _ in range(3))
    reps = max(1, math.ceil(block_us / max(single_us, 0.1)))
    deadline = time.perf_counter() + budget_s
    fastest_us, taken, unimproved = math.inf, 0, 0
    while taken < blocks or (unimproved < blocks and time.perf_counter() < deadline):
        sample_us = _block_us(fn, reps, synchronize) / reps
        unimproved = 0 if sample_us < fastest_us * (1 - STABLE_WITHIN) else unimproved + 1
        fastest_us = min(fastest_us, sample_us)
        taken += 1
    return fastest_us


def _block_us(fn: Callable[[], object], reps: int, synchronize: Callable[[], object]) -> float:
    """Wall time of `reps` back-to-back calls, the device drained at the end."""
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize()
    return (time.perf_counter() - started) * 1e6


def host_time_us(fn: Callable[[], object], device: torch.device, timing: Timing = THOROUGH,
                 min_block_us: float | None = None) -> float:
    """Time per call as `time_us` measures it; on the CPU the faster of all threads and one thread.

    A parallel region waits for its slowest thread, and on a busy machine another process can hold
    that thread off its core for a whole scheduler slice: every multi-threaded call then takes
    milliseconds (a layer norm of 64 numbers read 12 ms). One thread never waits on another, so it bounds the
    op from above; on a quiet machine all threads win where they help.
    """
    measure = functools.partial(time_us, fn, device, min_block_us=min_block_us, blocks=timing.blocks,
                                budget_s=timing.budget_s)
    if device.type == "cuda" or torch.get_num_threads() == 1:
        return measure()
    threaded_us = measure()
    with _threads(1):
        return min(threaded_us, measure())


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run the body with `count` intra-op threads, restoring the number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_time_us(fn: Callable[[], object], device: torch.device, *, copies: int = 20,
                   timing: Timing = THOROUGH) -> float:
    """Device time per call with the host out of the way: `copies` calls captured in a CUDA graph and
    replayed. On the CPU, where there is no such separation, the host time per call."""
    if device.type != "cuda":
        return host_time_us(fn, device, timing=timing)
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
    return time_us(graph.replay, device, blocks=timing.blocks, budget_s=timing.budget_s) / copies


def calibrate(device: str | torch.device | None = None, *, quick: bool = False, name: str | None = None) -> DeviceProfile:
    """Measure the device (CUDA when present, else the CPU) and return its profile."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    timing = QUICK if quick else THOROUGH
    sizes = _peak_sizes(gpu, quick)
    graded = next(iter(sizes))
    with task("calibrating: matmul peaks", total=sum(map(len, sizes.values()))) as update:
        squares = {dtype: _fastest_square(edges, dtype, device, timing, update) for dtype, edges in sizes.items()}
    grid_tflops = _grid_tflops(CPU_GRID if not gpu or quick else GPU_GRID, graded, device, timing)
    peaks: dict[str, dict[str, float]] = {}
    for dtype, (_, tflops) in squares.items():
        peaks.setdefault(_unit(dtype, gpu), {})[DTYPE_KEYS[dtype]] = tflops
    # The peak is the fastest rate seen: a grid shape that beats the squares (one fitting in cache) raises it.
    peak_tflops = max([squares[graded][1]] + [point[3] for point in grid_tflops])
    peaks[_unit(graded, gpu)][DTYPE_KEYS[graded]] = peak_tflops
    properties = torch.cuda.get_device_properties(device) if gpu else None
    l2_bytes = properties.L2_cache_size if gpu else 2 * 2**20
    dram_bytes = (2**28 if quick else 2**30) if gpu else 2**26
    with task("calibrating: bandwidth", total=2) as update:
        memory_bandwidth = _copy_gbps(dram_bytes, device, timing)
        update(advance=1)
        l2_bandwidth = max(_copy_gbps(max(l2_bytes // 4, 2**16), device, timing), memory_bandwidth)
        update(advance=1)
    sm_count = properties.multi_processor_count if gpu else (os.cpu_count() or 1)
    draft = DeviceProfile(
        name=name or calibrated_name(device), peak_tflops=peaks, memory_bandwidth_gbps=memory_bandwidth,
        l2_bandwidth_gbps=l2_bandwidth, l2_bytes=l2_bytes, sm_count=sm_count,
        launch_overhead_us=_launch_us(device), dispatch_us={"default": 0.0}, asynchronous=gpu,
        matmul_base_efficiency=1.0, description=f"calibrated on {_device_name(device)} with torch {torch.__version__}",
        source="calibrated",
    )
    points = tuple((m, n, k, _fraction(tflops / peak_tflops)) for m, n, k, tflops in grid_tflops)
    size, tflops = squares[graded]
    base = _base_efficiency(draft, size, tflops / peak_tflops)
    attention = _attention_points(draft, device, quick, timing)
    convolutions = _convolution_points(draft, device, quick, timing)
    misaligned = _misaligned_factor(device, quick, timing) if gpu else 1.0
    floors, dispatch = _dispatch_and_floors(device, timing)
    return dataclasses.replace(
        draft, matmul_base_efficiency=base, matmul_efficiency={DTYPE_KEYS[graded]: points},
        misaligned_matmul_factor=misaligned, attention_points=attention, convolution_points=convolutions,
        dispatch_us=dispatch, kernel_floor_us=floors,
        attention_efficiency=statistics.median(point[3] for point in attention),
    )


def _peak_sizes(gpu: bool, quick: bool) -> dict[torch.dtype, tuple[int, ...]]:
    """Matmul dtype -> square edges its peak is the fastest of; the first dtype is the one the shape grid grades.

    On the CPU fp32 needs at least 512, below which the call's overhead and the threads' start-up still
    show (128³ reached a tenth of the rate). The others run far slower (fp64 at a third of the rate,
    16-bit at a hundredth without AVX-512 BF16/FP16), so one smaller edge gives their rate: roughly when
    quick (16-bit matmuls reached 2.9 GFLOP/s at 128³, 1.1 at 512³), closely otherwise.
    """
    if gpu:
        edges = (2048,) if quick else (8192,)
        return {torch.bfloat16: edges, torch.float16: edges, torch.float32: edges}
    other = (128,) if quick else (512,)
    return {torch.float32: (512, 1024) if quick else (1024, 2048), torch.float64: other, torch.bfloat16: other,
            torch.float16: other}


def _unit(dtype: torch.dtype, gpu: bool) -> str:
    """The peak_tflops unit a matmul of `dtype` runs on: tensor cores for 16-bit on a GPU, else the general cores."""
    return "tensor" if gpu and dtype in TENSOR_CORE_DTYPES else "cuda"


def _fastest_square(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device, timing: Timing,
                    update: Callable[..., None]) -> tuple[int, float]:
    """(edge, TFLOP/s) of the fastest square matmul of the given edges."""
    rates = {}
    for size in sizes:
        rates[size] = _matmul_tflops(size, size, size, dtype, device, timing)
        log.info("matmul %d^3 %s: %.3f TFLOP/s", size, dtype, rates[size])
        update(advance=1)
    return max(rates.items(), key=lambda item: item[1])


def _grid_tflops(grid: dict, dtype: torch.dtype, device: torch.device,
                 timing: Timing) -> list[tuple[int, int, int, float]]:
    """(m, n, k, TFLOP/s) for every shape of the grid."""
    shapes = [(m, n, k) for m in grid["m"] for n in grid["n"] for k in grid["k"]]
    rates = []
    with task("calibrating: matmul shapes", total=len(shapes)) as update:
        for m, n, k in shapes:
            rates.append((m, n, k, _matmul_tflops(m, n, k, dtype, device, timing)))
            update(advance=1)
    return rates


def _dispatch_and_floors(device: torch.device, timing: Timing) -> tuple[dict[str, float], dict[str, float]]:
    """Per op kind: the smallest kernel's device time (GPU only) and the host's time to issue one op."""
    representatives = _representatives(device)
    gpu = device.type == "cuda"
    floors, dispatch = {}, {}
    with task("calibrating: dispatch", total=(2 if gpu else 1) * len(representatives)) as update:
        if gpu:
            for kind, fn in representatives.items():
                if kind != "view":
                    floors[kind] = round(device_time_us(fn, device, timing=timing), 2)
                update(advance=1)
        # Host dispatch last, once the process is warm.
        for kind, fn in representatives.items():
            dispatch[kind] = round(_dispatch_us(fn, device, timing), 2)
            update(advance=1)
    dispatch["default"] = dispatch["pointwise"]
    floors["default"] = floors.get("pointwise", 0.0)
    return floors, dispatch


def _dispatch_us(fn: Callable[[], object], device: torch.device, timing: Timing) -> float:
    """The host's time to issue one op. On the CPU the fastest single call over the budget: a busy
    neighbour slows every block of back-to-back calls alike (a loaded CI machine read them 3x slow),
    while single calls that fall between its time slices still show the op's own cost."""
    if device.type == "cuda":
        return host_time_us(fn, device, timing=timing)
    calls = dataclasses.replace(timing, blocks=SINGLE_CALLS)
    return host_time_us(fn, device, timing=calls, min_block_us=0.0)


def _fraction(value: float) -> float:
    """An efficiency as the profile stores it: in (0, 1], four decimals."""
    return min(1.0, max(1e-4, round(value, 4)))


def _base_efficiency(draft: DeviceProfile, size: int, fraction: float) -> float:
    """The base efficiency that makes the analytic model give the measured `fraction` of peak for the
    size³ matmul, at most 1: the analytic shape terms (tiles, waves, K loop) already take some of it."""
    shape_terms = CostModel(dataclasses.replace(draft, matmul_base_efficiency=1.0)).analytic_efficiency(
        MatmulShape(1, size, size, size))
    return _fraction(fraction / shape_terms)


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


def _misaligned_factor(device: torch.device, quick: bool, timing: Timing) -> float:
    """Efficiency of a bf16 matmul with an odd N (GPT-2's 50257-word vocabulary) against N padded to 64."""
    m, k = (1024, 768) if quick else (4096, 768)
    odd, padded = 50257, 50304
    with task("calibrating: misaligned matmul", total=2) as update:
        odd_tflops = _matmul_tflops(m, odd, k, torch.bfloat16, device, timing)
        update(advance=1)
        padded_tflops = _matmul_tflops(m, padded, k, torch.bfloat16, device, timing)
        update(advance=1)
    return round(min(1.0, odd_tflops / padded_tflops), 4)


def _matmul_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, timing: Timing) -> float:
    """Device-side rate of one matmul shape (CUDA-graph replay on a GPU)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * n * k / device_time_us(lambda: a @ b, device, timing=timing) / 1e6


def _copy_gbps(nbytes: int, device: torch.device, timing: Timing) -> float:
    """Device-to-device copy rate, counting bytes read plus written."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    return 2 * source.nbytes / host_time_us(lambda: target.copy_(source), device, timing=timing) / 1e3


def _attention_points(draft: DeviceProfile, device: torch.device, quick: bool, timing: Timing) -> tuple:
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
    with task("calibrating: attention", total=3 * len(lengths) * len(head_dims)) as update:
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
                    seconds = device_time_us(fn, device, copies=5, timing=timing) / 1e6
                    points.append((variant, length, head_dim, _fraction(useful_flops / seconds / peak)))
                    update(advance=1)
    return tuple(points)


CONVOLUTION_STAGES = {"gpu": ((56, 64), (28, 128), (14, 256), (7, 512)), "quick": ((28, 128), (7, 512)),
                      "cpu": ((14, 16), (7, 32))}
"""(image side, channels) of the convolution stages measured: ResNet's four on a GPU, two small ones on the CPU."""


def _convolution_points(draft: DeviceProfile, device: torch.device, quick: bool, timing: Timing) -> tuple:
    """Fraction of peak 2-D convolutions reach, per class, at each stage: a 1x1 reducing 4C channels to C, a 3x3
    from C to C, a depthwise 3x3 over 4C channels (bottleneck and inverted-residual blocks' three kinds).

    On a GPU in bfloat16, channels-last as ember runs them (batch 32); on the CPU in float32 (batch 2). Device
    time, by CUDA-graph replay on a GPU; each point as (class, groups, m, n, k, fraction), its implicit GEMM
    per group as the op table gives it."""
    gpu = device.type == "cuda"
    dtype, batch = (torch.bfloat16, 32) if gpu else (torch.float32, 2)
    stages = CONVOLUTION_STAGES["quick" if quick and gpu else "gpu" if gpu else "cpu"]
    layout = torch.channels_last if gpu else torch.contiguous_format
    peak = draft.peak_flops("tensor" if gpu else "cuda", dtype)
    points = []
    with task("calibrating: convolutions", total=3 * len(stages)) as update:
        for side, channels in stages:
            for kind, (inputs, outputs, kernel, groups) in {
                    "pointwise": (4 * channels, channels, 1, 1), "dense": (channels, channels, 3, 1),
                    "depthwise": (4 * channels, 4 * channels, 3, 4 * channels)}.items():
                x = torch.randn(batch, inputs, side, side, dtype=dtype, device=device).to(memory_format=layout)
                weight = torch.randn(outputs, inputs // groups, kernel, kernel, dtype=dtype, device=device)
                weight = weight.to(memory_format=layout)
                m, n, k = batch * side * side, outputs // groups, inputs // groups * kernel * kernel
                seconds = device_time_us(lambda: F.conv2d(x, weight, padding=kernel // 2, groups=groups), device,
                                         copies=5, timing=timing) / 1e6
                points.append((kind, groups, m, n, k, _fraction(2 * groups * m * n * k / seconds / peak)))
                update(advance=1)
    return tuple(points)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU"


def calibrated_name(device: torch.device) -> str:
    """The name a calibrated profile of `device` is saved under, and found by: `h200-calibrated` from "NVIDIA
    H200", `cpu-calibrated` for the CPU."""
    if device.type != "cuda":
        return "cpu-calibrated"
    words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name(device).lower())
    return "-".join(word for word in words if word not in ("nvidia", "tesla")) + "-calibrated"
