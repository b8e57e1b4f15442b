"""How row kernels should be launched: device time of each generated row kernel of the suite's shapes over a
grid of elements per program and warps, against torch.compile's kernel for the same module.

Each kernel is timed alone with triton.testing.do_bench (CUDA events, L2 flushed, median); the table names the
best launch per workload and how far ember's default launch (`launch_shape`) is from it.
Usage: python bench/row_kernels.py [--out bench/results]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing
from torch import nn

import ember
from ember.codegen import GroupKernel, reduction

from common import environment, write_results

ELEMENTS = (1024, 2048, 4096, 8192, 16384)
WARPS = (1, 2, 4, 8, 16)


class MaskedSoftmax(nn.Module):
    """BERT's written-out attention scores: scaled, masked, softmax (float32)."""

    def forward(self, scores, keep):
        return torch.ops.aten._safe_softmax(torch.where(keep, scores * 0.125, float("-inf")), -1)


class AddRMSNorm(nn.Module):
    """Llama's and Mixtral's residual add and RMS norm, op by op."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, device="cuda", dtype=torch.bfloat16))

    def forward(self, x, residual):
        hidden = x + residual
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        return hidden, self.weight * (hidden.float() * torch.rsqrt(variance + 1e-6)).to(x.dtype)


class AddLayerNorm(nn.Module):
    """BERT's and GPT-2's residual add and layer norm."""

    def __init__(self, features: int):
        super().__init__()
        self.norm = nn.LayerNorm(features, device="cuda", dtype=torch.bfloat16)

    def forward(self, x, residual):
        hidden = x + residual
        return hidden, self.norm(hidden)


def workloads() -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    def bf16(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    keep = torch.rand(32, 1, 1, 128, device="cuda") < 0.9
    return [("BERT softmax 49152x128 f32", MaskedSoftmax(), (torch.randn(32, 12, 128, 128, device="cuda"), keep)),
            ("BERT add+layer norm 4096x384", AddLayerNorm(384), (bf16(4096, 384), bf16(4096, 384))),
            ("GPT-2 add+layer norm 4096x768", AddLayerNorm(768), (bf16(4096, 768), bf16(4096, 768))),
            ("Mixtral add+RMS norm 2048x1024", AddRMSNorm(1024), (bf16(2048, 1024), bf16(2048, 1024))),
            ("Llama add+RMS norm 4096x2048", AddRMSNorm(2048), (bf16(4096, 2048), bf16(4096, 2048))),
            ("Llama b1 add+RMS norm 16x2048", AddRMSNorm(2048), (bf16(16, 2048), bf16(16, 2048)))]


def kernel_us(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """Device µs of the program's one row kernel, with the launch `reduction.launch_shape` gives now."""
    with torch.no_grad():
        program = ember.compile(model, inputs, ember.Options(cuda_graphs=False, arena=False))
    (group,) = [item for item in program.executor.work if isinstance(item, GroupKernel)]
    values = dict(zip((value.name for value in program.graph.inputs), inputs))
    values.update((name, weight) for name, weight in program.graph.weights.items())
    reads = [values[name] for name in group.inputs]
    writes = [torch.empty_strided(v.type.shape, v.type.layout, dtype=v.type.dtype, device="cuda") for v in group.outputs]
    return triton.testing.do_bench(lambda: group.kernel(reads, writes), return_mode="median") * 1e3


def compiled_us(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    compiled = torch.compile(model)
    with torch.no_grad():
        return triton.testing.do_bench(lambda: compiled(*inputs), return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    default_shape = reduction.launch_shape
    results, lines = [], []
    for label, model, inputs in workloads():
        default = kernel_us(model, inputs)
        grid = {}
        for elements, warps in itertools.product(ELEMENTS, WARPS):
            def shape(rows, columns, elements=elements, warps=warps):
                block_rows, block_columns, _ = default_shape(rows, columns)
                return min(block_rows, max(1, elements // block_columns)), block_columns, warps
            reduction.launch_shape = shape
            try:
                grid[f"{elements}/{warps}"] = kernel_us(model, inputs)
            finally:
                reduction.launch_shape = default_shape
        best = min(grid, key=grid.get)
        compiled = compiled_us(model, inputs)
        results.append({"workload": label, "default_us": default, "best": best, "best_us": grid[best],
                        "compile_module_us": compiled, "grid_us": grid})
        lines.append(f"{label:34} default {default:7.1f} µs   best {best:>9} {grid[best]:7.1f} µs   "
                     f"torch.compile (whole module, host included) {compiled:7.1f} µs")
    write_results(args.out, "row_kernels", {**environment(torch.device("cuda")), "workloads": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
