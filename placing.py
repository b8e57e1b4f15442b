"""`ember place`: fit expert placements on routing traces (files, or recorded from a model ember compiles) and
compare the methods side by side, on the fitted traces and on held-out ones, by the traffic simulator.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PlanError
from .optimizer.cost import load_profile
from .optimizer.expert_placement import Placement, plan_placement
from .optimizer.moe_traces import RoutingTrace, load_trace
from .optimizer.placement_sim import Simulation, simulate

log = logging.getLogger(__name__)

BASELINES = ("contiguous", "round_robin", "eplb")
CALIBRATION_BATCHES = 4
CALIBRATION_LENGTH = 64


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One method's plan and its simulated traffic on each trace set."""

    plan: Placement
    fitted: tuple[Simulation, ...]
    scored: tuple[Simulation, ...]


def traces_from(sources: Sequence[str], size: str = "tiny", seed: int = 0) -> list[RoutingTrace]:
    """Each source as traces: a trace file (.json, .safetensors), else a model (a built-in or package.module:function)
    whose routing ember records on seeded random-token calibration calls."""
    traces = []
    for source in sources:
        path = Path(source)
        if path.suffix in (".json", ".safetensors") or path.is_file():
            traces.append(load_trace(path))
            continue
        from .models import load
        from .optimizer.routing_record import calibration_batches, record_routing

        model, _ = load(source, size)
        batches = calibration_batches(source, CALIBRATION_BATCHES, CALIBRATION_LENGTH, seed, size=size)
        traces.append(record_routing(model, batches, name=source))
    return traces


def compare(fit: Sequence[RoutingTrace], score: Sequence[RoutingTrace], gpus: int, *, method: str = "mip",
            replicas: int = 0, gpus_per_node: int = 8, k: int = 1, time_limit_s: float = 60.0,
            hidden: int = 4096, profile: str = "h200") -> dict[str, MethodResult]:
    """Each method's plan fitted on `fit`, simulated on `fit` and `score`: the baselines, EPLB, and `method`.
    Baselines keep one replica per expert; EPLB and the affinity methods place `replicas` more per layer."""
    device = load_profile(profile)
    results = {}
    for name in dict.fromkeys((*BASELINES, method)):
        plan = plan_placement(fit, gpus, method=name, replicas=0 if name in ("contiguous", "round_robin") else replicas,
                              gpus_per_node=gpus_per_node, k=k, time_limit_s=time_limit_s)
        results[name] = MethodResult(plan, tuple(simulate(plan, trace, device, hidden=hidden) for trace in fit),
                                     tuple(simulate(plan, trace, device, hidden=hidden) for trace in score))
    return results


def summary(simulations: Sequence[Simulation]) -> dict[str, float]:
    """Token-weighted means over traces: top-1 remote share, trips per token-layer, load max/mean, a2a time."""
    tokens = sum(s.tokens for s in simulations)
    if not tokens:
        return {}
    mean = lambda value: sum(value(s) * s.tokens for s in simulations) / tokens  # noqa: E731
    return {"top1_remote": mean(lambda s: s.top1_remote), "trips_per_token_layer": mean(lambda s: s.trips_per_token_layer),
            "load_imbalance": mean(lambda s: s.load_imbalance), "cross_node_share": mean(lambda s: s.cross_node_share),
            "all_to_all_ms_per_1k_tokens": mean(lambda s: s.all_to_all_us / s.tokens)}


def run_command(args: argparse.Namespace) -> int:
    """The CLI: fit, compare, print a table (or one JSON object), and write the chosen plan with --out."""
    if args.gpus < 1 or (args.nodes and args.gpus % args.nodes):
        raise PlanError(f"--gpus {args.gpus} must be a positive multiple of --nodes {args.nodes}")
    gpus_per_node = args.gpus // args.nodes if args.nodes else min(args.gpus, 8)
    fit = traces_from(args.sources, args.size)
    score = traces_from(args.score or [], args.size)
    results = compare(fit, score, args.gpus, method=args.method, replicas=args.replicas, gpus_per_node=gpus_per_node,
                      k=args.k, time_limit_s=args.time_limit, hidden=args.hidden, profile=args.device)
    chosen = results[args.method].plan
    if args.out:
        Path(args.out).write_text(json.dumps(chosen.to_dict(), indent=1) + "\n")
    if args.json:
        print(json.dumps({
            "placement": chosen.as_lists(), "method": args.method, "gpus": args.gpus, "gpus_per_node": gpus_per_node,
            "fitted_on": [t.name for t in fit], "scored_on": [t.name for t in score],
            "methods": {name: {"plan": _plan_fields(result.plan), "fitted": summary(result.fitted),
                               "scored": summary(result.scored)} for name, result in results.items()},
        }, indent=1))
        return 0
    _print_table(results, args, fit, score)
    return 0


def _plan_fields(plan: Placement) -> dict[str, Any]:
    return {"replicas": plan.replicas, "objective": plan.fitted_cost, "lower_bound": _finite(plan.lower_bound),
            "gap": _finite(plan.gap), "status": plan.status, "solve_s": plan.solve_s, "notes": plan.notes}


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _print_table(results: dict[str, MethodResult], args: argparse.Namespace, fit: Sequence[RoutingTrace],
                 score: Sequence[RoutingTrace]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"expert placement on {args.gpus} GPUs, fitted on {', '.join(t.name for t in fit)}"
                  + (f", scored on {', '.join(t.name for t in score)}" if score else ""))
    held_out = "held-out" if score else "fitted"
    for column in ("method", "repl.", "fit top-1", f"{held_out} top-1", "trips/token", "load max/mean",
                   "a2a µs/token", "solve", "status"):
        table.add_column(column, justify="left" if column in ("method", "status") else "right")
    for name, result in results.items():
        fitted, scored = summary(result.fitted), summary(result.scored or result.fitted)
        plan = result.plan
        gap = "" if math.isnan(plan.gap) else f" {plan.gap:.0%}"
        table.add_row(name, str(plan.replicas), f"{fitted['top1_remote']:.3f}", f"{scored['top1_remote']:.3f}",
                      f"{scored['trips_per_token_layer']:.2f}", f"{scored['load_imbalance']:.3f}",
                      f"{scored['all_to_all_ms_per_1k_tokens']:.2f}", f"{plan.solve_s:.1f}s", plan.status + gap)
    Console().print(table)
    print("top-1: share of token-layer steps whose top-1 expert is on another GPU than one layer before; trips: rows "
          "sent across GPUs (dispatch and combine) per token and layer; a2a: predicted all-to-all per token")
