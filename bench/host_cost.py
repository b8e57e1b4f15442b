"""Host cost of a model run step by step on the GPU, through the entry users take: where the Python time goes, and
what one kernel launch costs.

For each model (suite size, bf16), `torch.compile(backend="ember", options={"cuda_graphs": False})` beside
torch.compile's default mode: host µs per call (queued without waiting for the device), wall µs per call, and the
device launches one call makes (kernels, copies and fills, counted by torch.profiler); ember's step count, its
generated kernels, the launches of each by kernel name, and a cProfile of a few calls of each (top functions by own time). Then the host time of launching one
generated kernel through ember's Kernel against the same compiled kernel's own runner and one ATen op.
Usage: python bench/host_cost.py [--models mixtral bert_masked] [--out bench/results] [--dump DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import Counter

import torch

from ember import models
from ember.codegen import GroupKernel
from ember.codegen.cache import load_kernel
from ember.runtime import program

from common import environment, wall_us, write_results


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


def launches_per_call(fn, calls: int = 5) -> tuple[float, dict[str, float]]:
    """Device launches (kernels, copies, fills) per call, counted by torch.profiler over `calls` calls, and per
    call by name (cut to 60 characters)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    names = Counter(event.name[:60] for event in profiler.events()
                    if event.device_type == torch.autograd.DeviceType.CUDA)
    return sum(names.values()) / calls, {name: count / calls for name, count in names.most_common()}


def profile_calls(fn, calls: int = 10, top: int = 40) -> str:
    """cProfile of `calls` calls: the `top` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def profile_model(name: str, dump: str | None = None) -> tuple[dict, str, GroupKernel | None, list]:
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite", device="cuda")
    programs = []
    with torch.no_grad():
        torch._dynamo.reset()
        inductor = torch.compile(model, mode="default")
        for _ in range(3):
            inductor(*inputs)
        launches, by_name = launches_per_call(lambda: inductor(*inputs))
        inductor_row = {"host_us": host_us(lambda: inductor(*inputs), calls=50), "wall_us": wall_us(lambda: inductor(*inputs), 20),
                        "launches": launches, "by_name": by_name}
        inductor_profile = profile_calls(lambda: inductor(*inputs))
        torch._dynamo.reset()
        original = program.Program.__init__

        def kept(self, *args, **kwargs):
            original(self, *args, **kwargs)
            programs.append(self)

        program.Program.__init__ = kept
        try:
            compiled = torch.compile(model, backend="ember",
                                     options={"cuda_graphs": False, "debug_dir": f"{dump}/{name}" if dump else None})
            for _ in range(3):
                compiled(*inputs)
        finally:
            program.Program.__init__ = original
        launches, by_name = launches_per_call(lambda: compiled(*inputs))
        ember_row = {"host_us": host_us(lambda: compiled(*inputs), calls=50), "wall_us": wall_us(lambda: compiled(*inputs), 20),
                     "launches": launches, "by_name": by_name}
        ember_profile = profile_calls(lambda: compiled(*inputs))
    steps = [step for made in programs for step in made.executor.steps]
    kernels = [step for made in programs for step in made.executor.work or () if isinstance(step, GroupKernel)]
    tensors = None
    if kernels:
        kernel = kernels[0]
        types = programs[0].graph.types()
        tensors = [torch.randn(types[n].shape, device="cuda").to(types[n].dtype) if types[n].dtype.is_floating_point
                   else torch.zeros(types[n].shape, dtype=types[n].dtype, device="cuda") for n in kernel.inputs]
        tensors += [torch.empty(v.type.shape, dtype=v.type.dtype, device="cuda") for v in kernel.outputs]
    row = {"model": name, "graphs": len(programs), "steps": len(steps), "kernels": len(kernels),
           "ember": ember_row, "inductor": inductor_row}
    return row, f"### ember\n{ember_profile}\n### torch.compile default\n{inductor_profile}", \
        kernels[0] if kernels else None, tensors


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
    x, weight = torch.randn(4096, 384, device="cuda", dtype=torch.bfloat16), torch.randn(384, 384, device="cuda", dtype=torch.bfloat16)
    bias, out = torch.randn(384, device="cuda", dtype=torch.bfloat16), torch.empty(4096, 384, device="cuda", dtype=torch.bfloat16)
    products = {"mm_us": host_us(lambda: torch.mm(x, weight.t(), out=out)),
                "addmm_us": host_us(lambda: torch.addmm(bias, x, weight.t(), out=out)),
                "linear_us": host_us(lambda: torch.nn.functional.linear(x, weight, bias))}
    q = torch.randn(32, 12, 128, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(32, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
    reinterpret = torch._C._dynamo.guards._reinterpret_tensor
    attention = {"sdpa_us": host_us(lambda: torch.ops.aten.scaled_dot_product_attention(q, q, q, mask)),
                 "cudnn_attention_us": host_us(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                     q, q, q, mask, False)),
                 "reinterpret_us": host_us(lambda: reinterpret(x, (64, 64, 384), (24576, 384, 1), 0)),
                 "python_call_us": host_us(lambda: None)}
    return {"kernel": source.name, "ember_launch_us": ember_us, "compiled_runner_us": runner_us,
            "runner_error": runner_error, "aten_add_us": aten_us, **products, **attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mixtral", "bert_masked", "llama_b1"])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--dump", help="write each model's generated wrapper and IR under DUMP/model")
    args = parser.parse_args()
    rows, profiles, launch = [], [], None
    for name in args.models:
        row, profile, kernel, tensors = profile_model(name, args.dump)
        rows.append(row)
        profiles.append(f"## {name}\n{profile}")
        if launch is None and kernel is not None:
            launch = launch_costs(kernel, tensors)
    lines = ["Host cost step by step (backend, cuda_graphs=False) beside torch.compile default: µs per call, device "
             "launches per call",
             f"{'model':12} {'graphs':>6} {'steps':>6} {'kernels':>8} {'host µs e/c':>13} {'wall µs e/c':>13} "
             f"{'launches e/c':>13} {'host µs/step':>13}"]
    for r in rows:
        e, c = r["ember"], r["inductor"]
        lines.append(f"{r['model']:12} {r['graphs']:6d} {r['steps']:6d} {r['kernels']:8d} "
                     f"{e['host_us']:6.0f}/{c['host_us']:<6.0f} {e['wall_us']:6.0f}/{c['wall_us']:<6.0f} "
                     f"{e['launches']:6.0f}/{c['launches']:<6.0f} {e['host_us'] / max(r['steps'], 1):13.1f}")
    if launch:
        lines.append(f"one generated kernel ({launch['kernel']}): ember launch {launch['ember_launch_us']:.1f} µs, compiled "
                     f"runner {launch['compiled_runner_us']:.1f} µs {launch['runner_error']}; aten add {launch['aten_add_us']:.1f} µs")
        lines.append(f"a bf16 [4096, 384] × [384, 384] product: mm {launch['mm_us']:.1f} µs, addmm {launch['addmm_us']:.1f} µs, "
                     f"linear {launch['linear_us']:.1f} µs (host, queued)")
        lines.append(f"bf16 attention [32, 12, 128, 32] with a mask: scaled_dot_product_attention {launch['sdpa_us']:.1f} µs, "
                     f"_scaled_dot_product_cudnn_attention {launch['cudnn_attention_us']:.1f} µs; reinterpret_tensor "
                     f"{launch['reinterpret_us']:.1f} µs; a Python call {launch['python_call_us']:.2f} µs")
    for r in rows:
        lines.append(f"\n## {r['model']}: device launches per call by name, ember / torch.compile default")
        names = dict.fromkeys([*r["ember"]["by_name"], *r["inductor"]["by_name"]])
        lines += [f"{r['ember']['by_name'].get(n, 0):6.1f} {r['inductor']['by_name'].get(n, 0):6.1f}  {n}" for n in names]
    write_results(args.out, "host_cost", {**environment(torch.device("cuda")), "models": rows, "launch": launch,
                                          "profiles": profiles}, "\n".join(lines) + "\n\n" + "\n".join(profiles))


if __name__ == "__main__":
    main()
