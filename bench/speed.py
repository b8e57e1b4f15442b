"""Speed on the GPU: eager vs torch.compile (default and reduce-overhead) vs ember, per suite model.

One process, one device, every variant of a model timed side by side in rotation (three rounds, the
median of each), after warm-up: median ms per call, speedup over eager, peak memory above weights and
inputs (the most allocated while a variant is built and first called, so what it keeps between calls,
such as ember's arena or a CUDA-graph pool, counts; cuBLAS's workspaces are cleared before each variant,
so each pays for its own), compile time (first calls included), and ember's max error against eager.
Usage: python bench/speed.py [--out bench/results] [--models mlp gpt2 ...] [--rounds 3]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import ember
from ember import models
from ember.optimizer.cost.calibrate import time_us

from common import environment, write_results

VARIANTS = ("eager", "inductor", "inductor_ro", "ember")


def build(name: str) -> tuple[dict, dict, dict, tuple]:
    """Every variant's callable, compile time (its first three calls included) and peak memory: the most
    allocated above what was allocated before it was built, while it was built and called (so what it
    keeps between calls, such as ember's arena or a CUDA-graph pool, counts, and so do its transients).
    cuBLAS's workspaces (one per stream, 32 MiB on Hopper, kept for the process's life) are cleared before
    each variant, so each pays for the ones it makes, whichever variant ran before it."""
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite", device="cuda")
    calls, compile_s, peaks = {}, {}, {}
    builders = {"eager": lambda: model,
                "inductor": lambda: torch.compile(model, mode="default"),
                "inductor_ro": lambda: torch.compile(model, mode="reduce-overhead"),
                "ember": lambda: ember.compile(model, inputs)}
    with torch.no_grad():
        for variant, make in builders.items():
            gc.collect()
            torch.cuda.synchronize()
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            compiled = make()
            for _ in range(3):  # reduce-overhead records its graph on the third call
                result = compiled(*inputs)
                del result
            torch.cuda.synchronize()
            compile_s[variant] = 0.0 if variant == "eager" else time.perf_counter() - started
            calls[variant], peaks[variant] = compiled, torch.cuda.max_memory_allocated() - before
    return calls, compile_s, peaks, inputs


def measure(name: str, rounds: int) -> dict:
    calls, compile_s, peaks, inputs = build(name)
    device = torch.device("cuda")
    samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with torch.no_grad():
        expected = calls["eager"](*inputs)
        error = models.max_error(expected, calls["ember"](*inputs))
        for _ in range(rounds):
            for variant in VARIANTS:
                samples[variant].append(time_us(lambda: calls[variant](*inputs), device) / 1e3)
    program = calls["ember"]
    row = {"model": name, "ember_max_err": error, "ember_cuda_graph": any(program.executor.graphed.values()), "ember_fused_groups": program.report.fusion.get("groups", 0),
           "ember_fused_nodes": program.report.fusion.get("fused_nodes", 0), "nodes": len(program.graph.nodes)}
    for variant in VARIANTS:
        row[f"{variant}_ms"] = statistics.median(samples[variant])
        row[f"{variant}_peak_mib"] = peaks[variant] / 2**20
        row[f"{variant}_compile_s"] = compile_s[variant]
    torch._dynamo.reset()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=list(models.SUITE))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(measure(name, args.rounds))
        print(f"{name}: eager {rows[-1]['eager_ms']:.3f} ms, ember {rows[-1]['ember_ms']:.3f} ms", flush=True)
    lines = ["Speed (median ms per call; × = speedup over eager), peak MiB above weights and inputs, compile s",
             f"{'model':9} {'eager':>8} {'compile':>14} {'reduce-ovh':>14} {'ember':>14} {'peak e/c/ro/ember':>24} "
             f"{'compile c/ro/ember s':>21} {'groups':>7} {'max err':>8}"]
    for r in rows:
        times = " ".join("%7.3f %5.2f×" % (r[v + "_ms"], r["eager_ms"] / r[v + "_ms"]) for v in VARIANTS[1:])
        peaks = "/".join("%.0f" % r[v + "_peak_mib"] for v in VARIANTS)
        compiles = "/".join("%.1f" % r[v + "_compile_s"] for v in VARIANTS[1:])
        lines.append(f"{r['model']:9} {r['eager_ms']:8.3f} {times} {peaks:>24} {compiles:>21} "
                     f"{r['ember_fused_groups']:7d} {r['ember_max_err']:8.2g}")
    best = [max(r["eager_ms"] / r["inductor_ms"], r["eager_ms"] / r["inductor_ro_ms"]) for r in rows]
    ours = [r["eager_ms"] / r["ember_ms"] for r in rows]
    lines.append(f"geomean speedup over eager: ember {statistics.geometric_mean(ours):.2f}×, better torch.compile "
                 f"mode {statistics.geometric_mean(best):.2f}× (target: ember ≥ 1.10 × that)")
    write_results(args.out, "speed", {**environment(torch.device("cuda")), "models": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
