"""Expert placement, a planning pass: on which GPU each expert of each MoE layer lives, fitted on routing traces.

Baselines (contiguous, round-robin), DeepSeek's EPLB (replicate hot experts, pack for balance, hierarchically
over nodes), and affinity placement in the ExFlow spirit: experts that consecutive layers' tokens chain through
sit together, so a token that stays where its expert ran (one all-to-all per layer) rarely has to move. The
affinity search (placement_search) is a MIP on transition counts warm-started from a descent, checked against
an exact dynamic program where that is small enough, and split by recursive bipartition at scale.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import PlanError
from .moe_traces import RoutingTrace, compatible, loads, transitions
from .placement_search import affinity_search, crossing, held_of

log = logging.getLogger(__name__)

METHODS = ("contiguous", "round_robin", "eplb", "descent", "exact", "mip")
"""Placement methods: two baselines, EPLB, and the affinity search (descent alone, the exact program, the MIP)."""

GPUS_PER_NODE = 8


@dataclass(frozen=True, slots=True)
class Placement:
    """Where experts live: `gpus_of[layer][expert]` the GPUs holding a replica of it (one without replicas),
    with how the plan was made and what it scored on the traces it was fitted on."""

    method: str
    gpus: int
    gpus_per_node: int
    num_experts: int
    slots: int
    """Expert replicas one GPU holds per layer, at most."""
    gpus_of: tuple[tuple[tuple[int, ...], ...], ...]
    k: int = 1
    """The objective counts each token's top-k experts (k * k transitions per token and layer)."""
    fitted_on: tuple[str, ...] = ()
    fitted_cost: float = float("nan")
    """Share of fitted transitions that cross GPUs (the objective, normalised)."""
    lower_bound: float = float("nan")
    """A proven lower bound on that share (the exact program's optimum, the MIP's dual bound); NaN if none."""
    status: str = "heuristic"
    """"optimal", "feasible" (a solver's incumbent with a gap), or "heuristic"."""
    solve_s: float = 0.0
    notes: str = ""

    @property
    def layers(self) -> int:
        return len(self.gpus_of)

    @property
    def replicas(self) -> int:
        """Replicas beyond one per expert, per layer (the same for every layer)."""
        return sum(len(gpus) for gpus in self.gpus_of[0]) - self.num_experts if self.gpus_of else 0

    @property
    def gap(self) -> float:
        """(cost - bound) / cost: 0 for a proven optimum, NaN without a bound."""
        if math.isnan(self.lower_bound) or self.fitted_cost <= 0:
            return 0.0 if self.fitted_cost == 0 else float("nan")
        return max(0.0, (self.fitted_cost - self.lower_bound) / self.fitted_cost)

    def as_lists(self) -> list[list[int | list[int]]]:
        """Per layer, each expert's GPU, or its GPUs as a list when it is replicated: the CLI's JSON form."""
        return [[gpus[0] if len(gpus) == 1 else list(gpus) for gpus in layer] for layer in self.gpus_of]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus_of"] = [[list(gpus) for gpus in layer] for layer in self.gpus_of]
        data["fitted_on"] = list(self.fitted_on)
        data["replicas"] = self.replicas   # derived: for readers of the JSON; from_dict ignores it
        return data


def placement_from_dict(data: Mapping[str, Any]) -> Placement:
    """The Placement `Placement.to_dict` wrote, checked by `verify_placement`."""
    known = {field.name for field in fields(Placement)}
    try:
        plan = Placement(**{**{key: value for key, value in data.items() if key in known}, "gpus_of": tuple(tuple(tuple(int(g) for g in gpus) for gpus in layer)
                                                     for layer in data["gpus_of"]),
                            "fitted_on": tuple(data.get("fitted_on", ()))})
    except (TypeError, KeyError, ValueError) as error:
        raise PlanError(f"not an expert placement: {error}") from error
    verify_placement(plan)
    return plan


def as_placement(value: Placement | Mapping[str, Any] | str | Path) -> Placement:
    """A Placement from itself, its dict (Placement.to_dict), or the path of the JSON `ember place --out` wrote."""
    if isinstance(value, Placement):
        verify_placement(value)
        return value
    if isinstance(value, (str, Path)):
        try:
            value = json.loads(Path(value).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PlanError(f"cannot read an expert placement from {value}: {error}") from error
    if not isinstance(value, Mapping):
        raise PlanError(f"Options.expert_placement takes a Placement, its dict or a JSON path, not {type(value).__name__}")
    return placement_from_dict(value)


def match_routers(plan: Placement, layers: int, num_experts: int) -> None:
    """PlanError unless the plan is for a model of `layers` MoE layers of `num_experts` experts each."""
    if (plan.layers, plan.num_experts) != (layers, num_experts):
        raise PlanError(f"the expert placement is for {plan.layers} MoE layers of {plan.num_experts} experts; this "
                        f"model routes {layers} layers of {num_experts}: fit one on its own traces (ember place MODEL)")


def placement_from_lists(lists: Sequence[Sequence[int | Sequence[int]]], gpus: int, *, method: str = "given",
                         gpus_per_node: int = GPUS_PER_NODE) -> Placement:
    """A Placement from the CLI's JSON form (per layer, each expert's GPU or list of GPUs), checked."""
    try:
        gpus_of = tuple(tuple((int(entry),) if isinstance(entry, int) else tuple(sorted(int(g) for g in entry))
                              for entry in layer) for layer in lists)
    except (TypeError, ValueError) as error:
        raise PlanError(f"a placement lists, per layer, each expert's GPU or GPUs: {error}") from error
    if not gpus_of or not gpus_of[0]:
        raise PlanError("a placement needs at least one layer with one expert")
    slots = max(sum(g in gpus for gpus in layer) for layer in gpus_of for g in range(gpus))
    plan = Placement(method, gpus, gpus_per_node, len(gpus_of[0]), slots, gpus_of)
    verify_placement(plan)
    return plan


def verify_placement(plan: Placement) -> None:
    """Raise PlanError unless every expert of every layer is on at least one GPU in range, no GPU holds two
    replicas of one expert or more than `slots` experts, and replica counts are the same in every layer. It
    reads the plan alone, never the search that made it."""
    if plan.gpus < 1 or plan.gpus_per_node < 1 or plan.slots < 1:
        raise PlanError(f"a placement needs gpus, gpus_per_node and slots >= 1, got {plan.gpus}, "
                        f"{plan.gpus_per_node}, {plan.slots}")
    physical = None
    for layer, experts in enumerate(plan.gpus_of):
        if len(experts) != plan.num_experts:
            raise PlanError(f"layer {layer} places {len(experts)} experts, the model has {plan.num_experts}")
        held = [0] * plan.gpus
        for expert, gpus in enumerate(experts):
            if not gpus:
                raise PlanError(f"expert {expert} of layer {layer} is placed on no GPU")
            if len(set(gpus)) != len(gpus):
                raise PlanError(f"expert {expert} of layer {layer} has two replicas on one GPU: {list(gpus)}")
            for gpu in gpus:
                if not 0 <= gpu < plan.gpus:
                    raise PlanError(f"expert {expert} of layer {layer} is placed on GPU {gpu}, "
                                    f"outside 0..{plan.gpus - 1}")
                held[gpu] += 1
        if max(held) > plan.slots:
            raise PlanError(f"layer {layer}: GPU {held.index(max(held))} holds {max(held)} experts, "
                            f"more than its {plan.slots} slots")
        count = sum(held)
        if physical is not None and count != physical:
            raise PlanError(f"layer {layer} holds {count} expert replicas, layer 0 holds {physical}")
        physical = count


def slots_for(num_experts: int, gpus: int, replicas: int) -> int:
    """Expert replicas per GPU per layer: every physical replica placed, GPUs as even as can be."""
    if gpus < 1 or replicas < 0:
        raise PlanError(f"need gpus >= 1 and replicas >= 0, got {gpus} and {replicas}")
    if replicas and num_experts + replicas > num_experts * gpus:
        raise PlanError(f"{replicas} replicas for {num_experts} experts on {gpus} GPUs: an expert would need two "
                        f"replicas on one GPU; at most {num_experts * (gpus - 1)}")
    return math.ceil((num_experts + replicas) / gpus)


def contiguous(num_experts: int, layers: int, gpus: int) -> torch.Tensor:
    """int64 [layers, E]: experts in order, an even run per GPU (experts 0-3 on GPU 0, 4-7 on GPU 1)."""
    return (torch.arange(num_experts) * gpus // num_experts).expand(layers, -1).clone()


def round_robin(num_experts: int, layers: int, gpus: int) -> torch.Tensor:
    """int64 [layers, E]: expert e on GPU e mod gpus."""
    return (torch.arange(num_experts) % gpus).expand(layers, -1).clone()


def replica_counts(load: torch.Tensor, physical: int, most: int) -> torch.Tensor:
    """int64 [layers, E]: how many replicas each expert gets, `physical` per layer, at most `most` each (one per
    GPU): each extra one goes to the expert with the most tokens per replica (EPLB's replicate step)."""
    layers, num_experts = load.shape
    if physical > num_experts * most:
        raise PlanError(f"{physical} replicas of {num_experts} experts need more than one per GPU ({most} GPUs)")
    counts = torch.ones(layers, num_experts, dtype=torch.int64)
    rows = torch.arange(layers)
    for _ in range(physical - num_experts):
        per_replica = torch.where(counts < most, load / counts, -1.0)
        counts[rows, per_replica.argmax(-1)] += 1
    return counts


def balanced_packing(weights: Sequence[float], bins: int, capacity: int,
                     kinds: Sequence[int] | None = None) -> list[int]:
    """Each item's bin: heaviest first, into the lightest bin with room and, when `kinds` are given, no item of
    its kind yet (two replicas of one expert never share a GPU): EPLB's packing. PlanError when an item finds no
    bin."""
    fill = [0] * bins
    total = [0.0] * bins
    held: dict[int, set[int]] = {}
    where = [-1] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        taken = held.setdefault(kinds[item], set()) if kinds is not None else set()
        open_bins = [b for b in range(bins) if fill[b] < capacity and b not in taken]
        if not open_bins:
            raise PlanError(f"balanced packing: no bin left for item {item} ({bins} bins of {capacity})")
        chosen = min(open_bins, key=lambda b: (total[b], b))
        where[item] = chosen
        fill[chosen] += 1
        total[chosen] += weights[item]
        taken.add(chosen)
    return where


def eplb(load: torch.Tensor, gpus: int, replicas: int = 0, gpus_per_node: int = GPUS_PER_NODE,
         groups: int | None = None) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """DeepSeek's EPLB on `load[layer, expert]` (tokens per expert): replicas go to the hottest experts, then
    replicas are packed onto GPUs for balance. Hierarchical when experts come in `groups` that divide among the
    nodes: groups packed onto nodes, replicas made within each node, then packed onto its GPUs; global packing
    otherwise. Returns gpus_of[layer][expert]."""
    layers, num_experts = load.shape
    physical = num_experts + replicas
    slots = slots_for(num_experts, gpus, replicas)
    nodes = max(1, gpus // gpus_per_node) if gpus % gpus_per_node == 0 else 1
    groups = groups or nodes
    if nodes > 1 and num_experts % groups == 0 and groups % nodes == 0 and physical % gpus == 0:
        return _eplb_hierarchical(load, gpus, physical, nodes, groups)
    counts = replica_counts(load, physical, gpus)
    placed = []
    for layer in range(layers):
        replica_of = [e for e in range(num_experts) for _ in range(int(counts[layer, e]))]
        share = [float(load[layer, e] / counts[layer, e]) for e in replica_of]
        placed.append(_spread(replica_of, share, gpus, slots, num_experts))
    return tuple(placed)


def _spread(replica_of: Sequence[int], share: Sequence[float], gpus: int, slots: int,
            num_experts: int) -> tuple[tuple[int, ...], ...]:
    """Pack replicas onto GPUs for balance, no two replicas of one expert together; gpus_of per expert."""
    on: list[list[int]] = [[] for _ in range(num_experts)]
    for item, gpu in enumerate(balanced_packing(share, gpus, slots, replica_of)):
        on[replica_of[item]].append(gpu)
    return tuple(tuple(sorted(gpus_of)) for gpus_of in on)


def _eplb_hierarchical(load: torch.Tensor, gpus: int, physical: int, nodes: int,
                       groups: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    layers, num_experts = load.shape
    per_group = num_experts // groups
    per_node_gpus = gpus // nodes
    per_node_physical = physical // nodes
    placed = []
    for layer in range(layers):
        group_load = load[layer].view(groups, per_group).sum(-1).tolist()
        node_of_group = balanced_packing(group_load, nodes, groups // nodes)
        gpus_of: list[tuple[int, ...]] = [()] * num_experts
        for node in range(nodes):
            members = [g * per_group + e for g in range(groups) if node_of_group[g] == node for e in range(per_group)]
            node_load = load[layer, members][None]
            counts = replica_counts(node_load, per_node_physical, per_node_gpus)[0]
            replica_of = [i for i in range(len(members)) for _ in range(int(counts[i]))]
            share = [float(node_load[0, i] / counts[i]) for i in replica_of]
            local = _spread(replica_of, share, per_node_gpus, per_node_physical // per_node_gpus, len(members))
            for i, expert in enumerate(members):
                gpus_of[expert] = tuple(node * per_node_gpus + g for g in local[i])
        placed.append(tuple(gpus_of))
    return tuple(placed)


def as_gpus_of(assignment: torch.Tensor) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """gpus_of from an int tensor [layers, E] of one GPU per expert."""
    return tuple(tuple((int(g),) for g in row) for row in assignment.tolist())


def crossing_share(gpus_of: Sequence[Sequence[Sequence[int]]], transition_counts: torch.Tensor) -> float:
    """Share of transitions i -> j (layer l to l + 1) whose experts have no GPU in common, tokens of a replicated
    expert split evenly among its replicas: the objective every method is scored on."""
    total = float(transition_counts.sum())
    if total == 0:
        return 0.0
    gpus = 1 + max(g for layer in gpus_of for entry in layer for g in entry)
    return crossing(held_of(gpus_of, gpus), transition_counts) / total


def plan_placement(traces: Sequence[RoutingTrace], gpus: int, *, method: str = "mip", replicas: int = 0,
                   gpus_per_node: int = GPUS_PER_NODE, k: int = 1, balance: float | None = None,
                   time_limit_s: float = 60.0, seed: int = 0) -> Placement:
    """Fit a placement of the traces' experts on `gpus` GPUs by `method` (see METHODS). `replicas` extra expert
    replicas per layer go to the hottest experts; `balance` caps each GPU's load at that multiple of the mean
    (affinity methods; 1.10 by default when replicating). The result is verified before it is returned."""
    if method not in METHODS:
        raise PlanError(f"unknown placement method {method!r}; choose one of {', '.join(METHODS)}")
    layers, num_experts = compatible(traces)
    k = min(k, min(trace.k for trace in traces))
    slots = slots_for(num_experts, gpus, replicas)
    started = time.perf_counter()
    counts = transitions(traces, k)
    expert_load = loads(traces)
    if replicas and balance is None:
        balance = 1.10
    fields: dict[str, Any] = {}
    if method in ("contiguous", "round_robin") and replicas:
        raise PlanError(f"{method} places one replica per expert; replicas need eplb, descent or mip")
    if method == "contiguous":
        gpus_of = as_gpus_of(contiguous(num_experts, layers, gpus))
    elif method == "round_robin":
        gpus_of = as_gpus_of(round_robin(num_experts, layers, gpus))
    elif method == "eplb":
        gpus_of = eplb(expert_load, gpus, replicas, gpus_per_node)
    else:
        start = eplb(expert_load, gpus, replicas, gpus_per_node) if replicas else None
        result = affinity_search(counts, expert_load, gpus, slots, replicas=replicas, balance=balance,
                                 method=method, time_limit_s=time_limit_s, gpus_per_node=gpus_per_node,
                                 seed=seed, start=start)
        gpus_of = result.gpus_of
        total = float(counts.sum()) or 1.0
        fields = {"lower_bound": result.lower_bound / total, "status": result.status, "notes": result.notes}
    plan = Placement(method, gpus, gpus_per_node, num_experts, slots, gpus_of, k,
                     tuple(trace.name for trace in traces), crossing_share(gpus_of, counts),
                     solve_s=time.perf_counter() - started, **fields)
    verify_placement(plan)
    log.info("placement %s on %d GPUs: %.4f of transitions cross GPUs (%s, %.2f s)", method, gpus,
             plan.fitted_cost, plan.status, plan.solve_s)
    return plan
