"""The compilation pipeline, every stage in order: the graph passes, then the planners (fusion, the schedule,
kernels, memory, capture), each a function over one plain-data record of the compilation. `api.compile_graph` runs `stages(...)`.

A new graph pass is a Graph -> Graph function in its own module and one line in PASSES. A new planner is a
Compilation -> Compilation function and one line in `stages`; it reads what earlier stages decided from the
record, never from the machine, and records its own decision (with the numbers behind it) there.
Where the program runs, and the device profile pricing it, are decided once (`decide_target`).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..codegen import GroupKernel, lower_schedule, precompile
from ..errors import CompileError
from ..ir import Graph, Node, VerifyError
from ..ir.schedule import Schedule, schedule_of
from ..options import Options
from ..progress import task
from .arena import ArenaPlan, plan_arena
from .attention import (convert_attention_masks, decompose_attention, fold_constant_masks, fold_query_groups,
                        group_query_heads)
from .canonicalize import drop_empty_cat_inputs, eliminate_dead_code
from .cost import CostModel, DeviceProfile, known_profiles, load_profile
from .cost.calibrate import calibrated_name
from .decisions import record, recording
from .expert_placement import match_routers
from .fold import fold_constants
from .conv_layout import convolutions_channels_last, hoist_permutes, split_convolution_bias
from .fold_batch_norm import fold_batch_norm
from .fusion import FusionPlan, plan_fusion
from .fusion_verify import verify_fusion
from .joins import join_vector_products
from .ffn_gate import gate_ffns
from .layer_skip import apply_skip
from .layout import pad_linear_features
from .ranges import cover_grouped_rows, drop_decided_masks, offsets_by_search
from .reorder import reorder_for_memory
from .routing_record import find_routers
from .skip_search import SkipPlan

log = logging.getLogger(__name__)

Pass = Callable[[Graph], Graph]

PASSES: tuple[Pass, ...] = (eliminate_dead_code, fold_constant_masks, fold_constants, fold_batch_norm,
                            split_convolution_bias, convolutions_channels_last, hoist_permutes,
                            drop_empty_cat_inputs, drop_decided_masks, cover_grouped_rows, offsets_by_search,
                            decompose_attention, group_query_heads, fold_query_groups, convert_attention_masks,
                            pad_linear_features, join_vector_products)
"""The graph passes, in order."""
REORDER: tuple[Pass, ...] = (reorder_for_memory,)
"""Run after PASSES when Options(reorder=True)."""

REFERENCE_PROFILE = "h100"
"""The profile that prices a program whose GPU has no profile of its own, and generated kernels run on the CPU
(in Triton's interpreter, for tests: planned as for a GPU, so that what is tested is what a GPU would run)."""

HOST_SHARE = 0.1
"""Calls are captured in a CUDA graph when the host's predicted dispatch time (ATen's, per op) is at least this
share of the device's. ember's executor costs the host more per step than that prediction: on an H200, Llama
at batch 4 (predicted 0.43) ran 1.33x slower step by step than replayed; the MLP (0.01) ran as fast."""

CAPTURING_MODES = {"reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}
"""torch.compile modes that say whether to use CUDA graphs, as they do for Inductor ("default" leaves it to the
cost model)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where the program runs, decided once per compile: the GPU the model is on (None: the CPU), and the device
    profile that prices fusion and capture for it, with where that profile came from."""

    device: torch.device | None
    profile: DeviceProfile
    profile_source: str

    @property
    def on_gpu(self) -> bool:
        return self.device is not None


@dataclass(slots=True)
class Compilation:
    """Everything one compile has decided so far; each stage reads it and returns it with its own part filled in."""

    graph: Graph
    options: Options
    target: Target
    updates: Mapping[str, str] = field(default_factory=dict)
    """Input the model updates in place -> the output written back into it after each call."""
    seconds: dict[str, float] = field(default_factory=dict)
    fusion: FusionPlan | None = None
    schedule: Schedule | None = None
    """The steps in order and the lifetimes they imply, from the final graph and the fusion plan."""
    work: tuple[Node | GroupKernel, ...] | None = None
    arena: ArenaPlan | None = None
    capture: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """Graph pass -> what it changed, by op: nodes removed, added, and rewritten (same node, other inputs or
    attributes); passes that changed nothing are absent."""
    decisions: dict[str, list[str]] = field(default_factory=dict)
    """Graph pass -> the decisions it recorded, with the numbers behind them (optimizer.decisions)."""
    skipped: Graph | None = None
    """The model as a skip plan leaves it (the captured graph with sublayers removed), before any other pass:
    what a call autograd records runs. None without layer skipping."""

    @property
    def cost(self) -> CostModel:
        return CostModel(self.target.profile)


Stage = Callable[[Compilation], Compilation]


def decide_target(graph: Graph) -> Target:
    """The GPU the graph's weights (else its inputs) are on, and its profile: a calibrated one when `ember
    calibrate` saved one for this GPU, else the shipped profile named in the GPU's name, else REFERENCE_PROFILE."""
    weights = [tensor.device for tensor in graph.weights.values() if tensor.is_cuda]
    if weights:
        device: torch.device | None = weights[0]
    elif any(value.type.device == "cuda" for value in graph.inputs):
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = None
    if device is None:
        return Target(None, load_profile(REFERENCE_PROFILE), "reference (generated kernels off a GPU)")
    known = known_profiles()
    calibrated = calibrated_name(device)
    if calibrated in known:
        return Target(device, load_profile(calibrated), f"calibrated ({known[calibrated]})")
    words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name(device).lower())
    shipped = next((word for word in words if word in known), None)
    if shipped is not None:
        return Target(device, load_profile(shipped), "shipped, by the GPU's name")
    log.info("no device profile for %s: pricing with %s's", torch.cuda.get_device_name(device), REFERENCE_PROFILE)
    return Target(device, load_profile(REFERENCE_PROFILE), "reference (no profile for this GPU)")


@dataclass(frozen=True, slots=True)
class GraphPass:
    """A graph pass as a stage: the graph it returns replaces the record's, and is checkpointed."""

    transform: Pass

    @property
    def name(self) -> str:
        return self.transform.__name__

    def __call__(self, compilation: Compilation) -> Compilation:
        return dataclasses.replace(compilation, graph=self.transform(compilation.graph))


@dataclass(frozen=True, slots=True)
class SkipLayers:
    """Layer skipping as a stage, first of all: the plan in Options.layer_skip applied to the captured graph."""

    name = "skip_layers"

    def __call__(self, compilation: Compilation) -> Compilation:
        plan = compilation.options.layer_skip
        if not isinstance(plan, SkipPlan):
            raise CompileError("Options.layer_skip asks for a plan to be chosen, which needs the model: ember.compile "
                               "does that; for torch.compile, choose one first (ember.plan_skip or `ember skip "
                               "--json`) and pass the plan")
        graph = apply_skip(compilation.graph, plan.removed, plan.sublayers)
        return dataclasses.replace(compilation, graph=graph, skipped=graph)


@dataclass(frozen=True, slots=True)
class GateFFNs:
    """The ffn gate as a stage, after layer skipping and before the other passes (which would otherwise join the
    feed-forwards' linears ungated): Options.ffn_gate applied to the graph, and to what autograd-recorded calls run."""

    name = "gate_ffns"

    def __call__(self, compilation: Compilation) -> Compilation:
        graph = gate_ffns(compilation.graph, compilation.options.ffn_gate)
        return dataclasses.replace(compilation, graph=graph, skipped=graph)


def place_experts(compilation: Compilation) -> Compilation:
    """Expert placement as a stage: the plan in Options.expert_placement checked against the graph's routers
    (as many MoE layers, as many experts), its numbers recorded. The plan is data for the expert-parallel
    runtime; the graph is unchanged."""
    plan = compilation.options.expert_placement
    routers = find_routers(compilation.graph)
    match_routers(plan, len(routers), routers[0].num_experts)
    gap = "" if math.isnan(plan.gap) else f", gap {plan.gap:.1%}"
    record(f"experts of {plan.layers} MoE layers x {plan.num_experts} placed on {plan.gpus} GPUs by {plan.method}"
           f" ({plan.replicas} replicas per layer): {plan.fitted_cost:.3f} of fitted top-{plan.k} transitions "
           f"cross GPUs ({plan.status}{gap})")
    return compilation


def fuse(compilation: Compilation) -> Compilation:
    """Plan fusion groups (priced on the target's profile), where generated kernels run (see `fuses`)."""
    if not fuses(compilation):
        return compilation
    with task("fusion: planning groups"):
        fusion = plan_fusion(compilation.graph, compilation.cost)
        if compilation.options.verify or compilation.options.debug:
            verify_fusion(fusion, compilation.graph)
    return dataclasses.replace(compilation, fusion=fusion)


def schedule_steps(compilation: Compilation) -> Compilation:
    """The steps in order and the lifetimes they imply, worked out once for memory planning, the executor and
    inspection."""
    return dataclasses.replace(compilation, schedule=schedule_of(compilation.graph, compilation.fusion))


def lower_kernels(compilation: Compilation) -> Compilation:
    """The fusion plan's schedule as runtime work: each kept group a generated kernel."""
    if compilation.fusion is None:
        return compilation
    with task("generating kernels"):
        work = lower_schedule(compilation.graph, compilation.fusion, compilation.options.debug_dir)
    return dataclasses.replace(compilation, work=work)


def compile_kernels(compilation: Compilation) -> Compilation:
    """Compile the generated kernels for the target GPU now, in parallel, rather than at the first call."""
    if compilation.work is not None and compilation.target.on_gpu:
        with task(f"compiling {len(compilation.fusion.groups)} Triton kernels"):
            precompile(compilation.work, compilation.graph.types(), compilation.target.device)
    return compilation


def plan_memory(compilation: Compilation) -> Compilation:
    """Arenas for the intermediates, in the order the steps run (Options.arena)."""
    options = compilation.options
    if not options.arena:
        return compilation
    arena = plan_arena(compilation.graph, compilation.schedule, updates=compilation.updates,
                       time_limit=options.plan_time_limit, verify=options.debug)
    return dataclasses.replace(compilation, arena=arena)


def decide_capture(compilation: Compilation) -> Compilation:
    """Whether calls are captured in a CUDA graph: never off a GPU or without an arena; else as `cuda_graphs`
    or the torch.compile mode asks, else when the target's cost model predicts the host's dispatch of the graph's
    ops takes at least HOST_SHARE of the device's time for them."""
    options = compilation.options
    if not compilation.target.on_gpu:
        capture: dict[str, Any] = {"capture": False, "decided_by": "not on a GPU"}
    elif compilation.arena is None:
        capture = {"capture": False, "decided_by": "no arena (Options.arena=False)"}
    elif options.cuda_graphs is not None:
        capture = {"capture": options.cuda_graphs, "decided_by": "options"}
    elif options.mode in CAPTURING_MODES:
        capture = {"capture": CAPTURING_MODES[options.mode], "decided_by": f"mode {options.mode!r}"}
    else:
        capture = capture_by_cost(compilation.graph, compilation.cost)
    return dataclasses.replace(compilation, capture=capture)


def capture_by_cost(graph: Graph, cost: CostModel) -> dict[str, Any]:
    """Capture when `cost` predicts the host's dispatch of the graph's ops takes at least HOST_SHARE of the
    device's time for them; the decision with both predictions."""
    costs = cost.nodes(graph).values()
    host, device = sum(cost.dispatch_us for cost in costs), sum(cost.kernel_us for cost in costs)
    return {"capture": host >= HOST_SHARE * device, "decided_by": "cost model", "host_us": host, "device_us": device}


def fuses(compilation: Compilation) -> bool:
    """Whether to run generated kernels: asked for, or (by default) when the model is on a GPU and Triton loads."""
    on_gpu, fusion = compilation.target.on_gpu, compilation.options.fusion
    if fusion is False or (fusion is None and not on_gpu):
        return False
    try:
        importlib.import_module("triton")
    except ImportError as error:
        if fusion:
            raise CompileError(f"fusion=True needs Triton, which does not import: {error}") from error
        log.warning("Triton does not import (%s): running without generated kernels", error)
        return False
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise CompileError("fusion=True on the CPU runs generated kernels in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before importing torch, or leave fusion to its default")
    return True


def pass_stages(options: Options) -> tuple[Stage, ...]:
    """The graph passes as stages: layer skipping first and the ffn gate next when asked for, the memory reorder
    last when asked for."""
    skip = (SkipLayers(),) if options.layer_skip is not None else ()
    skip += (GateFFNs(),) if options.ffn_gate is not None else ()
    return skip + tuple(GraphPass(transform) for transform in PASSES + (REORDER if options.reorder else ()))


def stages(options: Options) -> tuple[Stage, ...]:
    """Every stage of a compile, in order."""
    placement = (place_experts,) if options.expert_placement is not None else ()
    return (*placement, *pass_stages(options), fuse, schedule_steps, lower_kernels, compile_kernels, plan_memory, decide_capture)


def planning_stages(options: Options) -> tuple[Stage, ...]:
    """The stages that decide what a compile builds, without generating or compiling a kernel (for inspection:
    nothing runs, and the target need not be this machine's)."""
    return tuple(stage for stage in stages(options) if stage not in (lower_kernels, compile_kernels))


def run(compilation: Compilation, to_run: Sequence[Stage]) -> Compilation:
    """Each stage in order, timed into `seconds`; after each graph pass, a checkpoint."""
    with task("compiling", total=len(to_run)) as update:
        for index, stage in enumerate(to_run, start=1):
            name = stage_name(stage)
            update(description=f"stage {index}/{len(to_run)}: {name}")
            started = time.perf_counter()
            before = compilation.graph
            with recording() as decisions:
                compilation = stage(compilation)
            compilation.seconds[name] = time.perf_counter() - started
            if decisions:
                compilation.decisions[name] = decisions
            if isinstance(stage, (GraphPass, SkipLayers, GateFFNs)):
                checkpoint(compilation.graph, name, compilation.options, index=index,
                           changed=compilation.graph is not before)
                changes = graph_changes(before, compilation.graph)
                if changes:
                    compilation.changes[name] = changes
            update(advance=1)
    return compilation


def graph_changes(before: Graph, after: Graph) -> dict[str, dict[str, int]]:
    """What a pass changed, by op: nodes gone, nodes new, and nodes kept under their name with other inputs or
    attributes (empty when nothing changed)."""
    if after is before:
        return {}
    old = {node.name: node for node in before.nodes}
    new = {node.name: node for node in after.nodes}
    changes = {
        "removed": Counter(node.op for name, node in old.items() if name not in new or new[name].op != node.op),
        "added": Counter(node.op for name, node in new.items() if name not in old or old[name].op != node.op),
        "rewritten": Counter(node.op for name, node in new.items() if name in old and old[name].op == node.op
                             and (old[name].inputs, old[name].attrs) != (node.inputs, node.attrs)),
    }
    return {kind: dict(sorted(counts.items())) for kind, counts in changes.items() if counts}


def stage_name(stage: Stage) -> str:
    return stage.name if isinstance(stage, (GraphPass, SkipLayers, GateFFNs)) else stage.__name__


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
