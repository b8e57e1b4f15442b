"""GPU-only checks of what the CPU tests run in the interpreter: generated pointwise and row-reduction
kernels compiled by the real Triton, on odd sizes, non-contiguous and broadcast inputs, in every float
dtype, rows from 7 to 5000 columns, kernels reading through cats, splits, repeats and gathers, row kernels
reading embeddings from their tables, integer arithmetic, inputs off 16-byte alignment after aligned ones; whether every kernel launches directly after an aligned call (Inductor having run in
the process); and the device-side grouped matmul against the per-expert loop.
Usage: python bench/gpu_kernels.py [--out bench/results]
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import nn

import ember
from ember.codegen import GroupKernel
from ember.codegen.kernels import launch_hooks_set
from ember.codegen.grouped_mm import grouped_mm
from ember.tolerance import tolerance_for

from common import environment, write_results


class Chains(nn.Module):
    """Pointwise chains of every kind ember fuses: arithmetic, activations, comparisons, casts, where."""

    def forward(self, x, row, column):
        a = torch.nn.functional.gelu(x * row + column) - x.sigmoid()
        b = torch.where(x > 0.25, torch.nn.functional.silu(x), x.exp() * 0.5).clamp(-2, 2)
        c = (a * b).abs().sqrt()
        return a, b, c.to(x.dtype)


def compare(label: str, model: nn.Module, inputs: tuple[torch.Tensor, ...],
            first: tuple[torch.Tensor, ...] | None = None) -> dict:
    """ember's fused program and eager torch, each against the model run in float64 on the same inputs: fused
    kernels compute in float32 and round once, so they must be within the dtype's tolerance of the exact result.
    With `first`, the program is compiled for and called on those inputs before being checked on `inputs`."""
    with torch.no_grad():
        program = ember.compile(model, first or inputs, ember.Options(fusion=True))
        if first is not None:
            program(*first)
        actual, eager = program(*inputs), model(*inputs)
        exact = copy.deepcopy(model).double()(*(x.double() if x.is_floating_point() else x for x in inputs))
    def error(results):
        return max((r.double() - e).abs().max().item() for r, e in zip(results, exact))
    limit = tolerance_for(inputs[0].dtype, scale=max(e.abs().max().item() for e in exact))
    return {"check": label, "max_err": error(actual), "eager_err": error(eager), "limit": limit,
            "groups": program.report.fusion["groups"], "ok": error(actual) <= limit}


def check_chains() -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(37, 129, device="cuda", dtype=dtype).t()  # odd sizes, transposed
        row, column = torch.randn(37, device="cuda", dtype=dtype), torch.randn(129, 1, device="cuda", dtype=dtype)
        rows.append(compare(f"fused chains {str(dtype).removeprefix('torch.')}", Chains(), (x, row, column)))
    return rows


def check_direct_launches() -> dict:
    """Every generated kernel launches its compiled binary directly from the wrapper (not through Triton's JIT,
    about a third more host time per launch), also once torch.compile's Inductor has run in the process (which
    might set Triton's launch hooks)."""
    x, row, column = (torch.randn(*shape, device="cuda") for shape in ((64, 256), (256,), (64, 1)))
    with torch.no_grad():
        torch.compile(Chains(), mode="default")(x, row, column)
        program = ember.compile(Chains(), (x, row, column), ember.Options(fusion=True, cuda_graphs=False))
        for _ in range(2):
            program(x, row, column)
    kernels = [step.kernel for step in program.executor.work or () if isinstance(step, GroupKernel)]
    source = program.executor.wrapper_on(x.device).source  # aligned launches are the wrapper's own lines
    direct = sum(f"{kernel.source.name}_launch(" in source for kernel in kernels)
    hooked = launch_hooks_set()
    return {"check": f"direct launches {direct}/{len(kernels)}{', launch hooks set' if hooked else ''}",
            "max_err": 0.0, "eager_err": 0.0, "limit": 0.0, "groups": len(kernels),
            "ok": bool(kernels) and direct == len(kernels)}


def check_misaligned() -> list[dict]:
    """Inputs one element into their storage (pointers off 16-byte alignment) after a call on aligned ones: the
    kernels launch their compiled binary directly only for aligned pointers, so these take Triton's own path."""
    rows = []
    for dtype in (torch.float16, torch.float32):
        def shifted(*shape: int, by: int = 1) -> torch.Tensor:
            return torch.randn(math.prod(shape) + by, device="cuda", dtype=dtype)[by:].view(shape)

        aligned = (shifted(37, 129, by=0).t(), shifted(37, by=0), shifted(129, 1, by=0))
        misaligned = (shifted(37, 129).t(), shifted(37), shifted(129, 1))
        rows.append(compare(f"misaligned after aligned {str(dtype).removeprefix('torch.')}", Chains(), misaligned,
                            first=aligned))
    return rows


class Rows(nn.Module):
    """Row reductions with their producers and consumers: add + layer norm, an RMS norm op by op, softmax,
    log-softmax, and sums and means kept per row or not."""

    def __init__(self, features: int, dtype: torch.dtype):
        super().__init__()
        self.norm = nn.LayerNorm(features, device="cuda", dtype=dtype)
        self.weight = nn.Parameter(torch.randn(features, device="cuda", dtype=dtype))

    def forward(self, x, residual):
        hidden = x + residual
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        rms = self.weight * (hidden.float() * torch.rsqrt(variance + 1e-6)).to(x.dtype)
        return (self.norm(hidden), rms, torch.softmax(x * 0.5, -1), torch.log_softmax(x, -1),
                hidden.sum(-1) * 0.1, (x.exp().mean(-1, keepdim=True) - 1).rsqrt())


def check_rows() -> list[dict]:
    rows = []
    for features in (7, 769, 5000):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(features, 3, 67, device="cuda", dtype=dtype).permute(1, 2, 0)  # non-contiguous rows
            residual = torch.randn(features, device="cuda", dtype=dtype)
            rows.append(compare(f"row kernels {features} columns {str(dtype).removeprefix('torch.')}",
                                Rows(features, dtype), (x, residual)))
    return rows


class MaskedAttention(nn.Module):
    """BERT's attention: heads-second views and a boolean padding mask broadcast along the keys (stride 0),
    which sends torch to its math path; ember writes that path out."""

    def forward(self, q, k, v, keep):
        mask = keep[:, None, None, :].expand(-1, 1, q.shape[1], -1)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                               attn_mask=mask)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def check_attention() -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(3, 77, 5, 24, device="cuda", dtype=dtype) for _ in range(3))
        keep = torch.rand(3, 77, device="cuda") < 0.8
        keep[:, 0] = True  # every query sees a key (backends differ on rows masked out entirely)
        with torch.no_grad():
            expected = MaskedAttention()(q, k, v, keep)
            program = ember.compile(MaskedAttention(), (q, k, v, keep), ember.Options(fusion=True))
            actual = program(q, k, v, keep)
        written_out = "scaled_dot_product_attention" not in {node.op for node in program.graph.nodes}
        error = (actual.float() - expected.float()).abs().max().item()
        limit = tolerance_for(dtype, scale=expected.float().abs().max().item())
        rows.append({"check": f"attention, key mask {str(dtype).removeprefix('torch.')}"
                              f"{' (written out)' if written_out else ''}", "max_err": error, "eager_err": 0.0,
                     "limit": limit, "groups": program.report.fusion["groups"], "ok": error <= limit})
    return rows


class Moves(nn.Module):
    """Kernels that read through moves: rotary's cat(-x2, x1) on a transposed view, rotated keys repeated for
    grouped-query attention, a masked matmul result split into SwiGLU's halves, experts gathered back and summed."""

    def forward(self, x, cos, sin, up, rows, experts, weights, order):
        x = x.transpose(1, 2)
        half = x.shape[-1] // 2
        rotated = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
        batch, heads, length, width = rotated.shape
        repeated = rotated[:, :, None].expand(batch, heads, 3, length, width).reshape(batch, heads * 3, length, width)
        gate, value = up.masked_fill(rows, 0.0).split(up.shape[-1] // 2, dim=-1)
        combined = (experts * weights.unsqueeze(-1))[order].view(-1, 2, experts.shape[-1]).sum(dim=1)
        return repeated, torch.nn.functional.silu(gate) * value, combined.to(experts.dtype)


def check_moves() -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        def normal(*shape):
            return torch.randn(*shape, device="cuda", dtype=dtype)
        order = torch.randperm(202, device="cuda")
        order[5] -= 202  # a negative index
        inputs = (normal(3, 77, 5, 38), normal(77, 38), normal(77, 38), normal(101, 2 * 131),
                  (torch.arange(101, device="cuda") >= 90)[:, None], normal(202, 129),
                  torch.rand(202, device="cuda"), order)
        rows.append(compare(f"kernels through moves {str(dtype).removeprefix('torch.')}", Moves(), inputs))
    return rows


class EmbeddedAndRouted(nn.Module):
    """Row kernels reading embeddings from their tables (BERT's word, type and batch-shared position embeddings
    summed into a layer norm), rows gathered at an index divided in the kernel (MoE's `hidden[order // 2]`), and
    integer arithmetic of either sign rounded down."""

    def forward(self, hidden, order, ids, kinds, positions, words, types, places, weight, bias, integers):
        summed = (torch.nn.functional.embedding(ids, words) + torch.nn.functional.embedding(kinds, types)
                  + torch.nn.functional.embedding(positions, places))
        normed = torch.nn.functional.layer_norm(summed, (words.shape[1],), weight, bias)
        return normed, hidden[order // 2], torch.div(integers * 3 - 7, -3, rounding_mode="floor").to(torch.int32) + 1


def check_embedded_and_routed() -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        def normal(*shape):
            return torch.randn(*shape, device="cuda", dtype=dtype)
        order = torch.randperm(2 * 301, device="cuda")
        order[7] = -5  # a negative index
        batch, length, width = 5, 77, 391
        inputs = (normal(301, 129), order, torch.randint(0, 30522, (batch, length), device="cuda"),
                  torch.randint(0, 2, (batch, length), device="cuda", dtype=torch.int32),
                  torch.arange(length, device="cuda").unsqueeze(0), normal(width, 30522).t(), normal(2, width),
                  normal(512, width), normal(width), normal(width),
                  torch.randint(-1000, 1000, (33, 65), device="cuda").t())
        rows.append(compare(f"embeddings, int index, int math {str(dtype).removeprefix('torch.')}",
                            EmbeddedAndRouted(), inputs))
    return rows


def check_grouped_mm() -> dict:
    torch.manual_seed(0)
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16) / 16
    offsets = torch.tensor([100, 100, 350, 400, 640, 700, 950, 990], device="cuda")  # an empty expert, unrouted tail
    device = grouped_mm(x, weight, offsets)
    loop = torch.zeros_like(device)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        loop[start:end] = x[start:end] @ weight[expert]
        start = end
    error = (device.float() - loop.float()).abs().max().item()
    limit = tolerance_for(torch.bfloat16, scale=loop.float().abs().max().item())
    return {"check": "grouped_mm device path vs per-expert loop", "max_err": error, "eager_err": 0.0, "limit": limit,
            "groups": 0, "ok": error <= limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows = (check_chains() + [check_direct_launches()] + check_misaligned() + check_rows() + check_moves()
            + check_embedded_and_routed() + check_attention() + [check_grouped_mm()])
    lines = ["Fused kernels and eager against float64 (attention and grouped_mm: against torch's own result)",
             f"{'check':44} {'max err':>10} {'eager err':>10} {'limit':>10} {'groups':>6}  ok"]
    lines += [f"{r['check']:44} {r['max_err']:10.3g} {r['eager_err']:10.3g} {r['limit']:10.3g} {r['groups']:6d}  "
              f"{'yes' if r['ok'] else 'NO'}" for r in rows]
    write_results(args.out, "gpu_kernels", {**environment(torch.device("cuda")), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
