"""Where the GPU time goes, per kernel: ember (step by step) against torch.compile (default: the kernels reduce-overhead replays) on one model,
and ember's kernels by the ATen op that launched them.

torch.profiler over a few calls after warm-up; prints and saves the top kernels by total device time,
so a speed gap can be named kernel by kernel.
Usage: python bench/profile_kernels.py [--model gpt2] [--out bench/results] [--top 12]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import ember
from ember import models

from common import environment, write_results

CALLS = 5


def launched_by(run, count: int) -> list[tuple[str, float, int]]:
    """[(op that launched kernels, device µs per call, kernels per call)]: the top-level ops of one profiled
    call, by the device time of the kernels under them."""
    with torch.no_grad():
        run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            run()
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in trace.events():
        if event.cpu_parent is None or not event.cpu_parent.name.startswith(("aten::", "ember::")):
            kernels = [kernel for child in _descendants(event) for kernel in child.kernels]
            if kernels and event.name.startswith(("aten::", "ember::")):
                entry = totals.setdefault(event.name, [0.0, 0])
                entry[0] += sum(kernel.duration for kernel in kernels)
                entry[1] += len(kernels)
    ranked = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)[:count]
    return [(name, us, launches) for name, (us, launches) in ranked]


def _descendants(event):
    yield event
    for child in event.cpu_children:
        yield from _descendants(child)


def wall_ms(run, calls: int = 200) -> float:
    """Median wall time of one call, synchronized, after warm-up."""
    times = []
    with torch.no_grad():
        for _ in range(20):
            run()
        for _ in range(calls):
            torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def top_kernels(run, count: int) -> tuple[float, int, list[tuple[str, float, int]]]:
    """(device ms per call, kernels per call, [(kernel, µs per call, launches per call)]) over CALLS profiled calls."""
    with torch.no_grad():
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            for _ in range(CALLS):
                run()
            torch.cuda.synchronize()
    events = [e for e in trace.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / CALLS / 1e3
    ranked = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:count]
    launches = sum(e.count for e in events) // CALLS
    return total, launches, [(e.key[:70], e.self_device_time_total / CALLS, e.count // CALLS) for e in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--replay", action="store_true",
                        help="the backends as users call them, replayed: torch.compile(backend='ember') against "
                             "mode='reduce-overhead' (kernels inside CUDA graphs included)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, inputs = models.load(args.model, "suite", device="cuda")
    with torch.no_grad():
        if args.replay:
            ours = torch.compile(model, backend="ember")
            compiled = torch.compile(model, mode="reduce-overhead")
        else:
            program = ember.compile(model, inputs, ember.Options(cuda_graphs=False))
            ours = program
            compiled = torch.compile(model)  # reduce-overhead runs these same kernels from a CUDA graph
    result, lines = {"model": args.model, "replay": args.replay}, []
    for name, run in (("ember", lambda: ours(*inputs)), ("torch.compile", lambda: compiled(*inputs))):
        total, launches, kernels = top_kernels(run, args.top)
        wall = wall_ms(run)
        result[name] = {"device_ms": total, "launches": launches, "wall_ms": wall, "kernels": kernels}
        lines.append(f"{name}: {total:.3f} ms of kernels per call ({launches} kernels), {wall:.3f} ms wall per call")
        lines += [f"  {us:9.1f} µs  ×{launches:<4d} {kernel}" for kernel, us, launches in kernels]
        if name == "ember" and not args.replay:
            ops = launched_by(run, args.top)
            result["ember_ops"] = ops
            lines.append("ember, by the ATen op that launched them:")
            lines += [f"  {us:9.1f} µs  ×{launches:<4d} {op}" for op, us, launches in ops]
    stem = f"profile_{args.model}{'_replay' if args.replay else ''}"
    write_results(args.out, stem, {**environment(torch.device("cuda")), **result}, "\n".join(lines))


if __name__ == "__main__":
    main()
