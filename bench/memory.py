"""Memory on the GPU: ember's planned arena against measured peak activation memory of eager and torch.compile.

For every suite model (bf16, inference): the lower bound (max live bytes in execution order), the
greedy and planned arenas of all buffers in one (graph outputs included), and torch.cuda.max_memory_allocated
above the weights and inputs for eager, for torch.compile (default mode, after warm-up) and for ember's
Program step by step, whose calls allocate their arenas and free them as their windows of steps close (the
prediction: ember's `peak_bytes`). A Program with CUDA graphs on
(the default on a GPU) is also run, to check its captured replay matches eager.
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
from ember.ir.schedule import schedule_of
from ember.optimizer.memory_plan import plan_intervals
from ember.optimizer.memory_verify import verify_plan
from ember.runtime.executor import given_memory
from ember.tolerance import result_tolerance

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
    all_buffers = schedule_of(graph).buffers
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
    with torch.no_grad():
        inductor_error = models.max_error(model(*inputs), compiled(*inputs))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(*inputs)
        program = ember.compile(model, inputs, ember.Options(cuda_graphs=False))
        program(*inputs)
        memory = program.report.memory
        ember_peak = peak_above_baseline(lambda: program(*inputs))
        error = models.max_error(expected, program(*inputs))
        replay = cuda_graph_replay(model, inputs, program(*inputs))
        outputs = sum(
            t.nbytes for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor))
        eager_rerun = models.max_error(expected, model(*inputs))
        without = ember.compile(model, inputs, ember.Options(arena=False))
        error_without = models.max_error(expected, without(*inputs))
        divergence = first_divergence(program, inputs)
        transients = largest_transients(program, inputs)
    return {"model": name, "buffers": len(all_buffers), "lower_bound": planned.lower_bound, "greedy": greedy.arena_bytes,
            "planned": planned.arena_bytes, "plan_status": planned.status, "plan_s": planned.solve_seconds,
            "eager_peak": eager, "inductor_peak": inductor, "inductor_compile_s": compile_s,
            "ember_predicted_peak": memory["peak_bytes"], "ember_arenas": memory["arenas"],
            "ember_largest_arena": memory["arena_bytes"], "ember_reused_values": memory["reused_values"],
            "ember_peak": ember_peak, "outputs_bytes": outputs, "ember_max_err": error,
            "ember_no_arena_max_err": error_without, "eager_rerun_max_err": eager_rerun, "tolerance": result_tolerance(expected),
            "cuda_graph_replay": replay, "first_divergence": divergence, "inductor_max_err": inductor_error,
            "largest_transients": transients}


def walk(program, inputs, visit) -> None:
    """Run the program's steps as its executor does (arenas opening and closing), calling visit(step, run)
    with a function that runs the step and returns its results."""
    executor = program.executor
    tensors = program._tensor_inputs(torch.utils._pytree.tree_leaves((inputs, {})))
    env = dict(program.graph.weights)
    env.update(zip(executor.input_names, tensors))
    arenas = [None] * len(executor.layout.arenas)
    for step in executor.steps_on(tensors[0].device):
        for index in step.opens:
            arenas[index] = torch.empty(executor.layout.arenas[index].size_bytes, dtype=torch.uint8, device="cuda")
        args = [env[name] for name in step.inputs]
        results = visit(step, lambda: step.run(args, given_memory(step, arenas, args) if step.targets else ()), args)
        env.update(zip(step.outputs, (results[position] for position in step.positions)))
        del results
        for name in step.frees:
            del env[name]
        for index in step.closes:
            arenas[index] = None


def step_allocations(program, inputs) -> list[tuple[int, int, str]]:
    """For each step of a call, step by step: (bytes its peak rose above what was allocated before it, bytes it
    left allocated, what it runs)."""
    nodes = {node.name: node for node in program.graph.nodes}
    found = []

    def visit(step, run, args):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        results = run()
        torch.cuda.synchronize()
        node = nodes.get(step.node)
        what = (node.target or node.op) if node is not None else f"fused group {step.node}"
        found.append((torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before, what))
        return results

    walk(program, inputs, visit)
    return found


def largest_transients(program, inputs, count: int = 3) -> list[str]:
    """The steps that allocate most beyond their planned memory while they run (fresh results, workspaces)."""
    found = sorted(((peak, what) for peak, _, what in step_allocations(program, inputs)), reverse=True)
    return [f"{size / 2**20:.1f} MiB {what}" for size, what in found[:count]]


UNINITIALISED = {"empty.memory_format", "empty_permuted", "empty_strided", "new_empty"}
"""Ops whose results have no defined values: two runs may differ there and nowhere after."""


def first_divergence(program, inputs) -> str:
    """The first node whose result from the arenas differs (bitwise) from the allocator's, on the same inputs."""
    executor = program.executor
    tensors = program._tensor_inputs(torch.utils._pytree.tree_leaves((inputs, {})))
    plain = dict(program.graph.weights)
    plain.update(zip(executor.input_names, tensors))
    references = iter(executor.steps)
    nodes = {node.name: node for node in program.graph.nodes}
    found: list[str] = []

    def visit(planned, run, args):
        reference = next(references)
        want = reference.run([plain[name] for name in reference.inputs], ())
        got = run()
        for name, position in zip(planned.outputs, planned.positions):
            plain[name] = want[position]
            if planned.node in nodes and nodes[planned.node].op in UNINITIALISED:
                got[position].copy_(want[position])  # both runs go on from the same bytes
                continue
            if not found and not torch.equal(got[position], want[position]):
                what = nodes[planned.node].op if planned.node in nodes else "fused group"
                difference = (got[position].double() - want[position].double()).abs().max().item()
                found.append(f"{planned.node} {what} -> %{name} differs by {difference:.3g}")
        return got

    walk(program, inputs, visit)
    return found[0] if found else "none"


def cuda_graph_replay(model, inputs, stepwise) -> str:
    """Whether a Program with CUDA graphs on captured its call, and whether its replays (the first and a later
    one) give what the same program gives step by step (`stepwise`)."""
    program = ember.compile(model, inputs, ember.Options(cuda_graphs=True))
    first, second = program(*inputs), program(*inputs)
    if program.executor.graphed.get(torch.device("cuda", torch.cuda.current_device())) is None:
        return "runs step by step (capture failed)"
    error = max(models.max_error(stepwise, first), models.max_error(stepwise, second))
    return "ok (bitwise)" if error == 0 else f"differs by {error:.3g}"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=list(models.SUITE))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(measure(name))
        print(f"{name}: planned {rows[-1]['planned'] / 2**20:.1f} MiB, ember {rows[-1]['ember_peak'] / 2**20:.1f} MiB, "
              f"torch.compile {rows[-1]['inductor_peak'] / 2**20:.1f} MiB", flush=True)
    mib = 2**20
    lines = ["Activation memory (MiB): ember's plan and measured peak against measured peaks above weights and inputs",
             f"{'model':9} {'lower':>8} {'greedy':>8} {'planned':>8} {'status':>8} {'eager':>8} {'compile':>8} "
             f"{'ember':>8} {'predicted':>9} {'arenas':>6} {'outputs':>8} {'ember/compile':>13} "
             f"{'max err':>8} {'no arena':>8} {'eager':>8} {'tol':>6}  cuda graph"]
    for r in rows:
        lines.append(f"{r['model']:9} {r['lower_bound'] / mib:8.1f} {r['greedy'] / mib:8.1f} {r['planned'] / mib:8.1f} "
                     f"{r['plan_status']:>8} {r['eager_peak'] / mib:8.1f} {r['inductor_peak'] / mib:8.1f} "
                     f"{r['ember_peak'] / mib:8.1f} {r['ember_predicted_peak'] / mib:9.1f} {r['ember_arenas']:6d} "
                     f"{r['outputs_bytes'] / mib:8.1f} {r['ember_peak'] / max(r['inductor_peak'], 1):13.3f} "
                     f"{r['ember_max_err']:8.2g} {r['ember_no_arena_max_err']:8.2g} {r['eager_rerun_max_err']:8.2g} "
                     f"{r['tolerance']:6.3f}  {r['cuda_graph_replay']}")
    lines += ["", "first node where the arenas' run differs bitwise from the allocator's:"]
    lines += [f"{r['model']:9} {r['first_divergence']}" for r in rows]
    lines += ["", "max error against eager: ember (no arena) and torch.compile, same inputs"]
    lines += [f"{r['model']:9} ember {r['ember_no_arena_max_err']:.3g}  torch.compile {r['inductor_max_err']:.3g}" for r in rows]
    lines += ["", "steps allocating most beyond their planned memory while they run:"]
    lines += [f"{r['model']:9} {'; '.join(r['largest_transients'])}" for r in rows]
    write_results(args.out, "memory", {**environment(torch.device("cuda")), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
