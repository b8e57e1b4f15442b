"""Expert-parallel traffic simulator: replay a routing trace through a placement, token by token, and count what
crosses GPUs and nodes, the bytes each GPU sends and receives, the load each GPU runs, and the all-to-all time
the device profile's link and network bandwidths predict.

It follows runtime.expert_parallel exactly: token t of T starts on GPU t * G // T; at each layer it is sent once
to every other GPU holding one of its k experts (dispatch), and each of those GPUs sends its weighted partial sum
to the token's next home (combine) - the GPU of its top-1 expert in the ExFlow "stay" mode, its own home in the
"return" mode. A replicated expert runs on the token's current GPU when a replica is there, else on replica
t mod (replica count).
"""
from __future__ import annotations

from dataclasses import dataclass

import math
from collections.abc import Sequence

import torch

from ..errors import PlanError
from ..ir.plans import home_ranks
from .cost.profile import DeviceProfile
from .expert_placement import Placement
from .moe_traces import RoutingTrace

MODES = ("stay", "return")
REPLICA_CHOICES = ("capped", "local", "spread")
CAP_SLACK = 0.05
"""With "capped" replica choice, no replica runs more than this much over its even share of its expert's tokens."""


@dataclass(frozen=True, slots=True)
class LayerTraffic:
    """One MoE layer: token trips (a row sent to another GPU), those across nodes, bytes, time and load."""

    dispatch_trips: int
    combine_trips: int
    cross_node_trips: int
    dispatch_bytes: int
    combine_bytes: int
    dispatch_us: float
    combine_us: float
    load_imbalance: float
    """The busiest GPU's (token, expert) pairs over the mean GPU's."""


@dataclass(frozen=True, slots=True)
class Simulation:
    """A trace replayed through a placement: per-layer traffic and the totals that compare methods."""

    trace: str
    method: str
    gpus: int
    mode: str
    tokens: int
    k: int
    layers: tuple[LayerTraffic, ...]
    top1_remote: float
    """Share of token-layer steps (after the first layer) whose top-1 expert ran on another GPU than the
    token's top-1 one layer before: the objective of the README's measurements."""

    @property
    def trips_per_token_layer(self) -> float:
        """Rows sent across GPUs (dispatch and combine) per token and layer."""
        return sum(layer.dispatch_trips + layer.combine_trips for layer in self.layers) / (self.tokens * len(self.layers))

    @property
    def total_bytes(self) -> int:
        return sum(layer.dispatch_bytes + layer.combine_bytes for layer in self.layers)

    @property
    def cross_node_share(self) -> float:
        trips = sum(layer.dispatch_trips + layer.combine_trips for layer in self.layers)
        return sum(layer.cross_node_trips for layer in self.layers) / trips if trips else 0.0

    @property
    def all_to_all_us(self) -> float:
        """Predicted all-to-all time of one step through every layer."""
        return sum(layer.dispatch_us + layer.combine_us for layer in self.layers)

    @property
    def load_imbalance(self) -> float:
        """Max/mean GPU load, averaged over layers."""
        return sum(layer.load_imbalance for layer in self.layers) / len(self.layers)

    @property
    def worst_load_imbalance(self) -> float:
        return max(layer.load_imbalance for layer in self.layers)


def simulate(plan: Placement, trace: RoutingTrace, profile: DeviceProfile, *, hidden: int = 4096,
             element_bytes: int = 2, mode: str = "stay", replica_choice: str = "capped",
             tokens: int | None = None) -> Simulation:
    """Replay the first `tokens` tokens of `trace` (all by default) through `plan`, rows of `hidden` elements of
    `element_bytes` each. A replicated expert runs where the token is when a replica is there
    (`replica_choice="local"`), else, and always with "spread", on replica t mod (replica count); "capped" is
    "local" with no replica taking more than CAP_SLACK over its share, the overflow moved to the others."""
    if mode not in MODES:
        raise PlanError(f"unknown expert-parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    if replica_choice not in REPLICA_CHOICES:
        raise PlanError(f"unknown replica choice {replica_choice!r}; choose one of {', '.join(REPLICA_CHOICES)}")
    if (trace.layers, trace.num_experts) != (plan.layers, plan.num_experts):
        raise PlanError(f"trace {trace.name!r} has {trace.layers} layers x {trace.num_experts} experts, the "
                        f"placement {plan.layers} x {plan.num_experts}")
    experts = trace.experts[:tokens].long()
    count, gpus = experts.shape[0], plan.gpus
    if count == 0:
        raise PlanError(f"trace {trace.name!r} has no tokens to simulate")
    held, replica_gpu, replica_count = _replica_tables(plan)
    node = torch.arange(gpus) // plan.gpus_per_node
    token_ids = torch.arange(count)
    home = home_ranks(count, gpus)
    row_bytes = hidden * element_bytes
    layers, remote_steps, previous_top1 = [], 0, home
    for layer in range(plan.layers):
        chosen = experts[:, layer]                                                    # [T, k]
        local = held[layer][chosen, home[:, None]] & (replica_choice != "spread")   # a replica where the token is
        pick = replica_gpu[layer][chosen, token_ids[:, None] % replica_count[layer][chosen]]
        gpu = torch.where(local, home[:, None], pick)                                # [T, k]
        if replica_choice == "capped":
            gpu = _cap_replicas(gpu, chosen, plan.gpus_of[layer])
        holders = torch.zeros(count, gpus, dtype=torch.float64)
        holders.scatter_(1, gpu, 1.0)
        following = gpu[:, 0] if mode == "stay" else home
        if layer:
            remote_steps += int((gpu[:, 0] != previous_top1).sum())
        previous_top1 = gpu[:, 0]
        dispatch = _sends(holders, home, gpus, from_home=True)
        combine = _sends(holders, following, gpus, from_home=False)
        crossing_nodes = float((dispatch + combine)[node[:, None] != node[None, :]].sum())
        load = torch.zeros(gpus, dtype=torch.float64).scatter_add_(0, gpu.flatten(),
                                                                   torch.ones(gpu.numel(), dtype=torch.float64))
        layers.append(LayerTraffic(
            int(dispatch.sum()), int(combine.sum()), int(crossing_nodes), int(dispatch.sum()) * row_bytes,
            int(combine.sum()) * row_bytes, _all_to_all_us(dispatch * row_bytes, node, profile),
            _all_to_all_us(combine * row_bytes, node, profile), float(load.max() / load.mean())))
        home = following
    steps = count * max(plan.layers - 1, 1)
    return Simulation(trace.name, plan.method, gpus, mode, count, trace.k, tuple(layers), remote_steps / steps)


def _cap_replicas(gpu: torch.Tensor, chosen: torch.Tensor, gpus_of: Sequence[Sequence[int]]) -> torch.Tensor:
    """Move the latest tokens off any replica over its cap (its even share plus CAP_SLACK) onto the replicas of
    the same expert with room, least full first."""
    gpu = gpu.clone()
    flat_gpu, flat_expert = gpu.view(-1), chosen.reshape(-1)
    for expert, replicas in enumerate(gpus_of):
        if len(replicas) < 2:
            continue
        pairs = (flat_expert == expert).nonzero().flatten()
        cap = math.ceil(len(pairs) / len(replicas) * (1 + CAP_SLACK))
        on = {g: pairs[flat_gpu[pairs] == g] for g in replicas}
        overflow = torch.cat([on[g][cap:] for g in replicas])
        room = {g: cap - min(cap, len(on[g])) for g in replicas}
        start = 0
        for g in sorted(replicas, key=lambda g: -room[g]):
            take = overflow[start:start + room[g]]
            flat_gpu[take] = g
            start += len(take)
    return gpu


def _replica_tables(plan: Placement) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: held [E, G] bool, replica GPUs [E, most replicas] and replica counts [E]."""
    held, replica_gpu, replica_count = [], [], []
    widest = max(len(gpus) for layer in plan.gpus_of for gpus in layer)
    for layer in plan.gpus_of:
        table = torch.zeros(plan.num_experts, plan.gpus, dtype=torch.bool)
        gpus_table = torch.zeros(plan.num_experts, widest, dtype=torch.int64)
        for expert, gpus in enumerate(layer):
            table[expert, list(gpus)] = True
            gpus_table[expert, :len(gpus)] = torch.tensor(gpus)
        held.append(table)
        replica_gpu.append(gpus_table)
        replica_count.append(torch.tensor([len(gpus) for gpus in layer]))
    return held, replica_gpu, replica_count


def _sends(holders: torch.Tensor, anchor: torch.Tensor, gpus: int, *, from_home: bool) -> torch.Tensor:
    """float64 [src, dst] rows sent: from the anchor to every other holder (dispatch), or from every holder to
    the anchor (combine)."""
    remote = holders.clone()
    remote[torch.arange(len(anchor)), anchor] = 0.0
    matrix = torch.zeros(gpus, gpus, dtype=torch.float64).index_add_(0, anchor, remote)   # [anchor, holder]
    return matrix if from_home else matrix.T


def _all_to_all_us(sent_bytes: torch.Tensor, node: torch.Tensor, profile: DeviceProfile) -> float:
    """One all-to-all's predicted time: the slowest GPU's sending or receiving, its node's GPUs over the link
    bandwidth and the others over the network, plus the collective's fixed latency."""
    same_node = node[:, None] == node[None, :]
    inside = torch.where(same_node, sent_bytes, 0.0)
    outside = torch.where(same_node, 0.0, sent_bytes)
    send = inside.sum(1) / profile.link_gbps + outside.sum(1) / profile.network_gbps
    receive = inside.sum(0) / profile.link_gbps + outside.sum(0) / profile.network_gbps
    slowest = float(torch.maximum(send, receive).max()) / 1e3   # bytes / (GB/s) = ns
    return slowest + profile.collective_latency_us
