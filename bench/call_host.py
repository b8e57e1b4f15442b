"""Host time of one call through each entry point, with CUDA graphs: what the host spends per call (queued
while the device is kept busy, so no call waits for it) against the device's own time per call, the host
time of the pieces of an ember.compile call, and a cProfile of ember's calls. A call whose host time exceeds
its device time leaves the GPU idle between calls.
Usage: python bench/call_host.py [--models llama_b1 bert_masked] [--out bench/results]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import ember
from ember import models

from common import environment, wall_us, write_results

CALLS = 200


def host_us(call, calls: int = 30) -> float:
    """Host µs per call over `calls` calls queued while the device sleeps (nothing waits for it)."""
    for _ in range(10):
        call()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(1e8))
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    torch.cuda.synchronize()
    return best


def pieces(program: ember.Program, inputs: tuple) -> dict[str, float]:
    """Host µs of an ember.compile call's pieces: the whole call, Program.run on the flat tensors, the captured
    call alone, and the graph's replay alone."""
    flat = list(inputs)
    graphed = next((g for g in program.executor.graphed.values() if g is not None), None)
    found = {"call": host_us(lambda: program(*inputs)), "run": host_us(lambda: program.run(flat))}
    if graphed is not None:
        found["graphed"] = host_us(lambda: graphed(flat))
        found["replay"] = host_us(graphed.graph.replay)
    return found


def device_us(call) -> float:
    """Device µs per call: CUDA events around CALLS calls, after the host has queued far ahead."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # the host queues every call while the device sleeps
    start.record()
    for _ in range(CALLS):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / CALLS


def profile(call, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(CALLS):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return "\n".join(line[:170] for line in text.getvalue().splitlines() if line.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["llama_b1", "bert_masked"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--stem", default="call_host")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    rows, sections = [], []
    for name in args.models:
        torch.manual_seed(0)
        model, inputs = models.load(name, "suite", device="cuda")
        variants = {"reduce-overhead": torch.compile(model, mode="reduce-overhead"),
                    "ember backend": torch.compile(model, backend="ember"),
                    "ember export": ember.compile(model, inputs)}
        with torch.no_grad():
            for variant, compiled in variants.items():
                torch._dynamo.reset()  # each torch.compile variant compiles for itself
                call = lambda: compiled(*inputs)  # noqa: E731
                for _ in range(3):
                    call()
                rows.append({"model": name, "variant": variant, "host_us": host_us(call), "wall_us": wall_us(call, CALLS),
                             "device_us": device_us(call)})
                if variant == "ember export":
                    rows[-1]["pieces_host_us"] = pieces(compiled, inputs)
                if variant != "reduce-overhead" and not args.no_profile:
                    sections.append(f"## {name}, {variant}: cProfile of {CALLS} calls\n{profile(call, args.top)}")
            del variants
    lines = [f"Host µs per call (queued while the device sleeps), wall and device µs per call ({CALLS} calls back to back), with CUDA graphs",
             f"{'model':12} {'variant':16} {'host µs':>8} {'wall µs':>8} {'device µs':>9}"]
    lines += [f"{r['model']:12} {r['variant']:16} {r['host_us']:8.1f} {r['wall_us']:8.1f} {r['device_us']:9.1f}"
              for r in rows]
    lines += [f"{r['model']} ember export, host µs of its pieces: "
              + ", ".join(f"{piece} {us:.1f}" for piece, us in r["pieces_host_us"].items())
              for r in rows if "pieces_host_us" in r]
    write_results(args.out, args.stem, {**environment(torch.device("cuda")), "rows": rows},
                  "\n".join(lines) + "\n\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
