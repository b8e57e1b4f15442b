"""The cost model: one object that prices a node, a fused group or a whole program on one device.

A kernel takes max(compute, memory) + launch overhead. Compute divides FLOPs by the unit's peak
(tensor cores for bf16/fp16 matmuls, attention and convolution; the general cores otherwise) times a
shape-dependent efficiency; memory divides bytes by DRAM or L2 bandwidth. Run eagerly, an op also
costs the host time to issue it: on a GPU that overlaps earlier kernels, so a node takes the larger
of the two, and a program follows a host/device timeline.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...ir import Graph, Node, TensorType
from .profile import DTYPE_KEYS, DeviceProfile

TILE = 128
"""Output tile edge of the matmul kernels the analytic efficiency assumes (cuBLAS/Triton on Hopper)."""
K_HALF_EFFICIENCY = 256
"""Reduction length at which prologue/epilogue cost halves a matmul's efficiency."""
TENSOR_CORE_DTYPES = frozenset({torch.bfloat16, torch.float16})
ATTENTION_HEADS = 64
"""batch × heads of the attention shapes `ember calibrate` measures."""
STRIDED_POINTWISE_SLOWDOWN = 2.2
"""ATen's pointwise kernels move bytes this much slower when an input is a permuted view (no vectorised
loads): on an H200, BERT's copies of heads-second attention views took 6.8 µs in ATen against 3.1 µs for
Triton's copies of the same bytes (bench/results/profile_bert.txt)."""


@dataclass(frozen=True, slots=True)
class Cost:
    """Work and predicted time of a node, a group or a program."""

    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    compute_us: float = 0.0
    memory_us: float = 0.0
    overhead_us: float = 0.0
    kernels: int = 0
    dispatch_us: float = 0.0
    predicted_us: float = 0.0
    """The node's (or group's) own time: the kernel time or the host's dispatch, whichever is longer
    on an asynchronous device, their sum otherwise; summed over things run one after another."""

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (0 when nothing moves)."""
        return self.flops / self.bytes_moved if self.bytes_moved else 0.0

    @property
    def kernel_us(self) -> float:
        return max(self.compute_us, self.memory_us) + self.overhead_us

    @property
    def bound(self) -> str:
        """What limits it: compute, memory, overhead (launch or dispatch), or none (no kernel)."""
        if self.kernels == 0:
            return "none"
        limits = {"compute": self.compute_us, "memory": self.memory_us,
                  "overhead": max(self.overhead_us, self.dispatch_us - max(self.compute_us, self.memory_us))}
        return max(limits, key=limits.get)

    def __add__(self, other: Cost) -> Cost:
        """Kernels run one after another: work and times add."""
        return Cost(self.flops + other.flops, self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written,
                    self.compute_us + other.compute_us, self.memory_us + other.memory_us,
                    self.overhead_us + other.overhead_us, self.kernels + other.kernels,
                    self.dispatch_us + other.dispatch_us, self.predicted_us + other.predicted_us)


def op_cost(flops: int, read: int, written: int, compute_us: float, memory_us: float, launch_us: float,
            floor_us: float, kernels: int, dispatch_us: float, asynchronous: bool) -> Cost:
    """One eager op: compute and memory overlap; launch adds, up to the kind's smallest-kernel floor;
    host dispatch is a floor (asynchronous device) or an addend."""
    kernel_us = max(max(compute_us, memory_us) + launch_us, floor_us)
    predicted = max(kernel_us, dispatch_us) if asynchronous else kernel_us + dispatch_us
    overhead_us = kernel_us - max(compute_us, memory_us)
    return Cost(flops, read, written, compute_us, memory_us, overhead_us, kernels, dispatch_us, predicted)


@dataclass(frozen=True, slots=True)
class MatmulShape:
    """A (batched) matmul as the kernel sees it: batch × (m, k) @ (k, n)."""

    batch: int
    m: int
    n: int
    k: int


def permuted(value: TensorType) -> bool:
    """Whether a value is laid out other than row-major, and not merely broadcast (a stride 0)."""
    return not value.is_contiguous and all(stride != 0 for size, stride in zip(value.shape, value.layout) if size > 1)


class CostModel:
    """Prices IR on one device profile."""

    def __init__(self, profile: DeviceProfile):
        self.profile = profile

    # -- whole things ------------------------------------------------------------------------
    def node(self, node: Node, types: Mapping[str, TensorType]) -> Cost:
        """One node run on its own, as eager PyTorch runs it (a view launches nothing but is still issued)."""
        definition, profile = node.definition, self.profile
        inputs = [types[name] for name in node.inputs]
        outputs = [value.type for value in node.outputs]
        if definition.kind == "view":
            return op_cost(0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, profile.dispatch("view"), profile.asynchronous)
        flops = definition.flops(inputs, outputs, node.attrs)
        read, written = definition.bytes_moved(inputs, outputs)
        kernels = self.kernels(node, inputs)
        memory = self.memory_us(read + written)
        if definition.kind == "pointwise" and any(permuted(t) for t in inputs):
            memory *= STRIDED_POINTWISE_SLOWDOWN
        return op_cost(flops, read, written, self.compute_us(node, inputs, outputs, flops),
                       memory, kernels * profile.launch_overhead_us,
                       kernels * profile.kernel_floor(definition.kind), kernels,
                       self.host_us(node, inputs), profile.asynchronous)

    def group(self, nodes: Sequence[Node], graph: Graph) -> Cost:
        """A fused group run as one kernel: only the bytes that cross its boundary move."""
        types = graph.types()
        inside = {value.name for node in nodes for value in node.outputs}
        used_outside = {name for node in graph.nodes if node not in nodes for name in node.inputs} | set(graph.outputs)
        read_names = {name for node in nodes for name in node.inputs if name not in inside}
        written_names = inside & used_outside
        read = sum(_bytes_read(name, nodes, types) for name in read_names)
        written = sum(types[name].nbytes for name in written_names)
        work = [self.node(node, types) for node in nodes]
        flops = sum(cost.flops for cost in work)
        compute = sum(cost.compute_us for cost in work)
        kernels = 1 if any(cost.kernels for cost in work) else 0
        return op_cost(flops, read, written, compute, self.memory_us(read + written),
                       kernels * self.profile.launch_overhead_us, kernels * self.profile.kernel_floor("default"),
                       kernels, kernels * self.profile.dispatch("default"), self.profile.asynchronous)

    def program(self, graph: Graph) -> Cost:
        """Every node in order, unfused, as eager PyTorch runs it.

        On an asynchronous device the host issues op i after op i-1 and the device starts it once both
        it is issued and the device is free: long kernels hide the dispatch of the short ops after them.
        """
        costs = list(self.nodes(graph).values())
        total = sum(costs, Cost())
        if not self.profile.asynchronous:
            return total
        host = device = 0.0
        for cost in costs:
            host += cost.dispatch_us
            if cost.kernels:
                device = max(device, host) + cost.kernel_us
        return dataclasses.replace(total, predicted_us=max(host, device))

    def nodes(self, graph: Graph) -> dict[str, Cost]:
        """Node name -> its cost."""
        types = graph.types()
        return {node.name: self.node(node, types) for node in graph.nodes}

    # -- parts -------------------------------------------------------------------------------
    def memory_us(self, nbytes: int) -> float:
        """Time to move `nbytes` (read plus written): L2 bandwidth when they fit in L2, DRAM otherwise."""
        bandwidth = self.profile.l2_bandwidth_gbps if nbytes <= self.profile.l2_bytes else self.profile.memory_bandwidth_gbps
        return nbytes / (bandwidth * 1e3)

    def compute_us(self, node: Node, inputs: Sequence[TensorType], outputs: Sequence[TensorType], flops: int) -> float:
        """FLOPs over the rate the node's unit reaches for its dtype and shape."""
        if flops == 0:
            return 0.0
        kind = node.definition.kind
        dtype = inputs[0].dtype if inputs else outputs[0].dtype
        unit = "tensor" if kind in ("matmul", "convolution", "attention") and dtype in TENSOR_CORE_DTYPES else "cuda"
        rate_dtype = dtype if unit == "tensor" or dtype == torch.float64 else torch.float32
        peak = self.profile.peak_flops(unit, rate_dtype)
        if kind == "attention":
            causal = node.attrs.get("is_causal", False) and inputs[0].shape[-2] == inputs[1].shape[-2]
            return (flops / 2 if causal else flops) / (peak * self.attention_efficiency(node, inputs)) * 1e6
        shape = matmul_shape(node, inputs, outputs)
        if shape is None:
            efficiency = 1.0
        elif kind == "convolution":
            efficiency = self.convolution_efficiency(node, inputs, shape, dtype)
        else:
            efficiency = self.matmul_efficiency(shape, dtype)
        return flops / (peak * efficiency) * 1e6

    def convolution_efficiency(self, node: Node, inputs: Sequence[TensorType], shape: MatmulShape,
                               dtype: torch.dtype) -> float:
        """The implicit GEMM's analytic efficiency, corrected by the measured convolutions of the same class
        nearby (cuDNN's kernels differ by class: a depthwise one is a stencil, not a GEMM); the matmul points'
        correction where the profile measured none of the class."""
        kind = convolution_class(node, inputs)
        points = [point[1:] for point in self.profile.convolution_points if point[0] == kind]
        if not points:
            return self.matmul_efficiency(shape, dtype)
        here = (math.log2(shape.m * shape.batch), math.log2(shape.n), math.log2(shape.k))
        correction = _nearest_correction(here, points, _log_gemm,
                                         lambda p: p[4] / self._gemm_efficiency(MatmulShape(*p[:4]), dtype))
        return min(1.0, max(1e-3, self._gemm_efficiency(shape, dtype) * correction))

    def _gemm_efficiency(self, shape: MatmulShape, dtype: torch.dtype) -> float:
        """The analytic efficiency with the misalignment penalty."""
        return self.analytic_efficiency(shape) * self._aligned(shape, dtype)

    def attention_efficiency(self, node: Node, inputs: Sequence[TensorType]) -> float:
        """The measured point of the same variant nearest in (sequence length, head dim), scaled by how
        well this many (batch·head, query block) tiles fill the device compared with the measured one."""
        query = inputs[0]
        variant = "mask" if len(inputs) > 3 else "causal" if node.attrs.get("is_causal", False) else "plain"
        points = [p for p in self.profile.attention_points if p[0] == variant]
        if not points:
            return self.profile.attention_efficiency
        length, head_dim = query.shape[-2], query.shape[-1]
        here = (math.log2(length), math.log2(head_dim))
        nearest = sorted(points, key=lambda p: math.dist(here, (math.log2(p[1]), math.log2(p[2]))))[:2]
        heads = math.prod(query.shape[:-2])
        weighted = total = 0.0
        for _, measured_length, _, efficiency in nearest:
            weight = 1 / (1e-3 + math.dist(here, (math.log2(measured_length), math.log2(nearest[0][2]))))
            fill = self._fill(heads * math.ceil(length / TILE)) / self._fill(ATTENTION_HEADS * math.ceil(measured_length / TILE))
            weighted += weight * efficiency * fill
            total += weight
        return max(1e-3, min(1.0, weighted / total))

    def _fill(self, tiles: int) -> float:
        """Fraction of the device's SMs busy over the waves `tiles` tiles take."""
        waves = math.ceil(tiles / self.profile.sm_count)
        return tiles / (waves * self.profile.sm_count)

    def kernels(self, node: Node, inputs: Sequence[TensorType]) -> int:
        """Kernels the node launches eagerly: one, or what the op table says its reference launches (a grouped
        matmul's loop over experts)."""
        eager = node.definition.eager
        return eager(inputs)[0] if eager is not None else 1

    def host_us(self, node: Node, inputs: Sequence[TensorType]) -> float:
        """Host time to issue the node eagerly: one dispatch of its kind, or those the op table says its reference
        issues."""
        eager = node.definition.eager
        if eager is None:
            return self.profile.dispatch(node.definition.kind)
        return sum(count * self.profile.dispatch(kind) for kind, count in eager(inputs)[1].items())

    def matmul_efficiency(self, shape: MatmulShape, dtype: torch.dtype) -> float:
        """Fraction of peak a matmul of this shape reaches: analytic, corrected by calibration points nearby."""
        analytic = self.analytic_efficiency(shape) * self._aligned(shape, dtype)
        points = self.profile.matmul_efficiency.get(DTYPE_KEYS.get(dtype, "fp32"), ())
        if not points:
            return analytic
        here = (math.log2(shape.m * shape.batch), math.log2(shape.n), math.log2(shape.k))
        correction = _nearest_correction(here, points, lambda p: (math.log2(p[0]), math.log2(p[1]), math.log2(p[2])),
                                         lambda p: p[3] / self.analytic_efficiency(MatmulShape(1, *p[:3])))
        return min(1.0, max(1e-3, analytic * correction))

    def _aligned(self, shape: MatmulShape, dtype: torch.dtype) -> float:
        """The misalignment penalty: 16-bit GEMMs with a dimension not a multiple of 8 lose their fast paths."""
        if dtype in TENSOR_CORE_DTYPES and any(size % 8 for size in (shape.m, shape.n, shape.k)):
            return self.profile.misaligned_matmul_factor
        return 1.0

    def analytic_efficiency(self, shape: MatmulShape) -> float:
        """Base efficiency × wave quantization × partial tiles × K-loop amortisation."""
        tiles_m, tiles_n = math.ceil(shape.m / TILE), math.ceil(shape.n / TILE)
        wave_fill = self._fill(shape.batch * tiles_m * tiles_n)
        tile_fill = (shape.m * shape.n) / (tiles_m * TILE * tiles_n * TILE)
        k_amortised = shape.k / (shape.k + K_HALF_EFFICIENCY)
        return self.profile.matmul_base_efficiency * wave_fill * tile_fill * k_amortised


def matmul_shape(node: Node, inputs: Sequence[TensorType], outputs: Sequence[TensorType]) -> MatmulShape | None:
    """The GEMM a matmul-like node runs, as the op table gives it (convolution as implicit GEMM); None for other ops."""
    gemm = node.definition.gemm
    return MatmulShape(*gemm(inputs, outputs, node.attrs)) if gemm is not None else None


def convolution_class(node: Node, inputs: Sequence[TensorType]) -> str | None:
    """"pointwise" (1x1, one group), "dense" (one group), "depthwise" (a group per input channel) or None (other
    groupings, transposed): the classes calibration measures."""
    if node.attrs.get("transposed") or len(inputs) < 2:
        return None
    weight, groups = inputs[1], node.attrs.get("groups", 1)
    if groups == 1:
        return "pointwise" if all(size == 1 for size in weight.shape[2:]) else "dense"
    return "depthwise" if weight.shape[1] == 1 else None


def _log_gemm(point: Sequence[float]) -> tuple[float, float, float]:
    """A convolution point's (groups, m, n, k) in the log space the nearest points are found in."""
    groups, m, n, k = point[:4]
    return math.log2(m * groups), math.log2(n), math.log2(k)


def _nearest_correction(here: tuple[float, float, float], points: Sequence[Sequence[Any]],
                        where: Callable[[Sequence[Any]], tuple[float, float, float]],
                        correction: Callable[[Sequence[Any]], float]) -> float:
    """The corrections of the three measured points nearest `here` (log GEMM dims), weighted by inverse distance."""
    nearest = sorted(points, key=lambda p: math.dist(here, where(p)))[:3]
    weights = [1 / (1e-3 + math.dist(here, where(p))) for p in nearest]
    return sum(w * correction(p) for w, p in zip(weights, nearest)) / sum(weights)


def _bytes_read(name: str, nodes: Sequence[Node], types: Mapping[str, TensorType]) -> int:
    """Bytes a fused group reads of `name`: all of it, unless only gathers read it as their table, which read
    the rows they return (a layer norm over embeddings reads a few rows of a large vocabulary)."""
    readers = [node for node in nodes if name in node.inputs]
    if all(node.definition.gathers and name not in node.inputs[1:] for node in readers):
        return min(types[name].nbytes, sum(value.type.nbytes for node in readers for value in node.outputs))
    return types[name].nbytes
