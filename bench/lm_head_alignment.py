"""Why ember pads odd feature counts: GPT-2's LM head GEMM (4096×768 by 768×50257, bf16) on the GPU,
dense, with only the output row padded, and with N padded to a multiple of 8 (what the layout pass does).
Usage: python bench/lm_head_alignment.py [--out bench/results]
"""
from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from common import environment, write_results

M, K, N, N_PADDED = 4096, 768, 50257, 50264


def milliseconds(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    padded_weight = torch.zeros(N_PADDED, K, device="cuda", dtype=torch.bfloat16)
    padded_weight[:N] = weight
    padded_rows = torch.empty(M, N_PADDED, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x, weight)
    cases = {
        "dense (N = 50257)": lambda: F.linear(x, weight),
        "output row padded, N = 50257": lambda: torch.ops.aten.linear.out(x, weight, out=padded_rows[:, :N]),
        "N padded to 50264, first N kept": lambda: F.linear(x, padded_weight)[:, :N],
    }
    rows = []
    for name, fn in cases.items():
        error = (fn().float() - reference.float()).abs().max().item()
        rows.append({"case": name, "ms": milliseconds(fn), "max_abs_diff_vs_dense": error})
    lines = [f"{'case':36} {'ms':>7}  max |diff| vs dense"] + [
        f"{r['case']:36} {r['ms']:7.3f}  {r['max_abs_diff_vs_dense']:.3g}" for r in rows]
    write_results(args.out, "lm_head_alignment", {**environment(torch.device("cuda")), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
