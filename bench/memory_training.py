"""Memory planning on training graphs (forward + backward from aot_autograd), on the CPU.

The training step is captured through torch.compile with a recording backend (shapes only: the models
live on the meta device), the forward and backward graphs are lowered to ember's IR and joined into one
timeline (saved activations live from their forward step to their last backward use), and the arena
is planned: lower bound, TFLite's greedy-by-size, first-fit, and ember's planner.
Usage: python bench/memory_training.py [--out bench/results] [--time-limit 10]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

from ember import models
from ember.frontend.decompositions import ember_decompositions
from ember.frontend.lower import lower_fx
from ember.ir.schedule import schedule_of
from ember.optimizer.memory_plan import first_fit, greedy_by_size, plan_intervals
from ember.optimizer.memory_verify import verify_plan

from common import environment, write_results

LOSSES = {
    "gpt2": lambda out: (out.logits.float() ** 2).mean(),
    "unet": lambda out: (out.float() ** 2).mean(),
}


def training_intervals(model: torch.nn.Module, inputs: tuple, loss) -> tuple[list[int], list[int], list[int]]:
    """Sizes and closed [start, end] steps of every buffer of one training step, forward then backward."""
    graphs = {}

    def record(name):
        def compiler(graph, example_inputs):
            graphs[name] = graph
            return make_boxed_func(graph)
        return compiler

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record("forward"), bw_compiler=record("backward"),
                                     decompositions=ember_decompositions())

    torch._dynamo.reset()
    loss(torch.compile(model, backend=backend)(*inputs)).backward()
    output = next(node for node in graphs["backward"].graph.nodes if node.op == "output")
    output.args = (tuple(arg for arg in output.args[0] if arg is not None),)  # integer inputs get no gradient
    graphs["backward"].recompile()
    forward, backward = lower_fx(graphs["forward"], {}), lower_fx(graphs["backward"], {})
    forward.verify()
    backward.verify()
    steps = len(forward.nodes)
    saved_inputs = [value.name for value in backward.inputs if not value.name.startswith("tangents")]
    saved_outputs = forward.outputs[len(forward.outputs) - len(saved_inputs):]
    last_use: dict[str, int] = {}
    for index, node in enumerate(backward.nodes):
        for name in node.inputs:
            last_use[name] = steps + index
    saved_until = {out: last_use.get(inp, steps) for out, inp in zip(saved_outputs, saved_inputs)}
    sizes, starts, ends = [], [], []
    for buffer in schedule_of(forward).buffers:
        sizes.append(buffer.size_bytes)
        starts.append(buffer.start)
        ends.append(max(buffer.end, saved_until.get(buffer.name, buffer.end)))
    for buffer in schedule_of(backward).buffers:
        sizes.append(buffer.size_bytes)
        starts.append(steps + buffer.start)
        ends.append(steps + buffer.end)
    return sizes, starts, ends


def measure(name: str, time_limit: float) -> dict:
    model, inputs = models.load(name, "suite", device="meta")
    model.train()
    started = time.perf_counter()
    sizes, starts, ends = training_intervals(model, inputs, LOSSES[name])
    captured = time.perf_counter() - started
    plan = plan_intervals(sizes, starts, ends, method="mip", time_limit=time_limit)
    verify_plan(plan, sizes, starts, ends)
    aligned = [-(-size // 256) * 256 for size in sizes]

    def arena(offsets):
        return max(offset + size for offset, size in zip(offsets, aligned))

    return {"model": name, "buffers": len(sizes), "capture_s": captured, "lower_bound": plan.lower_bound,
            "greedy_by_size": arena(greedy_by_size(aligned, starts, ends)), "first_fit": arena(first_fit(aligned, starts, ends)),
            "ember": plan.arena_bytes, "status": plan.status, "gap": plan.gap, "solve_s": plan.solve_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--time-limit", type=float, default=10.0)
    args = parser.parse_args()
    rows = [measure(name, args.time_limit) for name in LOSSES]
    lines = ["Training step (forward + backward), suite sizes, arena in MiB and as a multiple of the lower bound",
             f"{'model':6} {'buffers':>7} {'lower':>9} {'greedy-by-size':>16} {'first-fit':>16} {'ember':>16} {'status':>8} {'s':>5}"]
    for r in rows:
        lower = r["lower_bound"]
        cells = [f"{r[key] / 2**20:8.1f} ({r[key] / lower:.3f})" for key in ("greedy_by_size", "first_fit", "ember")]
        lines.append(f"{r['model']:6} {r['buffers']:7d} {lower / 2**20:9.1f} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} "
                     f"{r['status']:>8} {r['solve_s']:5.2f}")
    write_results(args.out, "memory_training", {**environment(torch.device("cpu")), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
