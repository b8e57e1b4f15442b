"""ember.compile: capture a model, run the pass pipeline with the verifier between stages, build a Program."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CompileError
from .frontend import from_module
from .ir import Graph, VerifyError
from .optimizer import PIPELINE, REORDER
from .optimizer.arena import plan_arena
from .optimizer.cost import DeviceProfile, load_profile
from .optimizer.inspect import Report, build_report
from .options import Options
from .runtime import Program
from .runtime.program import coverage_report

log = logging.getLogger(__name__)


def compile(model: torch.nn.Module, example_inputs: Any, options: Options | Mapping[str, Any] | None = None) -> Program:
    """Compile `model` for inputs shaped like `example_inputs` (a tensor, a tuple of args or a dict of kwargs)."""
    options = _as_options(options)
    captured = from_module(model, example_inputs)
    checkpoint(captured.graph, "lower", options, index=0)
    return compile_graph(
        captured.graph,
        options,
        stage_seconds=captured.stage_seconds,
        in_spec=captured.in_spec,
        out_spec=captured.out_spec,
        arg_count=captured.arg_count,
        kwarg_names=captured.kwarg_names,
        constant_inputs=captured.constant_inputs,
        mutated_buffers=captured.mutated_buffers,
    )


def compile_graph(graph: Graph, options: Options, *, stage_seconds: Mapping[str, float] | None = None, **program_args: Any) -> Program:
    """Run the pipeline on a lowered graph and build its Program; shared by ember.compile and the backend."""
    seconds = dict(stage_seconds or {})
    graph = optimize(graph, options, seconds)
    arena = plan_arena(graph, time_limit=options.plan_time_limit, verify=options.debug) if options.arena else None
    if arena is not None:
        seconds["plan_arena"] = arena.seconds
    started = time.perf_counter()
    report = coverage_report(graph, seconds, arena.summary() if arena else None)
    program = Program(graph, report, layout=arena.layout if arena else None, check_inputs=options.check_inputs,
                      **program_args)
    program.report.stage_seconds["build"] = time.perf_counter() - started
    log.info("compiled %d nodes, op coverage %.1f%%", program.report.node_count, 100 * program.report.op_coverage)
    return program


def optimize(graph: Graph, options: Options, seconds: dict[str, float]) -> Graph:
    """Every pass of the pipeline in order, timed into `seconds`, with a checkpoint after each."""
    for index, transform in enumerate(PIPELINE + (REORDER if options.reorder else ()), start=1):
        started = time.perf_counter()
        graph = transform(graph)
        seconds[transform.__name__] = time.perf_counter() - started
        checkpoint(graph, transform.__name__, options, index=index)
    return graph


def inspect(
    model: torch.nn.Module, example_inputs: Any, device: str | DeviceProfile = "h100",
    options: Options | Mapping[str, Any] | None = None,
) -> Report:
    """Where time and memory go: capture and optimize `model`, then price every node on `device`.

    `device` is a profile name (`h100`, `h200`, `a100`, `cpu`, or one `ember calibrate` saved), a path to
    a profile JSON, or a DeviceProfile. Nothing runs: a model on the meta device works.
    """
    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    options = _as_options(options)
    captured = from_module(model, example_inputs)
    checkpoint(captured.graph, "lower", options, index=0)
    graph = optimize(captured.graph, options, dict(captured.stage_seconds))
    return build_report(graph, profile, model=type(model).__name__)


def checkpoint(graph: Graph, stage: str, options: Options, *, index: int) -> None:
    """After a stage: verify the graph (when asked) and dump it to the debug directory (when set)."""
    if options.debug_dir:
        directory = Path(options.debug_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{index:02d}_{stage}.ir.txt").write_text(str(graph) + "\n")
    if options.verify or options.debug:
        try:
            graph.verify()
        except VerifyError as error:
            raise CompileError(f"the IR is invalid after stage {stage!r}: {error}") from error


def _as_options(options: Options | Mapping[str, Any] | None) -> Options:
    if isinstance(options, Options):
        return options
    return Options.from_mapping(options)
