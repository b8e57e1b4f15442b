"""Memory on the GPU: ember's planned arena against measured peak activation memory of eager and torch.compile.

For every suite model (bf16, inference): the lower bound (max live bytes in execution order), the
greedy and planned arenas (graph outputs included), and torch.cuda.max_memory_allocated above the
weights and inputs for eager and for torch.compile (default mode, after warm-up). ember's own measured
peak needs the runtime arena, which is not built yet.
Usage: python bench/memory.py [--out bench/results] [--models mlp gpt2 ...]
"""
from __future__ import annotations

import argparse
import time

import torch

import ember
from ember import models
from ember.api import optimize
from ember.frontend import from_module
from ember.optimizer.liveness import buffers
from ember.optimizer.memory_plan import plan_intervals
from ember.optimizer.memory_verify import verify_plan

from common import environment, write_results


def peak_above_baseline(run) -> int:
    """Bytes allocated at the peak of `run()` above what was allocated before it."""
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        result = run()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - baseline


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite", device="cuda")
    graph = optimize(from_module(model, inputs).graph, ember.Options(), {})
    all_buffers = buffers(graph)
    intervals = ([b.size_bytes for b in all_buffers], [b.start for b in all_buffers], [b.end for b in all_buffers])
    greedy = plan_intervals(*intervals, method="greedy")
    planned = plan_intervals(*intervals, method="mip", time_limit=10.0)
    verify_plan(planned, *intervals)
    eager = peak_above_baseline(lambda: model(*inputs))
    compiled = torch.compile(model)
    started = time.perf_counter()
    with torch.no_grad():
        compiled(*inputs)
    compile_s = time.perf_counter() - started
    inductor = peak_above_baseline(lambda: compiled(*inputs))
    torch._dynamo.reset()
    return {"model": name, "buffers": len(all_buffers), "lower_bound": planned.lower_bound, "greedy": greedy.arena_bytes,
            "planned": planned.arena_bytes, "plan_status": planned.status, "plan_s": planned.solve_seconds,
            "eager_peak": eager, "inductor_peak": inductor, "inductor_compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=list(models.SUITE))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(measure(name))
        print(f"{name}: planned {rows[-1]['planned'] / 2**20:.1f} MiB, torch.compile {rows[-1]['inductor_peak'] / 2**20:.1f} MiB", flush=True)
    mib = 2**20
    lines = ["Activation memory (MiB): ember's plan against measured peaks above weights and inputs",
             f"{'model':9} {'lower':>8} {'greedy':>8} {'planned':>8} {'status':>8} {'eager':>8} {'compile':>8} {'plan/compile':>12}"]
    for r in rows:
        lines.append(f"{r['model']:9} {r['lower_bound'] / mib:8.1f} {r['greedy'] / mib:8.1f} {r['planned'] / mib:8.1f} "
                     f"{r['plan_status']:>8} {r['eager_peak'] / mib:8.1f} {r['inductor_peak'] / mib:8.1f} "
                     f"{r['planned'] / max(r['inductor_peak'], 1):12.3f}")
    write_results(args.out, "memory", {**environment(torch.device("cuda")), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
