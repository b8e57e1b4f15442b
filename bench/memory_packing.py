"""Memory planning on hard and large interval sets, on the CPU (the targets name this 2-core machine).

MiniMalloc's eleven "challenging" instances (../shared/data/minimalloc) against their capacity, and
random interval sets up to 2,000 buffers against greedy and the lower bound. Every plan is verified.
Usage: python bench/memory_packing.py [--out bench/results] [--time-limit 60] [--data ../shared/data/minimalloc]
"""
from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import torch

from ember.optimizer.memory_plan import plan_intervals
from ember.optimizer.memory_verify import verify_plan

from common import environment, write_results

CAPACITY = 1_048_576


def minimalloc(path: Path, time_limit: float) -> dict:
    """One instance: half-open [lower, upper) lifetimes become closed [lower, upper - 1]."""
    rows = list(csv.DictReader(path.open()))
    sizes = [int(r["size"]) for r in rows]
    starts = [int(r["lower"]) for r in rows]
    ends = [int(r["upper"]) - 1 for r in rows]
    greedy = plan_intervals(sizes, starts, ends, alignment=1, method="greedy")
    planned = plan_intervals(sizes, starts, ends, alignment=1, method="mip", time_limit=time_limit)
    verify_plan(planned, sizes, starts, ends, alignment=1)
    return {"instance": path.name.split(".")[0], "buffers": len(sizes), "lower_bound": planned.lower_bound / CAPACITY,
            "greedy": greedy.arena_bytes / CAPACITY, "ember": planned.arena_bytes / CAPACITY, "status": planned.status,
            "gap": planned.gap, "seconds": planned.solve_seconds, "within_capacity": planned.arena_bytes <= CAPACITY}


def random_set(count: int, seed: int, time_limit: float) -> dict:
    """Transformer-like lifetimes: mostly short, a few long; sizes spread over three orders of magnitude."""
    rng = random.Random(seed)
    steps = count // 2
    starts = [rng.randrange(steps) for _ in range(count)]
    ends = [min(steps, s + (rng.randrange(3) if rng.random() < 0.8 else rng.randrange(steps // 4 + 1))) for s in starts]
    sizes = [rng.choice((1, 2, 4, 8, 16, 64, 256)) * rng.randrange(256, 4096) for _ in range(count)]
    greedy = plan_intervals(sizes, starts, ends, method="greedy")
    planned = plan_intervals(sizes, starts, ends, method="mip", time_limit=time_limit)
    verify_plan(planned, sizes, starts, ends)
    return {"buffers": count, "seed": seed, "lower_bound": planned.lower_bound, "greedy": greedy.arena_bytes,
            "ember": planned.arena_bytes, "status": planned.status, "seconds": planned.solve_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "minimalloc"))
    args = parser.parse_args()
    hard = [minimalloc(path, args.time_limit) for path in sorted(Path(args.data).glob("*.csv"))]
    for row in hard:
        print(f"{row['instance']}: ember {row['ember']:.4f}x capacity in {row['seconds']:.1f} s ({row['status']})", flush=True)
    rand = [random_set(count, seed, 10.0) for count in (100, 500, 2000) for seed in range(3)]
    lines = ["MiniMalloc challenging instances (arena / capacity; every plan verified)",
             f"{'inst':4} {'buffers':>7} {'lower':>7} {'greedy':>7} {'ember':>7} {'status':>9} {'gap':>6} {'s':>6}"]
    for r in hard:
        lines.append(f"{r['instance']:4} {r['buffers']:7d} {r['lower_bound']:7.4f} {r['greedy']:7.4f} {r['ember']:7.4f} "
                     f"{r['status']:>9} {r['gap']:6.3f} {r['seconds']:6.1f}")
    within = sum(r["within_capacity"] for r in hard)
    worst = max(r["ember"] for r in hard)
    lines += [f"within capacity: {within}/{len(hard)} (target >= 9); worst {worst:.4f}x (target <= 1.05x)", "",
              "Random interval sets (bytes; 10 s limit)",
              f"{'buffers':>7} {'seed':>4} {'lower':>12} {'greedy':>12} {'ember':>12} {'vs lower':>8} {'status':>9} {'s':>6}"]
    for r in rand:
        lines.append(f"{r['buffers']:7d} {r['seed']:4d} {r['lower_bound']:12d} {r['greedy']:12d} {r['ember']:12d} "
                     f"{r['ember'] / r['lower_bound']:8.4f} {r['status']:>9} {r['seconds']:6.1f}")
    result = {**environment(torch.device("cpu")), "time_limit_s": args.time_limit, "minimalloc": hard, "random": rand}
    write_results(args.out, "memory_packing", result, "\n".join(lines))


if __name__ == "__main__":
    main()
