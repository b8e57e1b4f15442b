"""Host cost of one bias matmul as each tool calls it: which of its arguments makes a call dearer on the host.

BERT step by step is host-bound, and its 36 `addmm`s a call are most of the host's time; ember's measured dearer
per call than torch.compile's in one profile. Here one [4096, 384] × [384, 384] bf16 product with a bias is called
with the arguments varied one at a time (a weight transposed by `.t()` or by `reinterpret_tensor`, a Parameter or
a plain tensor, the result in fresh memory or in a slot of a byte arena viewed as bf16), rotated round by round,
the median of the rounds' least block times.
Usage: python bench/addmm_host.py [--out bench/results] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from ember.optimizer.cost.calibrate import time_us

from common import environment, write_results


def variants() -> dict[str, tuple]:
    rows, features = 4096, 384
    weight = torch.nn.Parameter(torch.randn(features, features, device="cuda", dtype=torch.bfloat16))
    bias = torch.nn.Parameter(torch.randn(features, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(rows, features, device="cuda", dtype=torch.bfloat16)
    reinterpret = torch._C._dynamo.guards._reinterpret_tensor
    arena = torch.empty(4 * rows * features, dtype=torch.uint8, device="cuda").view(torch.bfloat16)
    slot = reinterpret(arena, (rows, features), (features, 1), 256)
    fresh = torch.empty(rows, features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        transposed = weight.t()
    strided = reinterpret(weight, (features, features), (1, features), 0)
    plain = weight.detach().t()
    return {"t() weight, arena out (ember)": (bias, x, transposed, slot),
            "reinterpreted weight, fresh out (inductor)": (bias, x, strided, fresh),
            "t() weight, fresh out": (bias, x, transposed, fresh),
            "reinterpreted weight, arena out": (bias, x, strided, slot),
            "plain tensors, fresh out": (bias.detach(), x, plain, fresh)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    calls = variants()
    device = torch.device("cuda")
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, (bias, x, weight, out) in calls.items():
                samples[name].append(time_us(lambda: torch.addmm(bias, x, weight, out=out), device,
                                             min_block_us=20000.0))
    rows = [{"variant": name, "us": statistics.median(times), "rounds_us": times} for name, times in samples.items()]
    lines = ["One bf16 addmm [4096, 384] × [384, 384] + bias: wall µs per call, back to back (median of rounds)"]
    lines += [f"{row['variant']:44} {row['us']:8.1f}" for row in rows]
    write_results(args.out, "addmm_host", {**environment(device), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
