"""One-row linear layers (a decode step's): ember.linears' kernel against cuBLAS, checked and timed on the GPU.

First the kernel is checked against float64 in every dtype (odd sizes, a strided row, weights with padded rows,
biases on some). Then device time per call from CUDA-graph replays, each graph cycling through enough copies of
the weights to pass 256 MB, so that every call reads its weights from memory as a decode step's layers do (a weight
read again and again would sit in the 50 MB L2): the sets of linears ember joins (Llama's query, key and value; its
MLP's gate and up), ember's one kernel against cuBLAS's one per weight; single weights alike. With --tilings, every
tiling of a grid per shape instead (how `codegen.skinny_mm.tiling` was chosen: results skinny_mm_tilings.*).
Usage: python bench/skinny_mm.py [--out bench/results] [--tilings]
"""
from __future__ import annotations

import argparse
import itertools
import math

import torch

from common import environment, write_results
from ember.codegen.skinny_mm import Tiling, linears, takes
from ember.ir.ops import linears_reference
from ember.optimizer.cost.calibrate import time_us
from ember.tolerance import tolerance_for

SETS = {  # name: [(N, K)] of linears that read one row
    "llama q, k, v": [(2048, 2048), (512, 2048), (512, 2048)], "llama gate, up": [(5632, 2048), (5632, 2048)],
    "llama q (single)": [(2048, 2048)], "llama k (single)": [(512, 2048)], "llama down (single)": [(2048, 5632)],
    "llama head (single)": [(32000, 2048)], "bert q, k, v (bias)": [(384, 384)] * 3,
}
TILING_SHAPES = {"llama q/o": (2048, 2048), "llama k/v": (512, 2048), "llama gate/up": (5632, 2048),
                 "llama down": (2048, 5632), "llama head": (32000, 2048), "llama qkv joined": (3072, 2048)}
STREAMED_BYTES = 256 << 20


def graph_us(calls: list) -> float:
    """Device µs per call: every call of `calls` captured in one CUDA graph, replayed."""
    for call in calls[:3]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return time_us(graph.replay, torch.device("cuda"), blocks=3, budget_s=0.05) / len(calls)


def check() -> list[dict]:
    """The kernel against float64 in each dtype, on shapes that leave partial blocks and steps."""
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        x = torch.randn(1, 2 * 333, dtype=dtype, device="cuda")[:, ::2]
        weights = [torch.randn(n, 340, dtype=dtype, device="cuda")[:, 2:335] for n in (37, 5, 1000)]
        biases = [torch.randn(37, dtype=dtype, device="cuda"), None, torch.randn(1000, dtype=dtype, device="cuda")]
        assert takes(x, weights, biases)
        got = linears(x, weights, biases)
        want = linears_reference(x.double(), [w.double() for w in weights], [None if b is None else b.double() for b in biases])
        error = max((g.double() - w).abs().max().item() for g, w in zip(got, want))
        limit = max(tolerance_for(dtype, scale=w.abs().max().item()) for w in want)
        rows.append({"dtype": str(dtype), "max_err": error, "limit": limit, "ok": error <= limit})
    return rows


def _copies(shapes: list[tuple[int, int]], dtype: torch.dtype, bias: bool) -> list[tuple[list, list]]:
    nbytes = sum(n * k for n, k in shapes) * dtype.itemsize
    return [([torch.randn(n, k, dtype=dtype, device="cuda") for n, k in shapes],
             [torch.randn(n, dtype=dtype, device="cuda") if bias else None for n, _ in shapes])
            for _ in range(max(8, math.ceil(STREAMED_BYTES / nbytes)))]


def time_sets() -> list[dict]:
    rows = []
    for name, shapes in SETS.items():
        bias = "bias" in name
        copies = _copies(shapes, torch.bfloat16, bias)
        x = torch.randn(1, shapes[0][1], dtype=torch.bfloat16, device="cuda")
        outs = [torch.empty(1, n, dtype=torch.bfloat16, device="cuda") for n, _ in shapes]

        def cublas(weights, biases):
            for weight, b, out in zip(weights, biases, outs):
                if b is None:
                    torch.mm(x, weight.t(), out=out)
                else:
                    torch.addmm(b, x, weight.t(), out=out)

        theirs = graph_us([lambda w=w, b=b: cublas(w, b) for w, b in copies])
        ours = graph_us([lambda w=w, b=b: linears(x, w, b) for w, b in copies])
        nbytes = sum(n * k for n, k in shapes) * 2
        rows.append({"set": name, "shapes": shapes, "cublas_us": theirs, "ember_us": ours, "bytes": nbytes})
    return rows


def time_tilings() -> list[dict]:
    rows = []
    for label, (n, k) in TILING_SHAPES.items():
        copies = _copies([(n, k)], torch.bfloat16, False)
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        cublas = graph_us([lambda w=w[0]: torch.mm(x, w.t(), out=out) for w, _ in copies])
        timed = [(graph_us([lambda w=w: linears(x, w, b, tiling) for w, b in copies]), tiling)
                 for tiling in (Tiling(block_n, block_k, warps) for block_n, block_k, warps
                                in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8)))]
        best_us, best = min(timed, key=lambda item: item[0])
        rows.append({"shape": label, "n": n, "k": k, "cublas_us": cublas, "best_us": best_us,
                     "best": [best.block_n, best.block_k, best.num_warps],
                     "all": [[us, [t.block_n, t.block_k, t.num_warps]] for us, t in timed]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tilings", action="store_true")
    args = parser.parse_args()
    environment_ = environment(torch.device("cuda"))
    if args.tilings:
        rows = time_tilings()
        lines = [f"{'shape':18} {'N':>6} {'K':>5} {'cuBLAS µs':>10} {'best µs':>8} {'÷':>5}  tiling (rows, columns, warps)"]
        lines += [f"{r['shape']:18} {r['n']:6d} {r['k']:5d} {r['cublas_us']:10.2f} {r['best_us']:8.2f} "
                  f"{r['cublas_us'] / r['best_us']:5.2f}  {r['best']}" for r in rows]
        write_results(args.out, "skinny_mm_tilings", {**environment_, "rows": rows},
                      "One-row linears, bf16: the fastest tiling per shape (device µs, weights streamed)\n" + "\n".join(lines))
        return
    checks, sets = check(), time_sets()
    lines = ["ember.linears against float64: " + ", ".join(
        f"{c['dtype'].removeprefix('torch.')} {c['max_err']:.2e} (limit {c['limit']:.2e}) {'ok' if c['ok'] else 'FAILED'}"
        for c in checks),
        f"{'set (bf16, one row)':22} {'MB':>6} {'cuBLAS µs':>10} {'ember µs':>9} {'÷':>5}"]
    lines += [f"{r['set']:22} {r['bytes'] / 1e6:6.1f} {r['cublas_us']:10.2f} {r['ember_us']:9.2f} "
              f"{r['cublas_us'] / r['ember_us']:5.2f}" for r in sets]
    write_results(args.out, "skinny_mm", {**environment_, "checks": checks, "sets": sets},
                  "One-row linears: ember's kernel per set against cuBLAS's kernel per weight (device µs per call, "
                  "weights streamed from memory); ÷ = cuBLAS / ember\n" + "\n".join(lines))
    if not all(c["ok"] for c in checks):
        raise SystemExit("ember.linears differs from float64 beyond its tolerance")


if __name__ == "__main__":
    main()
