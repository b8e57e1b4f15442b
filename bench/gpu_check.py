"""GPU check: every built-in model through ember.compile and torch.compile(backend="ember") on CUDA.

Not a speed benchmark: it records max error against eager (fp32 and bf16), op coverage and compile time
on the lent GPU, with the torch and triton versions, so compatibility across versions is on record; and
how many kernels Triton still compiled at the first call (none: ember.compile precompiles them all). The
error is the worse of two calls, the second on other inputs and from another stream, checked after both;
and checked once more after the Program is dropped and the memory it freed written over (results it lent
from a CUDA graph's pool must have moved out).
Usage: python bench/gpu_check.py [--out DIR] [--models resnet50 ...]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

import ember
import ember.api
from ember import models
from ember.codegen import GroupKernel
from ember.codegen.cache import load_kernel
from ember.tolerance import result_tolerance

from common import environment, write_results


def compiled_kernels(program: ember.Program) -> int:
    """How many binaries Triton holds for the program's kernels, over every device."""
    kernels = [step.kernel.source for step in program.executor.work or () if isinstance(step, GroupKernel)]
    return sum(len(caches[0]) for source in kernels
               for caches in load_kernel(source.name, source.source).device_caches.values())


def check(name: str, dtype: torch.dtype, device: torch.device) -> dict:
    torch.manual_seed(0)
    model, inputs = models.load(name)
    model = model.to(device=device, dtype=dtype)
    inputs = tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs)
    built = []
    original = ember.api.compile_graph
    ember.api.compile_graph = lambda *a, **k: built.append(original(*a, **k)) or built[-1]
    try:
        with torch.no_grad():
            expected = model(*inputs)
            started = time.perf_counter()
            program = ember.compile(model, inputs)
            compile_s = time.perf_counter() - started
            report = program.report
            precompiled = compiled_kernels(program)
            first = program(*inputs)
            first_call_compiles = compiled_kernels(program) - precompiled
            others = tuple(torch.randn_like(t) if t.is_floating_point() else t.roll(1, -1) for t in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # a second call, from another stream, must leave the first's result alone
                second = program(*others)
            torch.cuda.current_stream().wait_stream(side)
            expected_others = model(*others)
            error = max(models.max_error(expected, first), models.max_error(expected_others, second))
            del program
            built.clear()
            gc.collect()
            torch.cuda.empty_cache()
            scribble = torch.full((torch.cuda.mem_get_info()[0] // 8,), float("nan"), device=device)
            del scribble
            error = max(error, models.max_error(expected, first), models.max_error(expected_others, second))
            torch._dynamo.reset()
            backend_error = models.max_error(expected, torch.compile(model, backend="ember")(*inputs))
    finally:
        ember.api.compile_graph = original
    limit = result_tolerance(expected)
    return {
        "model": name, "dtype": str(dtype).removeprefix("torch."), "nodes": report.node_count,
        "op_coverage": report.op_coverage, "extern_ops": dict(report.extern_ops),
        "captured": bool(report.cuda_graphs.get("capture")), "compile_s": compile_s, "max_err": error, "backend_max_err": backend_error,
        "backend_compiled_by_ember": bool(built), "tolerance": limit, "first_call_compiles": first_call_compiles,
        "passed": error <= limit and backend_error <= limit and bool(built) and first_call_compiles == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=list(models.BUILTIN))
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for name in args.models:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                rows.append(check(name, dtype, device))
            except Exception as error:  # a failing model is a row of the report, not the end of it
                rows.append({"model": name, "dtype": str(dtype).removeprefix("torch."), "passed": False,
                             "error": f"{type(error).__name__}: {str(error)[:300]}"})
    result = {**environment(device), "rows": rows}
    header = f"{'model':8} {'dtype':9} {'nodes':>5} {'coverage':>8} {'compile s':>9} {'max err':>9} {'backend err':>11} {'tol':>9} {'jit@1st':>7}  ok"
    lines = [f"# {result['device']}, torch {result['torch']}, triton {result['triton']}", header]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:8} {r['dtype']:9} FAILED {r['error']}")
            continue
        lines.append(f"{r['model']:8} {r['dtype']:9} {r['nodes']:5d} {100 * r['op_coverage']:7.1f}% {r['compile_s']:9.2f} "
                     f"{r['max_err']:9.2e} {r['backend_max_err']:11.2e} {r['tolerance']:9.2e} {r['first_call_compiles']:7d}  {'yes' if r['passed'] else 'NO'}")
    write_results(args.out, "gpu_check", result, "\n".join(lines))


if __name__ == "__main__":
    main()
