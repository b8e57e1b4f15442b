"""Cost-model validation on the GPU: predicted against measured time, per node and per whole model.

Calibrates the device first (the profile is saved beside the results), then for every suite model:
runs it once through the reference executor keeping every value, times each non-view node on its own
(median of blocks, after warm-up), times the whole model in eager mode (the model's own forward, and
the captured graph's ATen ops one by one through the reference executor: the difference is Python
framework overhead the graph cannot see), and compares with the cost model. Reports Spearman rank
correlation over nodes and median |relative error| per op class.
Usage: python bench/cost_model.py [--out bench/results] [--models mlp gpt2 ...] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from scipy.stats import spearmanr

import ember
from ember import models
from ember.api import optimize
from ember.frontend import from_module
from ember.optimizer.cost import CostModel, save_profile
from ember.optimizer.cost.calibrate import calibrate, device_time_us, time_us
from ember.runtime import Executor

from common import environment, write_results

TARGETS = {"spearman": 0.9, "matmul": 0.25, "memory": 0.35, "whole_model": 0.30}


def op_class(kind: str, bound: str) -> str:
    """matmul (incl. convolution), attention, memory (memory-bound others), overhead (launch-bound others)."""
    if kind in ("matmul", "convolution"):
        return "matmul"
    if kind == "attention":
        return "attention"
    return "memory" if bound == "memory" else "overhead"


def measure_model(name: str, cost_model: CostModel, options: ember.Options, device: torch.device,
                  size: str) -> tuple[list[dict], dict]:
    """Per-node rows and the whole-model row for one suite model."""
    torch.manual_seed(0)
    model, inputs = models.load(name, size, device=device)
    captured = from_module(model, inputs)
    graph = optimize(captured.graph, options, {})
    types = graph.types()
    env = dict(graph.weights)
    env.update(zip((value.name for value in graph.inputs), [t for t in inputs if isinstance(t, torch.Tensor)]))
    rows = []
    with torch.no_grad():
        for node in graph.nodes:
            run = node.definition.bind(node.attrs)
            args = [env[input_name] for input_name in node.inputs]
            env.update(zip((value.name for value in node.outputs), run(args)))
            if node.definition.kind == "view":
                continue
            cost = cost_model.node(node, types)
            measured = time_us(lambda: run(args), device, min_block_us=1000.0, blocks=5)
            rows.append({
                "model": name, "node": node.name, "op": node.target if node.is_extern else node.op,
                "kind": node.definition.kind, "bound": cost.bound, "class": op_class(node.definition.kind, cost.bound),
                "flops": cost.flops, "bytes": cost.bytes_moved, "predicted_us": cost.predicted_us, "measured_us": measured,
                "predicted_kernel_us": cost.kernel_us, "kernel_us": kernel_time_us(node, run, args, device),
            })
        eager_us = time_us(lambda: model(*inputs), device, min_block_us=20000.0, blocks=7)
        executor = Executor(graph)
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        graph_us = time_us(lambda: executor(tensors), device, min_block_us=20000.0, blocks=7)
    predicted = cost_model.program(graph).predicted_us
    whole = {"model": name, "nodes": len(graph.nodes), "predicted_us": predicted, "eager_us": eager_us,
             "graph_eager_us": graph_us, "sum_of_measured_nodes_us": sum(row["measured_us"] for row in rows),
             "relative_error": (predicted - eager_us) / eager_us,
             "graph_relative_error": (predicted - graph_us) / graph_us}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, whole


HOST_SYNCING = frozenset({"grouped_mm"})
"""Ops whose reference waits on the device (offsets.tolist()): they cannot be captured in a CUDA graph."""


def kernel_time_us(node, run, args, device: torch.device) -> float | None:
    """Device time of the node's kernels by CUDA-graph replay (clocks up, host out of the way); None
    where the op cannot be captured."""
    if device.type != "cuda" or node.op in HOST_SYNCING or node.is_extern:
        return None
    try:
        return device_time_us(lambda: run(args), device, copies=10)
    except RuntimeError:
        torch.cuda.synchronize()
        return None


def summarize(rows: list[dict], wholes: list[dict]) -> dict:
    """Spearman over nodes (all and per model) and median |relative error| per class."""
    def rel(row: dict) -> float:
        return abs(row["predicted_us"] - row["measured_us"]) / row["measured_us"]

    by_class: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_class[row["class"]].append(rel(row))
    per_model = {}
    for name in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == name]
        per_model[name] = spearmanr([r["predicted_us"] for r in mine], [r["measured_us"] for r in mine]).statistic
    captured = [row for row in rows if row["kernel_us"] is not None]
    kernel_by_class: dict[str, list[float]] = defaultdict(list)
    for row in captured:
        kernel_by_class[row["class"]].append(abs(row["predicted_kernel_us"] - row["kernel_us"]) / row["kernel_us"])
    return {
        "spearman_all_nodes": spearmanr([r["predicted_us"] for r in rows], [r["measured_us"] for r in rows]).statistic,
        "spearman_per_model": per_model,
        "median_relative_error": {key: statistics.median(values) for key, values in by_class.items()},
        "nodes_per_class": {key: len(values) for key, values in by_class.items()},
        "kernel_spearman": spearmanr([r["predicted_kernel_us"] for r in captured], [r["kernel_us"] for r in captured]).statistic
        if captured else None,
        "kernel_median_relative_error": {key: statistics.median(values) for key, values in kernel_by_class.items()},
        "kernel_nodes_per_class": {key: len(values) for key, values in kernel_by_class.items()},
        "whole_model_relative_error": {w["model"]: w["relative_error"] for w in wholes},
    }


def table(result: dict) -> str:
    summary = result["summary"]
    kernel_rho = summary["kernel_spearman"]
    lines = [f"# {result['device']}, torch {result['torch']}, triton {result['triton']}; profile {result['profile']['name']}",
             f"Spearman over all {len(result['nodes'])} timed nodes, eager op time: {summary['spearman_all_nodes']:.3f}; "
             f"device kernel time (CUDA-graph replay): {kernel_rho if kernel_rho is None else format(kernel_rho, '.3f')} "
             f"(target >= {TARGETS['spearman']})", "",
             f"{'class':10} {'nodes':>6} {'eager |rel err|':>16} {'kernels':>8} {'kernel |rel err|':>17}  target"]
    for key, value in sorted(summary["median_relative_error"].items()):
        target = TARGETS.get(key)
        kernel = summary["kernel_median_relative_error"].get(key)
        lines.append(f"{key:10} {summary['nodes_per_class'][key]:6d} {value:15.1%} "
                     f"{summary['kernel_nodes_per_class'].get(key, 0):8d} {kernel if kernel is None else format(kernel, '16.1%'):>17}  "
                     f"{'<= ' + format(target, '.0%') if target else '-'}")
    lines += ["", f"{'model':9} {'nodes':>5} {'spearman':>8} {'eager ms':>9} {'graph ms':>9} {'predicted ms':>12} "
                  f"{'vs eager':>8} {'vs graph':>8}"]
    for whole in result["models"]:
        lines.append(f"{whole['model']:9} {whole['nodes']:5d} {summary['spearman_per_model'][whole['model']]:8.3f} "
                     f"{whole['eager_us'] / 1e3:9.3f} {whole['graph_eager_us'] / 1e3:9.3f} {whole['predicted_us'] / 1e3:12.3f} "
                     f"{whole['relative_error']:+8.1%} {whole['graph_relative_error']:+8.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=list(models.SUITE))
    parser.add_argument("--quick", action="store_true", help="quick calibration")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    parser.add_argument("--size", default="suite", choices=models.SIZES)
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    profile = calibrate(device, quick=args.quick)
    save_profile(profile, f"{args.out}/{profile.name}.json")
    print(f"calibrated {profile.name} in {time.perf_counter() - started:.1f} s", flush=True)
    cost_model = CostModel(profile)
    options = ember.Options()
    rows, wholes = [], []
    for name in args.models:
        model_rows, whole = measure_model(name, cost_model, options, device, args.size)
        rows += model_rows
        wholes.append(whole)
        print(f"{name}: {len(model_rows)} nodes timed, eager {whole['eager_us'] / 1e3:.3f} ms, "
              f"predicted {whole['predicted_us'] / 1e3:.3f} ms", flush=True)
    result = {**environment(device), "profile": json.loads(profile.to_json()), "targets": TARGETS,
              "models": wholes, "nodes": rows}
    result["summary"] = summarize(rows, wholes)
    write_results(args.out, "cost_model", result, table(result))


if __name__ == "__main__":
    main()
