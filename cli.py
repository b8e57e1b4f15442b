"""The `ember` command line: `ember demo` compiles the built-in decoder and shows what happened."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.table import Table

from . import __version__, models
from .api import compile as ember_compile
from .api import inspect as ember_inspect
from .errors import EmberError
from .optimizer.cost import load_profile, save_profile
from .optimizer.cost.calibrate import calibrate
from .optimizer.inspect import plot_roofline, render, write_graph
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
    return 0


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
        "tolerance": limit, "passed": passed,
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
