"""The `ember` command line: `ember demo` compiles the built-in decoder and shows what happened."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import __version__, models
from .api import compile as ember_compile
from .api import inspect as ember_inspect
from .api import optimize as optimize_graph
from .frontend import from_module
from .errors import EmberError
from .optimizer.cost import load_profile, save_profile
from .optimizer.cost.calibrate import calibrate
from .optimizer.inspect import memory_summary, plot_memory, plot_roofline, render, write_graph
from .optimizer.liveness import buffers, peak_live_bytes
from .options import Options
from .tolerance import result_tolerance


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="ember", description="A compiler-style graph optimizer for PyTorch.")
    parser.add_argument("--version", action="version", version=f"ember {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="compile a small built-in model and check it against eager")
    demo.add_argument("model", nargs="?", default="demo",
                      help=f"model spec: {', '.join(models.BUILTIN)} or package.module:function (default: demo)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    demo.add_argument("--size", choices=models.SIZES, default="tiny", help="built-in model size (default: tiny)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    inspect = commands.add_parser("inspect", help="where time and memory go, by the cost model, node by node")
    inspect.add_argument("model", help=f"model spec: {', '.join(models.BUILTIN)} or package.module:function")
    inspect.add_argument("--device", default="h100", help="profile name (h100, h200, a100, cpu, a calibrated one) or profile.json")
    inspect.add_argument("--size", choices=models.SIZES, default="suite", help="built-in model size (default: suite)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--all", action="store_true", help="list every node, not only the ten costliest")
    inspect.add_argument("--plot", metavar="PNG", help="write a roofline plot")
    inspect.add_argument("--graph", metavar="HTML|SVG", help="write the graph coloured by predicted time")
    inspect.add_argument("--plot-memory", metavar="PNG", help="write live memory over time and the arena plan")
    optimize = commands.add_parser("optimize", help="run the passes and plan the arena; show and export the result")
    optimize.add_argument("model", help=f"model spec: {', '.join(models.BUILTIN)} or package.module:function")
    optimize.add_argument("--size", choices=models.SIZES, default="suite", help="built-in model size (default: suite)")
    optimize.add_argument("--reorder", action="store_true", help="reorder operators to lower the peak")
    optimize.add_argument("--time-limit", type=float, default=10.0, help="seconds for the memory planner (default: 10)")
    optimize.add_argument("--json", action="store_true", help="print the memory summary as JSON")
    optimize.add_argument("--plot-memory", metavar="PNG", help="write live memory over time and the arena plan")
    optimize.add_argument("--out", metavar="DIR", help="write the optimized IR (graph.ir.txt) and the plan (memory_plan.json)")
    calibrate = commands.add_parser("calibrate", help="measure this device's ceilings and save them as a profile")
    calibrate.add_argument("--out", help="where to write the profile JSON (default: the user cache directory)")
    calibrate.add_argument("--name", help="profile name (default: from the device name)")
    calibrate.add_argument("--quick", action="store_true", help="smaller sizes: seconds, not a minute")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("EMBER_LOG", "warning").upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "inspect":
            return run_inspect(args)
        if args.command == "optimize":
            return run_optimize(args)
        if args.command == "calibrate":
            return run_calibrate(args)
        return run_demo(args.model, args.device, args.size, as_json=args.json)
    except EmberError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}")
        return 2


def run_inspect(args: argparse.Namespace) -> int:
    """Capture the model (built-ins on the meta device: no weights needed), price it, render the report."""
    profile = load_profile(args.device)
    model, inputs = models.load(args.model, args.size, device="meta" if args.model in models.BUILTIN else None)
    report = ember_inspect(model, inputs, device=profile)
    if args.json:
        print(report.to_json())
    else:
        render(report, Console(width=None if sys.stdout.isatty() else 160), all_rows=args.all)
    if args.plot:
        Console(stderr=True).print(f"roofline: {plot_roofline(report, profile, args.plot)}")
    if args.graph:
        Console(stderr=True).print(f"graph: {write_graph(report, args.graph)}")
    if args.plot_memory:
        path = plot_memory(report.graph, report.memory, report.plan, args.plot_memory, report.model)
        Console(stderr=True).print(f"memory plot: {path}")
    return 0


def run_optimize(args: argparse.Namespace) -> int:
    """Capture and optimize the model (built-ins on the meta device), plan its arena, show and export the plan."""
    model, inputs = models.load(args.model, args.size, device="meta" if args.model in models.BUILTIN else None)
    options = Options(reorder=args.reorder, plan_time_limit=args.time_limit)
    captured = from_module(model, inputs)
    graph = optimize_graph(captured.graph, options, dict(captured.stage_seconds))
    memory, plan = memory_summary(graph, args.time_limit)
    memory["eager_order_peak_bytes"] = peak_live_bytes(captured.graph)[0]
    memory["nodes"] = len(graph.nodes)
    if args.json:
        print(json.dumps(memory, indent=2))
    else:
        _print_memory(type(model).__name__, memory)
    if args.plot_memory:
        path = plot_memory(graph, memory, plan, args.plot_memory, type(model).__name__)
        Console(stderr=True).print(f"memory plot: {path}")
    if args.out:
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "graph.ir.txt").write_text(str(graph) + "\n")
        rows = [{"name": b.name, "bytes": b.size_bytes, "start": b.start, "end": b.end, "offset": offset}
                for b, offset in zip(buffers(graph), plan.offsets)]
        (directory / "memory_plan.json").write_text(json.dumps({**memory, "buffers": rows}, indent=2) + "\n")
        Console(stderr=True).print(f"wrote {directory / 'graph.ir.txt'} and {directory / 'memory_plan.json'}")
    return 0


def _print_memory(model: str, memory: dict) -> None:
    table = Table(title=f"{model}: activation memory ({memory['nodes']} nodes)")
    table.add_column("")
    table.add_column("MiB", justify="right")
    table.add_column("× lower bound", justify="right")
    bound = max(memory["lower_bound_bytes"], 1)
    for key, label in (("eager_order_peak_bytes", "peak live, eager order"), ("lower_bound_bytes", "lower bound (this order)"),
                       ("no_reuse_bytes", "no reuse"), ("greedy_bytes", "greedy by size / first fit"),
                       ("planned_bytes", "planned (search + MIP)")):
        table.add_row(label, f"{memory[key] / 2**20:,.2f}", f"{memory[key] / bound:.3f}")
    Console().print(table)
    Console().print(f"plan: {memory['plan_status']}, gap {memory['plan_gap']:.2%}, solved in {memory['plan_seconds']:.2f} s; "
                    f"weights {memory['weights_bytes'] / 2**20:,.1f} MiB")


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure this machine's device and save the profile where `--device NAME` finds it."""
    console = Console()
    with console.status("measuring matmul, copy, launch and attention ceilings…"):
        profile = calibrate(quick=args.quick, name=args.name)
    path = save_profile(profile, args.out)
    peaks = ", ".join(f"{unit} {key} {value:,.1f}" for unit, rates in profile.peak_tflops.items() for key, value in rates.items())
    console.print(f"[bold]{profile.name}[/]: {profile.description}")
    console.print(f"peaks (TFLOP/s): {peaks}")
    console.print(f"bandwidth: {profile.memory_bandwidth_gbps:,.0f} GB/s DRAM, {profile.l2_bandwidth_gbps:,.0f} GB/s L2; "
                  f"launch {profile.launch_overhead_us:.1f} µs; attention at {profile.attention_efficiency:.0%} of peak")
    console.print(f"saved {path}; use it with --device {profile.name if args.out is None else path}")
    return 0


def run_demo(spec: str, device: str | None, size: str = "tiny", *, as_json: bool = False) -> int:
    """Compile `spec` with ember.compile and torch.compile(backend="ember"); compare both with eager."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model, inputs = models.load(spec, size)
    model = model.to(device)
    inputs = tuple(value.to(device) if isinstance(value, torch.Tensor) else value for value in inputs)
    with torch.no_grad():
        expected = model(*inputs)
        program = ember_compile(model, inputs)
        compiled_error = models.max_error(expected, program(*inputs))
        started = time.perf_counter()
        backend_error = models.max_error(expected, torch.compile(model, backend="ember")(*inputs))
        backend_seconds = time.perf_counter() - started
    report = program.report
    limit = result_tolerance(expected)
    passed = compiled_error <= limit and backend_error <= limit
    result = {
        "model": spec, "device": str(device), "nodes": report.node_count, "op_coverage": report.op_coverage,
        "extern_ops": dict(report.extern_ops), "stage_seconds": dict(report.stage_seconds),
        "max_error": compiled_error, "backend_max_error": backend_error, "backend_seconds": backend_seconds,
        "tolerance": limit, "passed": passed, "memory": dict(report.memory),
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_demo(result)
    return 0 if passed else 1


def _print_demo(result: dict) -> None:
    console = Console()
    console.print(f"[bold]ember {__version__}[/] compiled [cyan]{result['model']}[/] on {result['device']}")
    summary = Table(show_header=False, box=None)
    summary.add_row("IR nodes", str(result["nodes"]))
    summary.add_row("op coverage", f"{100 * result['op_coverage']:.1f}% native")
    externs = ", ".join(f"{name} ×{count}" for name, count in result["extern_ops"].items()) or "none"
    summary.add_row("extern ops", externs)
    summary.add_row("max |error| vs eager", f"{result['max_error']:.3g} (ember.compile)")
    summary.add_row("", f"{result['backend_max_error']:.3g} (torch.compile backend=\"ember\", {result['backend_seconds']:.2f} s)")
    summary.add_row("tolerance", f"{result['tolerance']:.3g}")
    memory = result["memory"]
    if memory:
        summary.add_row("activation memory", f"peak {memory['peak_bytes'] / 2**10:,.1f} KiB per call (lower bound "
                        f"{memory['lower_bound_bytes'] / 2**10:,.1f} KiB): {memory['arenas']} arena(s) for "
                        f"{memory['resident_values']} values, {memory['status']}; {memory['reused_values']} written over "
                        f"their input; {memory['fresh_values']} allocated by their step")
    console.print(summary)
    stages = Table(title="time per stage")
    stages.add_column("stage")
    stages.add_column("ms", justify="right")
    for stage, seconds in result["stage_seconds"].items():
        stages.add_row(stage, f"{1000 * seconds:.1f}")
    console.print(stages)
    verdict = "[bold green]PASS[/]: ember matches eager" if result["passed"] else "[bold red]FAIL[/]: error above tolerance"
    console.print(verdict)


if __name__ == "__main__":
    sys.exit(main())
