"""Compile time through each entry point: `ember.compile`, and torch.compile (ember's backend, Inductor's default) up
to the end of the first call, each in a fresh process (a warm process hides imports and torch's first-time setup).

Median and range over the repeats, per model; `ember.compile`'s capture (torch.export to ember's ATen set) apart.
Usage: python bench/compile_time.py [--models llama mixtral bert] [--size tiny] [--device cpu] [--repeats 3]
       [--entries ember backend inductor] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ENTRIES = ("ember", "backend", "inductor")


def compile_once(name: str, entry: str, size: str, device: str) -> dict[str, float]:
    """Seconds to compile `name` through `entry` and finish its first call, in this process."""
    import ember
    from ember import models

    model, inputs = models.load(name, size, device)
    with torch.no_grad():
        started = time.perf_counter()
        if entry == "ember":
            program = ember.compile(model, inputs)
            program(*inputs)
        else:
            torch.compile(model, backend="ember" if entry == "backend" else "inductor")(*inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = {"total_s": time.perf_counter() - started}
    if entry == "ember":
        seconds["capture_s"] = program.report.stage_seconds["capture"]
    return seconds


def measure(name: str, entry: str, args: argparse.Namespace) -> list[dict[str, float]]:
    """`compile_once` in `args.repeats` fresh processes."""
    runs = []
    for _ in range(args.repeats):
        child = [sys.executable, __file__, "--child", name, entry, "--size", args.size, "--device", args.device]
        result = subprocess.run(child, capture_output=True, text=True, check=True)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama", "mixtral", "bert"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--entries", nargs="+", choices=ENTRIES, default=None,
                        help="default: ember and backend, and inductor on a GPU")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "ENTRY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(compile_once(*args.child, args.size, args.device)))
        return
    from common import environment, write_results

    entries = args.entries or (ENTRIES if args.device == "cuda" else ENTRIES[:2])
    result = {**environment(torch.device(args.device)), "size": args.size, "repeats": args.repeats, "models": {}}
    lines = [f"{'model':10s} {'entry':9s} {'median s':>9s} {'range s':>13s} {'capture s':>10s}"]
    for name in args.models:
        for entry in entries:
            runs = measure(name, entry, args)
            result["models"].setdefault(name, {})[entry] = runs
            totals = [run["total_s"] for run in runs]
            captures = [run["capture_s"] for run in runs if "capture_s" in run]
            capture = f"{statistics.median(captures):10.2f}" if captures else ""
            lines.append(f"{name:10s} {entry:9s} {statistics.median(totals):9.2f} "
                         f"{min(totals):6.2f}-{max(totals):<6.2f} {capture}")
    write_results(args.out, f"compile_time_{args.device}", result, "\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
