"""The affinity search behind expert placement: keep transitions between consecutive layers' experts on one GPU.

The objective is the count of transitions i -> j (a token's expert i at layer l, j at layer l + 1) whose experts
share no GPU, a token of a replicated expert equally likely on each replica. Three ways to minimise it:
- descent: each layer in turn placed optimally given its neighbours (a transport problem, networkx's min-cost
  flow), swept until nothing improves, from several starts;
- exact: a dynamic program over the balanced placements of one layer, where there are few (8 experts on 2 or 4
  GPUs: 70 or 2,520), the proven optimum to check the others against;
- mip: ExFlow's integer program on the transition counts (pulp + HiGHS), warm-started from the descent, with a
  time limit and the proven gap; at scale, recursive bipartition of the GPUs (nodes first), each half-split
  solved by the same descent.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import pulp
import torch

from ..errors import PlanError
from .mip import warm_solver

log = logging.getLogger(__name__)

EXACT_STATES = 5000
"""The exact program runs where one layer has at most this many balanced placements."""
MIP_TERMS = 120_000
"""Above this many MIP terms (transition pairs x GPUs), the MIP gives way to recursive bipartition."""
MAX_SWEEPS = 40
POOL_EXPERTS = 32
"""The pool search (the exact program over swaps of the current layers' placements) runs up to this many experts."""
FLOW_SCALE = 3600
"""Affinities are scaled to integers for the min-cost flow (3600 is divisible by every replica count to 6)."""
BISECTIONS = 20
SPLIT_BALANCE = 1.10
"""Recursive bipartition keeps each GPU's load within this multiple of the mean (compounded over the levels)."""
MIP_SHARE = 0.75
"""HiGHS runs past its limit while it builds; it gets this share of what time is left."""


@dataclass(frozen=True, slots=True)
class SearchResult:
    """A placement and a proven lower bound on the crossing transitions (a count; NaN if none)."""

    gpus_of: tuple[tuple[tuple[int, ...], ...], ...]
    lower_bound: float
    status: str
    notes: str = ""


def held_of(gpus_of: Sequence[Sequence[Sequence[int]]], gpus: int) -> torch.Tensor:
    """float64 [layers, E, gpus]: 1 where the GPU holds a replica of the expert."""
    held = torch.zeros(len(gpus_of), len(gpus_of[0]), gpus, dtype=torch.float64)
    for layer, experts in enumerate(gpus_of):
        for expert, entry in enumerate(experts):
            held[layer, expert, list(entry)] = 1.0
    return held


def gpus_of_held(held: torch.Tensor) -> tuple[tuple[tuple[int, ...], ...], ...]:
    return tuple(tuple(tuple(int(g) for g in row.nonzero().flatten()) for row in layer) for layer in held)


def crossing(held: torch.Tensor, counts: torch.Tensor) -> float:
    """Transitions whose experts share no GPU (a replicated expert's tokens split evenly over its replicas)."""
    share = held / held.sum(-1, keepdim=True)
    return float(counts.sum()) - float(torch.einsum("lig,lij,ljg->", share[:-1], counts, held[1:]))


def gpu_loads(held: torch.Tensor, expert_load: torch.Tensor) -> torch.Tensor:
    """float64 [layers, gpus]: tokens each GPU runs, a replicated expert's split evenly."""
    return torch.einsum("le,leg->lg", expert_load / held.sum(-1), held)


def balanced(held: torch.Tensor, expert_load: torch.Tensor, balance: float | None) -> bool:
    if balance is None:
        return True
    per_gpu = gpu_loads(held, expert_load)
    return bool((per_gpu.max(-1).values <= balance * per_gpu.mean(-1) + 1e-9).all())


def affinity_search(counts: torch.Tensor, expert_load: torch.Tensor, gpus: int, slots: int, *, replicas: int = 0,
                    balance: float | None = None, method: str = "mip", time_limit_s: float = 60.0,
                    gpus_per_node: int = 8, seed: int = 0,
                    start: tuple[tuple[tuple[int, ...], ...], ...] | None = None) -> SearchResult:
    """Minimise crossing transitions (`counts[l, i, j]`) for `gpus` GPUs of `slots` experts each, by `method`:
    "descent", "exact" or "mip". `start` (a balanced placement with the replicas wanted, e.g. EPLB's) seeds the
    search; without replicas, contiguous and random starts do."""
    started = time.perf_counter()
    num_experts = expert_load.shape[1]
    if method == "exact":
        return _exact_or_error(counts, num_experts, gpus, slots, replicas, balance)
    if start is None and replicas:
        raise PlanError("a replicated placement needs a start with its replica counts")
    terms = int((counts > 0).sum()) * gpus
    if method == "mip" and terms > MIP_TERMS and not replicas:
        return _bipartition(counts, expert_load, gpus, slots, gpus_per_node, time_limit_s, seed, balance)
    descent_budget = time_limit_s * (0.3 if method == "mip" else 1.0)
    held = _descent_from_starts(counts, expert_load, gpus, slots, balance, start, seed, descent_budget)
    cost = crossing(held, counts)
    if method == "descent":
        return SearchResult(gpus_of_held(held), math.nan, "heuristic", "descent")
    if terms > MIP_TERMS:
        return SearchResult(gpus_of_held(held), math.nan, "heuristic",
                            f"MIP too large ({terms} terms > {MIP_TERMS}) with replicas: the descent's plan")
    left = time_limit_s - (time.perf_counter() - started)
    solved, bound, status = _mip(counts, expert_load, held, slots, balance, max(0.5, left))
    solved_cost = crossing(solved, counts)
    if solved_cost < cost - 1e-9 and balanced(solved, expert_load, balance):
        held, cost = solved, solved_cost
    if cost <= bound + 1e-6:
        status = "optimal"
    return SearchResult(gpus_of_held(held), min(bound, cost), status,
                        f"MIP {status}, descent warm start")


def _start_assignments(num_experts: int, gpus: int, slots: int, seed: int) -> list[torch.Tensor]:
    """Layer-0 placements (one GPU per expert) to start descents from: contiguous, round-robin, then random."""
    contiguous = torch.arange(num_experts) // slots
    round_robin = torch.arange(num_experts) % gpus
    generator = torch.Generator().manual_seed(seed)
    starts = [contiguous, round_robin]
    starts += [contiguous[torch.randperm(num_experts, generator=generator)] for _ in range(30)]
    return starts


def _descent_from_starts(counts: torch.Tensor, expert_load: torch.Tensor, gpus: int, slots: int,
                         balance: float | None, start: tuple | None, seed: int, budget_s: float) -> torch.Tensor:
    """The best descent over several starts within `budget_s` (at least two starts, or the given one)."""
    deadline = time.perf_counter() + budget_s / 2   # starts get half the budget, the pool search the rest
    layers, num_experts = expert_load.shape
    if start is not None:
        return _descent(held_of(start, gpus), counts, expert_load, slots, balance)
    best, best_cost = None, math.inf
    for index, first in enumerate(_start_assignments(num_experts, gpus, slots, seed)):
        if index >= 2 and time.perf_counter() > deadline:
            break
        held = torch.zeros(layers, num_experts, gpus, dtype=torch.float64)
        held[0, torch.arange(num_experts), first] = 1.0
        for layer in range(1, layers):   # greedy: each layer placed for the one before it
            held[layer] = _best_layer(layer, held, counts, slots, torch.ones(num_experts), forward_only=True)
        held = _descent(held, counts, expert_load, slots, balance)
        cost = crossing(held, counts)
        if cost < best_cost - 1e-9:
            best, best_cost = held, cost
    if balance is None and num_experts <= POOL_EXPERTS:
        best = _pool_search(best, counts, deadline + budget_s / 2)
    return best


def _pool_search(held: torch.Tensor, counts: torch.Tensor, deadline: float) -> torch.Tensor:
    """Improve a one-replica placement by the exact program over a pool of layer placements: every layer's
    current one and each with two experts on different GPUs swapped. Any layer may take any pool member, so a
    round can move many layers at once; rounds repeat while they help (and time is left)."""
    assignment = held.argmax(-1)
    cost = crossing(held, counts)
    while True:
        pool = {tuple(row.tolist()) for row in assignment}
        for row in list(pool):
            for a, b in itertools.combinations(range(len(row)), 2):
                if row[a] != row[b]:
                    swapped = list(row)
                    swapped[a], swapped[b] = row[b], row[a]
                    pool.add(tuple(swapped))
        states = torch.tensor(sorted(pool), dtype=torch.int64)
        chain, found = _chain_over(states, counts, held.shape[-1])
        if found >= cost - 1e-9:
            break
        assignment, cost = states[chain], found
        if time.perf_counter() > deadline:
            break
    return torch.nn.functional.one_hot(assignment, held.shape[-1]).to(torch.float64)


def _descent(held: torch.Tensor, counts: torch.Tensor, expert_load: torch.Tensor, slots: int,
             balance: float | None) -> torch.Tensor:
    """Sweep the layers, forward then back, placing each optimally given its neighbours, until no sweep helps;
    a layer's new placement is kept only if it keeps the balance."""
    held = held.clone()
    replicas = held.sum(-1)
    cost = crossing(held, counts)
    for _ in range(MAX_SWEEPS):
        before = cost
        for layer in itertools.chain(range(held.shape[0]), reversed(range(held.shape[0]))):
            previous = held[layer].clone()
            held[layer] = _best_layer(layer, held, counts, slots, replicas[layer])
            if not balanced(held[layer:layer + 1], expert_load[layer:layer + 1], balance):
                held[layer] = previous
        cost = crossing(held, counts)
        if cost >= before - 1e-9:
            break
    return held


def _best_layer(layer: int, held: torch.Tensor, counts: torch.Tensor, slots: int, replicas: torch.Tensor,
                forward_only: bool = False) -> torch.Tensor:
    """Layer `layer`'s placement that keeps the most transitions local given the layers around it: a transport
    problem (each expert its replica count, each GPU `slots`, one replica per GPU) by min-cost flow."""
    layers, num_experts, gpus = held.shape
    affinity = torch.zeros(num_experts, gpus, dtype=torch.float64)
    if layer > 0:
        share = held[layer - 1] / held[layer - 1].sum(-1, keepdim=True)
        affinity += counts[layer - 1].T @ share
    if layer < layers - 1 and not forward_only:
        affinity += (counts[layer] @ held[layer + 1]) / replicas[:, None]
    flow = nx.DiGraph()
    physical = int(replicas.sum())
    flow.add_node("sink", demand=physical)
    for expert in range(num_experts):
        flow.add_node(("e", expert), demand=-int(replicas[expert]))
        for gpu in range(gpus):
            flow.add_edge(("e", expert), ("g", gpu), capacity=1,
                          weight=-int(round(float(affinity[expert, gpu]) * FLOW_SCALE)))
    for gpu in range(gpus):
        flow.add_edge(("g", gpu), "sink", capacity=slots, weight=0)
    result = nx.min_cost_flow(flow)
    placed = torch.zeros(num_experts, gpus, dtype=torch.float64)
    for expert in range(num_experts):
        for (_, gpu), amount in result[("e", expert)].items():
            placed[expert, gpu] = float(amount)
    return placed


def balanced_states(num_experts: int, gpus: int, slots: int) -> torch.Tensor:
    """int64 [states, E]: every placement of E experts on `gpus` GPUs with exactly `slots` each."""
    states: list[list[int]] = []

    def extend(prefix: list[int], fill: list[int]) -> None:
        if len(prefix) == num_experts:
            states.append(list(prefix))
            return
        for gpu in range(gpus):
            if fill[gpu] < slots:
                fill[gpu] += 1
                prefix.append(gpu)
                extend(prefix, fill)
                prefix.pop()
                fill[gpu] -= 1

    extend([], [0] * gpus)
    return torch.tensor(states, dtype=torch.int64)


def state_count(num_experts: int, gpus: int, slots: int) -> int:
    """How many placements of one layer the exact program would range over (0 unless slots * gpus == E)."""
    if slots * gpus != num_experts:
        return 0
    return math.factorial(num_experts) // math.factorial(slots) ** gpus


def _exact_or_error(counts: torch.Tensor, num_experts: int, gpus: int, slots: int, replicas: int,
                    balance: float | None) -> SearchResult:
    states = state_count(num_experts, gpus, slots)
    if replicas or balance is not None or not 0 < states <= EXACT_STATES:
        raise PlanError(f"the exact method needs one replica per expert, no balance cap, experts divisible by GPUs "
                        f"and at most {EXACT_STATES} placements per layer ({states} here); use mip or descent")
    assignment, cost = exact_placement(counts, gpus, slots)
    gpus_of = tuple(tuple((int(g),) for g in row) for row in assignment)
    return SearchResult(gpus_of, cost, "optimal", f"dynamic program over {states} placements per layer")


def exact_placement(counts: torch.Tensor, gpus: int, slots: int) -> tuple[torch.Tensor, float]:
    """The optimum ([layers, E] GPU per expert, crossing count) by dynamic programming over each layer's balanced
    placements: cost(p -> q) = transitions whose experts p and q put on different GPUs."""
    states = balanced_states(counts.shape[-1], gpus, slots)
    chain, cost = _chain_over(states, counts, gpus)
    return states[chain], cost


def _chain_over(states: torch.Tensor, counts: torch.Tensor, gpus: int) -> tuple[list[int], float]:
    """The best sequence of layer placements drawn from `states` (int64 [S, E]), by dynamic programming:
    (state index per layer, crossing count)."""
    onehot = torch.nn.functional.one_hot(states, gpus).to(torch.float64)       # [S, E, G]
    best = torch.zeros(len(states), dtype=torch.float64)
    back = []
    for layer in range(counts.shape[0]):
        same = torch.einsum("peg,ef,qfg->pq", onehot, counts[layer], onehot)
        total = best[:, None] + (float(counts[layer].sum()) - same)
        best, argmin = total.min(0)
        back.append(argmin)
    state = int(best.argmin())
    cost = float(best[state])
    chain = [state]
    for argmin in reversed(back):
        state = int(argmin[state])
        chain.append(state)
    return list(reversed(chain)), cost


def _mip(counts: torch.Tensor, expert_load: torch.Tensor, start: torch.Tensor, slots: int,
         balance: float | None, time_limit_s: float) -> tuple[torch.Tensor, float, str]:
    """ExFlow's integer program: x[l, e, g] = expert e of layer l has a replica on GPU g; y[l, i, j, g] <= both
    x[l, i, g] and x[l + 1, j, g] marks transition i -> j kept on g, worth counts / replicas of i. Maximise what
    is kept, each expert its replica count, each GPU its slots (and its load within `balance` x the mean), the
    first layer's GPU labels fixed (expert e on GPUs <= e) to cut symmetry. Returns (placement, a lower bound on
    crossing transitions, status)."""
    layers, num_experts, gpus = start.shape
    replicas = start.sum(-1)
    model = pulp.LpProblem("expert_placement", pulp.LpMinimize)
    x = {(l, e, g): pulp.LpVariable(f"x_{l}_{e}_{g}", cat="Binary")
         for l in range(layers) for e in range(num_experts) for g in range(gpus)}
    kept = []
    y = {}
    for l, i, j in (counts > 0).nonzero().tolist():
        weight = float(counts[l, i, j]) / float(replicas[l, i])
        for g in range(gpus):
            variable = pulp.LpVariable(f"y_{l}_{i}_{j}_{g}", lowBound=0, upBound=1)
            y[(l, i, j, g)] = variable
            model += variable <= x[(l, i, g)]
            model += variable <= x[(l + 1, j, g)]
            kept.append(weight * variable)
    model += -pulp.lpSum(kept)   # minimise crossing = total - kept
    for (l, i, g), terms in _group(y, lambda key: (key[0], key[1], key[3])).items():
        model += pulp.lpSum(terms) <= slots * x[(l, i, g)]   # at most `slots` successors share i's GPU
    for (l, j, g), terms in _group(y, lambda key: (key[0], key[2], key[3])).items():
        model += pulp.lpSum(terms) <= slots * x[(l + 1, j, g)]
    for l in range(layers):
        for e in range(num_experts):
            model += pulp.lpSum(x[(l, e, g)] for g in range(gpus)) == int(replicas[l, e])
        for g in range(gpus):
            model += pulp.lpSum(x[(l, e, g)] for e in range(num_experts)) <= slots
            if balance is not None:
                mean = float(expert_load[l].sum()) / gpus
                model += pulp.lpSum(float(expert_load[l, e] / replicas[l, e]) * x[(l, e, g)]
                                    for e in range(num_experts)) <= balance * mean
    if balance is None:   # with a balance cap, the warm start's labels are kept (relabelling it may not fit)
        for e in range(num_experts):
            for g in range(e + 1, gpus):
                model += x[(0, e, g)] == 0
    start = _canonical(start) if balance is None else start
    values = {x[key].name: float(start[key]) for key in x}
    values.update({variable.name: min(float(start[l, i, g]), float(start[l + 1, j, g]))
                   for (l, i, j, g), variable in y.items()})
    total = float(counts.sum())
    solver = warm_solver(values, model, MIP_SHARE * time_limit_s)
    try:
        model.solve(solver)
    except pulp.PulpSolverError as error:
        log.warning("the placement MIP failed (%s); keeping the descent's plan", error)
        return start, 0.0, "heuristic"
    if model.sol_status <= 0:
        return start, 0.0, "heuristic"
    solved = torch.tensor([[[round(x[(l, e, g)].value() or 0) for g in range(gpus)] for e in range(num_experts)]
                           for l in range(layers)], dtype=torch.float64)
    if not (solved.sum(-1) == replicas).all() or (solved.sum(1) > slots).any():
        return start, 0.0, "heuristic"
    highs = getattr(model, "solverModel", None)
    least = highs.getInfo().mip_dual_bound if highs is not None else -math.inf   # a bound on -kept
    bound = max(0.0, total + least) if math.isfinite(least) else 0.0
    status = "optimal" if model.sol_status == pulp.LpSolutionOptimal else "feasible"
    return solved, bound, status


def _group(variables: dict, key) -> dict:
    """Variables gathered by `key(their index)`."""
    grouped: dict = {}
    for index, variable in variables.items():
        grouped.setdefault(key(index), []).append(variable)
    return grouped


def _canonical(held: torch.Tensor) -> torch.Tensor:
    """The same placement with GPUs relabelled in order of the first layer's smallest expert on each, so that
    it meets the MIP's symmetry cut (expert e of layer 0 only on GPUs <= e)."""
    first = held[0]
    gpus = held.shape[-1]
    smallest = [int(first[:, g].nonzero().min()) if first[:, g].any() else math.inf for g in range(gpus)]
    order = sorted(range(gpus), key=lambda g: smallest[g])
    return held[:, :, order]


def _bipartition(counts: torch.Tensor, expert_load: torch.Tensor, gpus: int, slots: int, gpus_per_node: int,
                 time_limit_s: float, seed: int, balance: float | None) -> SearchResult:
    """Recursive bipartition (ExFlow's answer to many GPUs): split the GPUs in halves, node boundaries first,
    and each layer's experts between them by a two-way descent (each layer's split exact given its neighbours:
    the experts most drawn to one side go there, as many as it has slots, its load kept near its share), then
    recurse into each half."""
    layers, num_experts = expert_load.shape
    levels = max(1, math.ceil(math.log2(gpus)))
    tolerance = (balance or SPLIT_BALANCE) ** (1 / levels) - 1   # per split, so that the levels compound to `balance`
    gpu_of = torch.zeros(layers, num_experts, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    pending = [(0, gpus, [torch.arange(num_experts) for _ in range(layers)])]
    while pending:
        low, high, members = pending.pop()
        if high - low == 1:
            for layer in range(layers):
                gpu_of[layer, members[layer]] = low
            continue
        middle = low + _split_point(high - low, gpus_per_node)
        deadline = time.perf_counter() + time_limit_s * (high - low) / gpus / levels   # a level's splits share 1/levels
        sides = _two_way(counts, expert_load, members, (middle - low) / (high - low), slots * (middle - low),
                         slots * (high - middle), tolerance, generator, deadline)
        pending.append((low, middle, [m[~s] for m, s in zip(members, sides)]))
        pending.append((middle, high, [m[s] for m, s in zip(members, sides)]))
    held = torch.nn.functional.one_hot(gpu_of, gpus).to(torch.float64)
    return SearchResult(gpus_of_held(held), math.nan, "heuristic",
                        f"recursive bipartition ({int((counts > 0).sum()) * gpus} MIP terms: too many for one MIP)")


def _split_point(width: int, gpus_per_node: int) -> int:
    """Where to halve `width` GPUs: at a node boundary while more than one node is in the range."""
    if width > gpus_per_node and width % gpus_per_node == 0:
        return (width // gpus_per_node // 2 or 1) * gpus_per_node
    return width // 2


def _two_way(counts: torch.Tensor, expert_load: torch.Tensor, members: list[torch.Tensor], share: float,
             capacity_a: int, capacity_b: int, tolerance: float, generator: torch.Generator,
             deadline: float) -> list[torch.Tensor]:
    """Per layer, a bool mask over `members[layer]`: True for side b. Best of a few descents."""
    layers = len(members)
    sizes = [len(m) for m in members]
    on_a = [min(capacity_a, max(size - capacity_b, round(size * share))) for size in sizes]
    sub = [counts[l][members[l]][:, members[l + 1]] for l in range(layers - 1)]
    weights = [expert_load[l, members[l]] for l in range(layers)]
    best, best_cost = None, math.inf
    for attempt in range(4):
        if attempt and time.perf_counter() > deadline:
            break
        sides = [torch.arange(size) >= on_a[l] if attempt == 0 else
                 torch.randperm(size, generator=generator) >= on_a[l] for l, size in enumerate(sizes)]
        for _ in range(MAX_SWEEPS):
            changed = False
            if time.perf_counter() > deadline:
                break
            for layer in itertools.chain(range(layers), reversed(range(layers))):
                pull = torch.zeros(sizes[layer], dtype=torch.float64)   # drawn to side b minus drawn to side a
                if layer > 0:
                    pull += sub[layer - 1].T @ (sides[layer - 1].double() * 2 - 1)
                if layer < layers - 1:
                    pull += sub[layer] @ (sides[layer + 1].double() * 2 - 1)
                new = _balanced_split(pull, weights[layer], on_a[layer], share, tolerance)
                if not torch.equal(new, sides[layer]):
                    changed = True
                    sides[layer] = new
            if not changed:
                break
        cost = sum(float((sub[l] * (sides[l][:, None] != sides[l + 1][None, :])).sum()) for l in range(layers - 1))
        if cost < best_cost:
            best, best_cost = [s.clone() for s in sides], cost
    return best


def _balanced_split(pull: torch.Tensor, load: torch.Tensor, on_a: int, share: float, tolerance: float) -> torch.Tensor:
    """Side b (True) for all but the `on_a` experts least drawn to it, with side a's load within `tolerance` of its
    share where a price on load can get it there: experts sorted by pull + price x load, the price found by
    bisection (the smallest that balances, so affinity gives way to balance only as far as it must)."""
    def split(price: float) -> torch.Tensor:
        order = torch.argsort(pull + price * load, stable=True)
        side = torch.ones(len(pull), dtype=torch.bool)
        side[order[:on_a]] = False
        return side

    def excess(side: torch.Tensor) -> float:
        """Side a's load over its share (positive: too heavy), relative to the share."""
        target = share * float(load.sum())
        return (float(load[~side].sum()) - target) / target if target else 0.0

    side = split(0.0)
    over = excess(side)
    if abs(over) <= tolerance:
        return side
    direction = 1.0 if over > 0 else -1.0    # side a too heavy: price load up, so heavy experts sort late (side b)
    low, high = 0.0, direction * 4 * (float(pull.abs().max()) + 1) / max(float(load[load > 0].min()) if (load > 0).any() else 1.0, 1e-9)
    best = split(high)
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        candidate = split(middle)
        still = excess(candidate) * direction   # > tolerance: not priced enough yet
        if abs(still) <= tolerance or abs(still) < abs(excess(best)):
            best = candidate
        if still > tolerance:
            low = middle
        else:
            high = middle
    return best if abs(excess(best)) < abs(over) else side
