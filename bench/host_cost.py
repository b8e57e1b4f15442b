"""Host cost of a Program run step by step on the GPU: where the Python time goes, and what one kernel launch costs.

For each model (suite size, bf16): the per-call time of `ember.compile(..., cuda_graphs=False)`, its step count,
and a cProfile of a few calls (top functions by own time); then the host time of launching one generated kernel
through ember's Kernel (Triton's JIT launch path) against the same compiled kernel's own runner
(`CompiledKernel[grid]`), and against one ATen op, each timed without synchronizing (host time only).
Usage: python bench/host_cost.py [--models llama_b1 bert] [--out bench/results]
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
from ember.codegen import GroupKernel
from ember.codegen.cache import load_kernel

from common import environment, write_results


def host_us(fn, calls: int = 2000) -> float:
    """Mean host time per call over `calls` calls, queued without waiting for the device."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def profile_model(name: str) -> tuple[dict, str, GroupKernel | None, list]:
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite", device="cuda")
    with torch.no_grad():
        program = ember.compile(model, inputs, {"cuda_graphs": False})
        call_us = host_us(lambda: program(*inputs), calls=50)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            program(*inputs)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - started) / 20 * 1e6
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            program(*inputs)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    kernels = [step for step in program.executor.work or () if isinstance(step, GroupKernel)]
    types = program.graph.types()
    tensors = None
    if kernels:
        kernel = kernels[0]
        tensors = [torch.randn(types[n].shape, device="cuda").to(types[n].dtype) if types[n].dtype.is_floating_point
                   else torch.zeros(types[n].shape, dtype=types[n].dtype, device="cuda") for n in kernel.inputs]
        tensors += [torch.empty(v.type.shape, dtype=v.type.dtype, device="cuda") for v in kernel.outputs]
    row = {"model": name, "steps": len(program.executor.steps), "host_us_per_call": call_us, "wall_us_per_call": wall_us,
           "kernels": len(kernels)}
    return row, text.getvalue(), kernels[0] if kernels else None, tensors


def launch_costs(kernel: GroupKernel, tensors: list[torch.Tensor]) -> dict:
    source = kernel.kernel.source
    inputs, outputs = tensors[:len(kernel.inputs)], tensors[len(kernel.inputs):]
    ember_us = host_us(lambda: kernel.kernel(inputs, outputs))
    jit = load_kernel(source.name, source.source)
    compiled = jit.warmup(*tensors, *source.scalars, grid=(source.programs,), **dict(source.constants),
                          num_warps=source.num_warps)
    runner = compiled[(source.programs, 1, 1)]
    args = (*tensors, *source.scalars)
    try:
        runner(*args, *dict(source.constants).values())
        runner_us = host_us(lambda: runner(*args, *dict(source.constants).values()))
        runner_error = ""
    except Exception as error:  # the launcher's argument convention differs across Triton versions
        runner_us, runner_error = float("nan"), f"{type(error).__name__}: {error}"
    a, b = tensors[0], tensors[0]
    aten_us = host_us(lambda: torch.ops.aten.add.Tensor(a, b))
    return {"kernel": source.name, "ember_launch_us": ember_us, "compiled_runner_us": runner_us,
            "runner_error": runner_error, "aten_add_us": aten_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["llama_b1", "bert"])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows, profiles, launch = [], [], None
    for name in args.models:
        row, profile, kernel, tensors = profile_model(name)
        rows.append(row)
        profiles.append(f"## {name}\n{profile}")
        if launch is None and kernel is not None:
            launch = launch_costs(kernel, tensors)
    lines = ["Host cost step by step (cuda_graphs=False), µs per call",
             f"{'model':10} {'steps':>6} {'kernels':>8} {'host µs':>9} {'wall µs':>9} {'host µs/step':>13}"]
    for r in rows:
        lines.append(f"{r['model']:10} {r['steps']:6d} {r['kernels']:8d} {r['host_us_per_call']:9.0f} "
                     f"{r['wall_us_per_call']:9.0f} {r['host_us_per_call'] / r['steps']:13.1f}")
    if launch:
        lines.append(f"one generated kernel ({launch['kernel']}): ember launch {launch['ember_launch_us']:.1f} µs, compiled "
                     f"runner {launch['compiled_runner_us']:.1f} µs {launch['runner_error']}; aten add {launch['aten_add_us']:.1f} µs")
    write_results(args.out, "host_cost", {**environment(torch.device("cuda")), "models": rows, "launch": launch,
                                          "profiles": profiles}, "\n".join(lines) + "\n\n" + "\n".join(profiles))


if __name__ == "__main__":
    main()
