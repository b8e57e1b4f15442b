"""ember.compile: capture a model, run the pass pipeline with the verifier between stages, build a Program;
ember.inspect: the plan compile would build; ember.load: a saved Program; ember.plan_skip: what layer skipping
would remove."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .frontend import from_module
from .frontend.export import normalize_inputs
from .results import ResultBuilder
from .ir import Graph
from .errors import CompileError
from .optimizer.cost import CostModel, DeviceProfile, load_profile
from .optimizer.fusion import fusion_summary
from .optimizer.inspect import Report, build_report
from .optimizer.pipeline import (REFERENCE_PROFILE, Compilation, Target, checkpoint, decide_target, pass_stages,
                                 planning_stages, run, stages)
from .optimizer.skip_search import Calibration, LayerSkip, SkipPlan
from .optimizer.skip_search import plan as skip_plan
from .options import Options
from .progress import task
from .runtime import Program
from .runtime.artifact import load_program
from .runtime.program import coverage_report

log = logging.getLogger(__name__)


def compile(model: torch.nn.Module, example_inputs: Any, options: Options | Mapping[str, Any] | None = None) -> Program:
    """Compile `model` for inputs shaped like `example_inputs` (a tensor, a tuple of args or a dict of kwargs)."""
    options = _chosen_skip(model, _as_options(options))
    captured = from_module(model, example_inputs)
    checkpoint(captured.graph, "lower", options, index=0)
    program = compile_graph(
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
    args, kwargs = normalize_inputs(example_inputs)
    program.sample_inputs = program.tensor_inputs(*args, **kwargs)
    return program


def compile_graph(graph: Graph, options: Options, *, stage_seconds: Mapping[str, float] | None = None, **program_args: Any) -> Program:
    """Run every stage of the pipeline on a lowered graph and build its Program; shared by ember.compile and the
    backend."""
    compilation = Compilation(graph, options, decide_target(graph), updates=_updates(graph, program_args),
                              seconds=dict(stage_seconds or {}))
    compilation = run(compilation, stages(options))
    started = time.perf_counter()
    arena, fusion = compilation.arena, compilation.fusion
    report = coverage_report(compilation.graph, compilation.seconds, arena.summary() if arena else None,
                             fusion_summary(fusion), compilation.capture, compilation.changes, compilation.decisions,
                             options.layer_skip.to_dict() if options.layer_skip is not None else None,
                             options.ffn_gate.to_dict() if options.ffn_gate is not None else None,
                             options.expert_placement.to_dict() if options.expert_placement is not None else None)
    program = Program(compilation.graph, report, schedule=compilation.schedule, fusion=compilation.fusion,
                      layout=arena.layout if arena else None, work=compilation.work, cuda_graphs=compilation.capture["capture"], check_inputs=options.check_inputs,
                      debug_dir=options.debug_dir, captured=compilation.skipped or graph, **program_args)
    program.executor.prepare(compilation.target.device or torch.device("cpu"))
    program.report.stage_seconds["build"] = time.perf_counter() - started
    log.info("compiled %d nodes, op coverage %.1f%%", program.report.node_count, 100 * program.report.op_coverage)
    return program


def _updates(graph: Graph, program_args: Mapping[str, Any]) -> dict[str, str]:
    """Input the model updates in place -> the output written back into it (after the buffers' outputs)."""
    first = len(program_args.get("mutated_buffers", ()))
    return {graph.inputs[position].name: graph.outputs[first + index]
            for index, position in enumerate(program_args.get("mutated_inputs", ()))}


def optimize(graph: Graph, options: Options, seconds: dict[str, float]) -> Graph:
    """The graph passes of the pipeline in order, timed into `seconds`, with a checkpoint after each."""
    compilation = run(Compilation(graph, options, decide_target(graph), seconds=seconds), pass_stages(options))
    return compilation.graph


def inspect(
    model: torch.nn.Module, example_inputs: Any, device: str | DeviceProfile = "h100",
    options: Options | Mapping[str, Any] | None = None,
) -> Report:
    """Where time and memory go: capture `model` and plan it as `ember.compile` would on `device` (its passes,
    fusion groups, arenas and capture decision, all priced on that device's profile), then price every node.

    `device` is a profile name (`h100`, `h200`, `a100`, `cpu`, or one `ember calibrate` saved), a path to
    a profile JSON, or a DeviceProfile. Nothing runs: a model on the meta device works.
    """
    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    options = _chosen_skip(model, _as_options(options), profile)
    captured = from_module(model, example_inputs)
    checkpoint(captured.graph, "lower", options, index=0)
    target = Target(torch.device("cuda") if profile.asynchronous else None, profile, "asked for")
    updates = _updates(captured.graph, {"mutated_buffers": captured.mutated_buffers,
                                        "mutated_inputs": captured.mutated_inputs})
    compilation = run(Compilation(captured.graph, options, target, updates, dict(captured.stage_seconds)),
                      planning_stages(options))
    with task(f"pricing {len(compilation.graph.nodes)} nodes on {profile.name}"):
        return build_report(compilation, model=type(model).__name__)


def load(path: str | Path, device: str | torch.device | None = None) -> Program:
    """The program `Program.save` (or `ember export`) wrote to the directory `path`, rebuilt from its saved plans
    without capturing or optimizing again; its weights on `device` (default: the kind it was built for). Every
    file is checked against the manifest's sha256 first: ArtifactError names a missing or changed one."""
    return load_program(path, device)


def skip_calibration(model: torch.nn.Module, calibration: Sequence[Any], metric: str | None = None,
                     device: str | DeviceProfile = REFERENCE_PROFILE) -> Calibration:
    """`model` captured on the first calibration call, with every call's tensor inputs and the full model's outputs
    on them: what the layer-skip scorers judge removals on (optimizer.skip_search), priced on `device`'s profile."""
    if not calibration:
        raise CompileError("layer skipping needs calibration inputs: give at least one call")
    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    captured = from_module(model, calibration[0])
    program = Program(captured.graph, coverage_report(captured.graph, {}), in_spec=captured.in_spec,
                      arg_count=captured.arg_count, kwarg_names=captured.kwarg_names,
                      constant_inputs=captured.constant_inputs, name=type(model).__name__)
    calls = []
    for index, call in enumerate(calibration):
        args, kwargs = normalize_inputs(call)
        tensors = program.tensor_inputs(*args, **kwargs)
        shapes = [tuple(tensor.shape) for tensor in tensors]
        expected = [tuple(value.type.shape) for value in captured.graph.inputs]
        if shapes != expected:
            raise CompileError(f"calibration call {index} has inputs shaped {shapes}, not {expected} as the first: "
                               "give calls of one shape")
        calls.append(tensors)
    return Calibration(captured.graph, calls, metric or "", cost=CostModel(profile))


def plan_skip(model: torch.nn.Module, calibration: Sequence[Any], budget: float, method: str = "ember",
              metric: str | None = None, device: str | DeviceProfile = REFERENCE_PROFILE) -> SkipPlan:
    """Choose the residual sublayers of `model` to remove: the most `method` finds whose loss on `calibration` (calls
    of the model's inputs, one shape) keeps within `budget` (relative perplexity increase for a language model, else
    divergence). Pass the plan as Options(layer_skip=plan) to ember.compile or torch.compile."""
    request = LayerSkip(budget, calibration, method, metric)
    return skip_plan(skip_calibration(model, request.calibration, request.metric, device), request.budget,
                     request.method)


def _chosen_skip(model: torch.nn.Module, options: Options, device: str | DeviceProfile = REFERENCE_PROFILE) -> Options:
    """Options with a LayerSkip request replaced by the plan it asks for."""
    request = options.layer_skip
    if not isinstance(request, LayerSkip):
        return options
    with torch.no_grad():
        chosen = plan_skip(model, request.calibration, request.budget, request.method, request.metric, device)
    log.info("layer skipping: %s removes %d sublayers (%.1f%% of FLOPs), calibration loss %.4f within %.4f",
             chosen.method, len(chosen.removed), 100 * chosen.flops_removed, chosen.calibration_loss, chosen.budget)
    return dataclasses.replace(options, layer_skip=chosen)


def _as_options(options: Options | Mapping[str, Any] | None) -> Options:
    if isinstance(options, Options):
        return options
    return Options.from_mapping(options)
