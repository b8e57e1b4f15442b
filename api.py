"""ember.compile: capture a model, run the pass pipeline with the verifier between stages, build a Program."""
from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CompileError
from .frontend import from_module
from .frontend.export import ResultBuilder
from .ir import Graph, VerifyError
from .optimizer import PIPELINE, REORDER
from .codegen import lower_schedule, precompile
from .optimizer.arena import plan_arena
from .optimizer.fusion import fusion_summary, plan_fusion, verify_fusion
from .optimizer.cost import CostModel, DeviceProfile, load_profile
from .optimizer.inspect import Report, build_report
from .options import Options
from .progress import task
from .runtime import Program
from .runtime.program import coverage_report

log = logging.getLogger(__name__)

FUSION_PROFILE = "h100"
"""The device profile whose cost model decides fusion and graph capture (the decisions rarely depend on which GPU)."""

HOST_SHARE = 0.1
"""Calls are captured in a CUDA graph when the host's predicted dispatch time (ATen's, per op) is at least this
share of the device's. ember's executor costs the host more per step than that prediction: on an H200, Llama
at batch 4 (predicted 0.43) ran 1.33x slower step by step than replayed; the MLP (0.01) ran as fast."""


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
        unflatten=ResultBuilder(),
        arg_count=captured.arg_count,
        kwarg_names=captured.kwarg_names,
        constant_inputs=captured.constant_inputs,
        mutated_buffers=captured.mutated_buffers,
        mutated_inputs=captured.mutated_inputs,
        name=type(model).__name__,
    )


def compile_graph(graph: Graph, options: Options, *, stage_seconds: Mapping[str, float] | None = None, **program_args: Any) -> Program:
    """Run the pipeline on a lowered graph and build its Program; shared by ember.compile and the backend."""
    seconds = dict(stage_seconds or {})
    captured, graph = graph, optimize(graph, options, seconds)
    fusion, work = None, None
    cost = CostModel(load_profile(FUSION_PROFILE))
    if _fuses(graph, options):
        started = time.perf_counter()
        with task("fusion: planning groups and generating kernels"):
            fusion = plan_fusion(graph, cost)
            if options.verify or options.debug:
                verify_fusion(fusion, graph)
            work = lower_schedule(graph, fusion, options.debug_dir)
        seconds["fusion"] = time.perf_counter() - started
        if _on_gpu(graph):
            started = time.perf_counter()
            with task(f"compiling {len(fusion.groups)} Triton kernels"):
                precompile(work, graph.types(), _gpu_device(graph))
            seconds["kernels"] = time.perf_counter() - started
    arena = None
    if options.arena:
        arena = plan_arena(graph, fusion=fusion, updates=_updates(graph, program_args),
                           time_limit=options.plan_time_limit, verify=options.debug)
        seconds["plan_arena"] = arena.seconds
    started = time.perf_counter()
    capture = graph_capture(graph, options, cost) if _on_gpu(graph) else {"capture": False, "decided_by": "not on a GPU"}
    report = coverage_report(graph, seconds, arena.summary() if arena else None, fusion_summary(fusion), capture)
    program = Program(graph, report, layout=arena.layout if arena else None, work=work,
                      cuda_graphs=capture["capture"], check_inputs=options.check_inputs, debug_dir=options.debug_dir,
                      captured=captured, **program_args)
    program.report.stage_seconds["build"] = time.perf_counter() - started
    log.info("compiled %d nodes, op coverage %.1f%%", program.report.node_count, 100 * program.report.op_coverage)
    return program


def _updates(graph: Graph, program_args: Mapping[str, Any]) -> dict[str, str]:
    """Input the model updates in place -> the output written back into it (after the buffers' outputs)."""
    first = len(program_args.get("mutated_buffers", ()))
    return {graph.inputs[position].name: graph.outputs[first + index]
            for index, position in enumerate(program_args.get("mutated_inputs", ()))}


def graph_capture(graph: Graph, options: Options, cost: CostModel) -> dict[str, Any]:
    """Whether calls on a GPU are captured in a CUDA graph: as `options.cuda_graphs` says, or when `cost` predicts
    the host's dispatch of the graph's ops takes at least HOST_SHARE of the device's time for them."""
    if options.cuda_graphs is not None:
        return {"capture": options.cuda_graphs, "decided_by": "options"}
    costs = cost.nodes(graph).values()
    host, device = sum(cost.dispatch_us for cost in costs), sum(cost.kernel_us for cost in costs)
    return {"capture": host >= HOST_SHARE * device, "decided_by": "cost model", "host_us": host, "device_us": device}


def _on_gpu(graph: Graph) -> bool:
    return any(value.type.device == "cuda" for value in graph.inputs) or any(
        tensor.is_cuda for tensor in graph.weights.values())


def _gpu_device(graph: Graph) -> torch.device:
    """The GPU the graph's weights live on (the current one for a graph without weights on a GPU)."""
    weights = [tensor.device for tensor in graph.weights.values() if tensor.is_cuda]
    return weights[0] if weights else torch.device("cuda", torch.cuda.current_device())


def _fuses(graph: Graph, options: Options) -> bool:
    """Whether to run generated kernels: asked for, or (by default) when the model is on a GPU and Triton loads."""
    on_gpu = _on_gpu(graph)
    if options.fusion is False or (options.fusion is None and not on_gpu):
        return False
    try:
        importlib.import_module("triton")
    except ImportError as error:
        if options.fusion:
            raise CompileError(f"fusion=True needs Triton, which does not import: {error}") from error
        log.warning("Triton does not import (%s): running without generated kernels", error)
        return False
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise CompileError("fusion=True on the CPU runs generated kernels in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before importing torch, or leave fusion to its default")
    return True


def optimize(graph: Graph, options: Options, seconds: dict[str, float]) -> Graph:
    """Every pass of the pipeline in order, timed into `seconds`, with a checkpoint after each."""
    transforms = PIPELINE + (REORDER if options.reorder else ())
    with task("passes", total=len(transforms)) as update:
        for index, transform in enumerate(transforms, start=1):
            update(description=f"pass {index}/{len(transforms)}: {transform.__name__}")
            started = time.perf_counter()
            before, graph = graph, transform(graph)
            seconds[transform.__name__] = time.perf_counter() - started
            checkpoint(graph, transform.__name__, options, index=index, changed=graph is not before)
            update(advance=1)
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
    with task(f"pricing {len(graph.nodes)} nodes on {profile.name} and planning memory"):
        return build_report(graph, profile, model=type(model).__name__)


def checkpoint(graph: Graph, stage: str, options: Options, *, index: int, changed: bool = True) -> None:
    """After a stage: verify the graph (when asked, and unless the stage returned it unchanged) and dump it
    to the debug directory (when set)."""
    if options.debug_dir:
        directory = Path(options.debug_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{index:02d}_{stage}.ir.txt").write_text(str(graph) + "\n")
    if changed and (options.verify or options.debug):
        try:
            graph.verify()
        except VerifyError as error:
            raise CompileError(f"the IR is invalid after stage {stage!r}: {error}") from error


def _as_options(options: Options | Mapping[str, Any] | None) -> Options:
    if isinstance(options, Options):
        return options
    return Options.from_mapping(options)
