"""Where a decode step's host time goes through torch.compile(backend="ember"): ember's log (compiles, capture
decisions) over a static-cache generate of the suite Llama, then a cProfile of one more generate, then a
torch.profiler trace of one more (host and device time per op, eager's beside ember's); then, for the decode
step's captured graph, the host time of one replay (the device idle before it) beside the kernels one
uncaptured run of it launches: what a graph launch costs per kernel in it; last, each decode step's forward
called inside generate, through ember and through the forward generate compiles by itself: host µs until the call
returns.
Usage: python bench/decode_profile.py [--batch 1] [--new-tokens 64] [--out bench/results]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats

import torch

import ember.api
from common import environment, write_results
from decode import PROMPT_TOKENS, generate, llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ember").setLevel(logging.INFO)
    model = llama("suite", torch.bfloat16, "cuda")
    built = []
    compile_graph = ember.api.compile_graph
    ember.api.compile_graph = lambda *a, **k: built.append(compile_graph(*a, **k)) or built[-1]
    eager_forward = model.forward
    compiled = torch.compile(eager_forward, backend="ember", fullgraph=True)
    model.forward = compiled
    prompt = torch.randint(1, model.config.vocab_size, (args.batch, PROMPT_TOKENS), device="cuda")
    with torch.no_grad():
        generate(model, prompt, args.new_tokens, 1024)
        generate(model, prompt, args.new_tokens, 1024)
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        generate(model, prompt, args.new_tokens, 1024)
        torch.cuda.synchronize()
        profiler.disable()
    sections = [f"Decoding through the ember backend: Llama suite, batch {args.batch}, {args.new_tokens} new tokens, "
                "static cache 1024; cProfile of one generate"]
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
        sections.append(f"## by {order}\n" + "\n".join(line[:160] for line in text.getvalue().splitlines() if line.strip()))
    ember.api.compile_graph = compile_graph
    sections += traced(model, prompt, args)
    sections.append(replay_cost(built[-1]))
    sections.append(forward_host(model, compiled, eager_forward, prompt, args))
    write_results(args.out, "decode_profile", {**environment(torch.device("cuda")), "batch": args.batch,
                                               "new_tokens": args.new_tokens}, "\n\n".join(sections))


def traced(compiled: torch.nn.Module, prompt: torch.Tensor, args: argparse.Namespace) -> list[str]:
    """torch.profiler tables of one generate through ember and through eager: where host and device time go."""
    from torch.profiler import ProfilerActivity, profile

    sections = []
    eager = llama("suite", torch.bfloat16, "cuda")
    for label, model in (("ember backend", compiled), ("eager", eager)):
        with torch.no_grad():
            generate(model, prompt, args.new_tokens, 1024)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
                generate(model, prompt, args.new_tokens, 1024)
                torch.cuda.synchronize()
        events = trace.key_averages()
        for order in ("self_cpu_time_total", "self_device_time_total"):
            table = events.table(sort_by=order, row_limit=args.top, max_name_column_width=60)
            sections.append(f"## torch.profiler, {label}, by {order}\n{table}")
    return sections


def replay_cost(program: ember.Program, repeats: int = 50) -> str:
    """Host µs of one replay of `program`'s captured graph with the device idle before it (median), and the
    kernels one uncaptured run of the captured steps launches."""
    import statistics
    import time

    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda", torch.cuda.current_device())
    graphed = program.executor.graphed.get(device)
    if graphed is None:
        return "## replay\nthe decode step was not captured"
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        graphed.graph.replay()
        seconds.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    prefix = program.executor._split[device][0]
    with torch.no_grad(), torch.cuda.stream(graphed.stream), profile(activities=[ProfilerActivity.CUDA]) as trace:
        prefix.function(*graphed.inputs)
        torch.cuda.synchronize()
    kernels = sum(event.count for event in trace.key_averages() if event.device_type == torch.autograd.DeviceType.CUDA)
    host_us = statistics.median(seconds) * 1e6
    return (f"## replay\none replay of the decode step's graph: {host_us:.1f} µs of host time (median of {repeats}, "
            f"device idle before each); one uncaptured run of its steps launches {kernels} kernels and copies "
            f"({host_us / max(kernels, 1):.2f} µs per kernel)")


def forward_host(model: torch.nn.Module, ember_forward, eager_forward, prompt: torch.Tensor,
                 args: argparse.Namespace) -> str:
    """Host µs of each decode step's forward call (until it returns) inside a generate, through ember and through
    the forward generate compiles by itself (Inductor, reduce-overhead): medians over one generate after two."""
    import statistics
    import time

    seconds: dict[str, list[float]] = {"ember": [], "generate_auto": []}

    def timed(label: str, forward):
        def call(*positional, **kwargs):
            started = time.perf_counter()
            result = forward(*positional, **kwargs)
            if kwargs["input_ids"].shape[1] == 1:
                seconds[label].append(time.perf_counter() - started)
            return result
        return call

    compiled_call = model.get_compiled_call
    model.get_compiled_call = lambda config: timed("generate_auto", compiled_call(config))
    rates = {}
    with torch.no_grad():
        for label, forward in (("ember", timed("ember", ember_forward)), ("generate_auto", eager_forward)):
            model.forward = forward
            for _ in range(3):
                seconds[label].clear()
                torch.cuda.synchronize()
                started = time.perf_counter()
                generate(model, prompt, args.new_tokens, 1024, auto_compile=label == "generate_auto")
                torch.cuda.synchronize()
                rates[label] = args.batch * args.new_tokens / (time.perf_counter() - started)
    model.get_compiled_call = compiled_call
    lines = ["## each decode step's forward inside generate (host µs until it returns; median of one generate)",
             f"{'variant':14} {'host µs':>8} {'tokens/s':>9}"]
    lines += [f"{label:14} {statistics.median(seconds[label]) * 1e6:8.1f} {rates[label]:9.1f}" for label in seconds]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
