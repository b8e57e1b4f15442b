"""Memory planning: place every intermediate buffer in one arena, and prove how close the plan is to optimal.

Heuristics (greedy-by-size, first-fit) give a plan in milliseconds; a search over canonical packings
tries the max-live lower bound itself, then capacities below the best packing; a MIP (pulp + HiGHS)
warm-started from the best packing improves the rest, and its bound, with the lower bound, proves the
gap. Time windows that no buffer crosses are planned apart.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pulp

from ..errors import PlanError
from ..ir.layout import ALIGNMENT
from ..progress import task
from ..units import format_bytes
from .intervals import lower_bound
from .memory_search import pack
from .memory_verify import overlapping_pair
from .mip import warm_solver

log = logging.getLogger(__name__)

METHODS = ("naive", "greedy", "mip")
MIP_MAX_PAIRS = 20_000
"""Above this many overlapping pairs in one window the MIP is not built: the search's best plan stands."""
SEARCH_SHARE = 0.9
"""Share of a window's time the search gets before the MIP (nearly all of it where the MIP is not built)."""
BOUND_SHARE = 0.3
"""Share of the search's time spent at the lower bound itself, where a packing proves itself optimal."""
PROBE_SHARE = 0.05
"""Share of the rest each capacity below the best packing is first searched for (doubled on each pass):
a capacity that packs usually packs in a fraction of a second, and one that does not can stall for
minutes (MiniMalloc's D packs at 0.992 and 0.998 of its capacity within 0.3 s, not at 1.004 in 3 s)."""
PROBE_RESOLUTION = 0.001
"""Capacities closer than this share of the lower bound to the best packing are not probed."""
MIP_SHARE_OF_REMAINING = 0.75
"""The solver's own limit as a share of the window's remaining time (it overshoots what it is given)."""


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Where each buffer lives. Buffer i occupies [offsets[i], offsets[i] + its aligned size).

    lower_bound: max over steps of live (aligned) bytes; no plan can beat it.
    status: "optimal" (proven), "feasible" (the solver stopped at its limit), or "heuristic".
    gap: (arena_bytes - best proven bound) / arena_bytes.
    """

    offsets: tuple[int, ...]
    arena_bytes: int
    lower_bound: int
    method: str
    status: str
    gap: float
    solve_seconds: float


@dataclass(frozen=True, slots=True)
class _Problem:
    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]


def plan_intervals(
    sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int], *, alignment: int = ALIGNMENT,
    time_limit: float = 10.0, method: str = "mip",
) -> MemoryPlan:
    """Return offsets so that buffers live at the same step never overlap.

    Buffer i is live on the closed step interval [starts[i], ends[i]]; sizes are rounded up to
    `alignment`, and offsets are multiples of it. `method` is "naive" (no reuse), "greedy" (the better
    of greedy-by-size and first-fit) or "mip" (greedy, then a search for a packing at the lower bound,
    then the MIP, all within `time_limit` seconds). A missing, failing or timed-out solver leaves the
    best plan found so far, with one warning, never an error.
    """
    started = time.perf_counter()
    problem = _checked(sizes, starts, ends, alignment, method)
    aligned = _Problem(tuple(_round_up(size, alignment) for size in problem.sizes), problem.starts, problem.ends)
    bound = lower_bound(aligned.sizes, aligned.starts, aligned.ends)
    if method == "naive":
        offsets = tuple(_prefix_sums(aligned.sizes))
        return _finish(aligned, offsets, bound, bound, "naive", "heuristic", started)
    offsets = [0] * len(aligned.sizes)
    proven = bound
    statuses = []
    deadline = started + time_limit
    windows = time_windows(aligned.starts, aligned.ends)
    unplanned = len(aligned.sizes)
    with task(f"planning memory: {len(aligned.sizes)} buffers", total=len(windows)) as update:
        for number, window in enumerate(windows, start=1):  # each gets its share, by buffers, of the time left
            window_deadline = time.perf_counter() + len(window) / unplanned * (deadline - time.perf_counter())
            unplanned -= len(window)
            sub = _Problem(*(tuple(values[i] for i in window) for values in (aligned.sizes, aligned.starts, aligned.ends)))

            def incumbent(best_bytes: int, bound_bytes: int, number: int = number) -> None:
                update(description=f"planning memory: window {number}/{len(windows)}, best {format_bytes(best_bytes)}, "
                                   f"bound {format_bytes(bound_bytes)}")

            sub_offsets, sub_bound, sub_status = _plan_window(sub, alignment, method, window_deadline, incumbent)
            for index, offset in zip(window, sub_offsets):
                offsets[index] = offset
            proven = max(proven, sub_bound)
            statuses.append(sub_status)
            update(advance=1)
    status = "optimal" if all(s == "optimal" for s in statuses) else "feasible" if "feasible" in statuses else "heuristic"
    return _finish(aligned, tuple(offsets), bound, proven, method, status, started)


def time_windows(starts: Sequence[int], ends: Sequence[int]) -> list[list[int]]:
    """Groups of buffers whose lifetimes chain together; no buffer of one group is live with another's."""
    order = sorted(range(len(starts)), key=lambda i: (starts[i], ends[i]))
    windows: list[list[int]] = []
    reach = -math.inf
    for index in order:
        if starts[index] > reach:
            windows.append([])
        windows[-1].append(index)
        reach = max(reach, ends[index])
    return windows


# ---------------------------------------------------------------------------------------------
# Heuristics

def greedy_by_size(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int]) -> list[int]:
    """TFLite's greedy-by-size: largest first, each into the tightest gap among buffers live with it."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], starts[i] - ends[i], i))
    return _place_in_order(order, sizes, starts, ends, best_fit=True)


def first_fit(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int]) -> list[int]:
    """In order of first use, each at the lowest offset that fits."""
    order = sorted(range(len(sizes)), key=lambda i: (starts[i], -sizes[i], i))
    return _place_in_order(order, sizes, starts, ends, best_fit=False)


def _place_in_order(order: Sequence[int], sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int],
                    *, best_fit: bool) -> list[int]:
    offsets = [0] * len(sizes)
    placed: list[int] = []
    for index in order:
        busy = sorted((offsets[j], offsets[j] + sizes[j]) for j in placed
                      if starts[j] <= ends[index] and starts[index] <= ends[j])
        best, best_slack, cursor = None, math.inf, 0
        for low, high in busy:
            if low - cursor >= sizes[index]:
                slack = low - cursor - sizes[index]
                if not best_fit:
                    best = cursor
                    break
                if slack < best_slack:
                    best, best_slack = cursor, slack
            cursor = max(cursor, high)
        offsets[index] = cursor if best is None else best
        placed.append(index)
    return offsets


def _arena(offsets: Sequence[int], sizes: Sequence[int]) -> int:
    return max((offset + size for offset, size in zip(offsets, sizes)), default=0)


# ---------------------------------------------------------------------------------------------
# One window: the best heuristic, the search, then the MIP

def _plan_window(problem: _Problem, alignment: int, method: str, deadline: float,
                 incumbent: Callable[[int, int], None] = lambda best_bytes, bound_bytes: None) -> tuple[list[int], int, str]:
    """(offsets, proven bound, status) of one time window; `incumbent(best, bound)` hears of each improvement."""
    sizes, starts, ends = problem.sizes, problem.starts, problem.ends
    bound = lower_bound(sizes, starts, ends)
    offsets = min((greedy_by_size(sizes, starts, ends), first_fit(sizes, starts, ends)), key=lambda o: _arena(o, sizes))
    if _arena(offsets, sizes) == bound:
        return offsets, bound, "optimal"
    if method != "mip":
        return offsets, bound, "heuristic"
    pairs = [(i, j) for i in range(len(sizes)) for j in range(i + 1, len(sizes))
             if starts[i] <= ends[j] and starts[j] <= ends[i]]
    with_mip = len(pairs) <= MIP_MAX_PAIRS
    search_s = (SEARCH_SHARE if with_mip else 0.99) * (deadline - time.perf_counter())  # 1%: what follows it
    incumbent(_arena(offsets, sizes), bound)
    searched, proven = _search_capacities(problem, offsets, bound, alignment, time.perf_counter() + search_s, incumbent)
    status = "heuristic" if searched is offsets else "feasible"
    if _arena(searched, sizes) <= proven:
        return searched, proven, "optimal"
    remaining = deadline - time.perf_counter()
    if not with_mip or remaining < 0.05:
        log.info("window of %d buffers (%d pairs) keeps its %s plan", len(sizes), len(pairs), status)
        return searched, proven, status
    incumbent(_arena(searched, sizes), proven)
    solved, mip_bound, mip_status = _solve_mip(problem, pairs, searched, alignment, remaining)
    proven = max(proven, mip_bound)
    incumbent(_arena(solved, sizes), proven)
    if _arena(solved, sizes) <= proven:
        return solved, proven, "optimal"
    return solved, proven, status if mip_status == "heuristic" else mip_status  # "heuristic": the MIP failed


def _search_capacities(problem: _Problem, offsets: list[int], bound: int, alignment: int, deadline: float,
                       incumbent: Callable[[int, int], None]) -> tuple[list[int], int]:
    """The tightest packing the search finds by `deadline` (`offsets` if none beats it), and a proven bound.

    The lower bound first, with BOUND_SHARE of the time; then passes over the capacities below the best
    packing so far. A pass tries just above the bound (where the search prunes hardest, and an instance
    whose optimum is a step above its bound packs fastest), then steps down from the best packing: the
    step doubles after each packing and halves after each miss, so a run of misses closes in on the best
    packing and ends the pass; the next pass gives each capacity twice the time. A capacity the search
    proves impossible raises the bound.
    """
    sizes, starts, ends = problem.sizes, problem.starts, problem.ends
    now = time.perf_counter()
    at_bound = pack(sizes, starts, ends, bound, now + BOUND_SHARE * (deadline - now))
    if at_bound.offsets is not None:
        return at_bound.offsets, bound
    low = bound // alignment + int(at_bound.impossible)  # in alignment units, as every arena is a multiple of it
    best = offsets
    probe_s = PROBE_SHARE * (deadline - time.perf_counter())
    resolution = max(1, int(PROBE_RESOLUTION * bound) // alignment)
    step = 0
    while (high := _arena(best, sizes) // alignment) > low and time.perf_counter() < deadline:
        if step < resolution:  # a new pass: first just above what is ruled out, then (after a miss) half-way
            capacity, step = min(high - 1, low + resolution), high - low
        else:
            capacity = max(low, high - step)
        probe = pack(sizes, starts, ends, capacity * alignment, min(deadline, time.perf_counter() + probe_s))
        if probe.offsets is not None:
            best = probe.offsets
            step = min(2 * step, max(1, (_arena(best, sizes) // alignment - low) // 2))
        elif probe.impossible:
            low = capacity + 1
        else:
            step //= 2
            if step < resolution:
                probe_s *= 2
        incumbent(_arena(best, sizes), low * alignment)
    return best, low * alignment


def _solve_mip(problem: _Problem, pairs: list[tuple[int, int]], start: list[int], alignment: int,
               time_limit: float) -> tuple[list[int], int, str]:
    """OLLA-style MIP: an offset per buffer (in alignment units), an ordering binary per overlapping pair."""
    started = time.perf_counter()
    sizes = problem.sizes
    upper = _arena(start, sizes)
    units = [size // alignment for size in sizes]
    top = upper // alignment
    model = pulp.LpProblem("arena", pulp.LpMinimize)
    arena = pulp.LpVariable("arena", lowBound=max(units), upBound=top, cat="Integer")
    slot = [pulp.LpVariable(f"o{i}", lowBound=0, upBound=top - units[i], cat="Integer") for i in range(len(sizes))]
    below = {(i, j): pulp.LpVariable(f"b{i}_{j}", cat="Binary") for i, j in pairs}
    model += arena
    for i, variable in enumerate(slot):
        model += variable + units[i] <= arena
    for (i, j), order in below.items():
        model += slot[i] + units[i] <= slot[j] + top * (1 - order)
        model += slot[j] + units[j] <= slot[i] + top * order
    model += arena >= lower_bound(sizes, problem.starts, problem.ends) // alignment
    values = {arena.name: top, **{slot[i].name: start[i] // alignment for i in range(len(sizes))}}
    values.update({below[(i, j)].name: 1 if start[i] + sizes[i] <= start[j] else 0 for i, j in pairs})
    # HiGHS runs past its limit (39.7 s for a 29.9 s limit on MiniMalloc's D, building included), so it
    # gets three quarters of what is left.
    solver = warm_solver(values, model, max(0.05, MIP_SHARE_OF_REMAINING * (time_limit - (time.perf_counter() - started))))
    try:
        model.solve(solver)
    except pulp.PulpSolverError as error:
        log.warning("the MIP solver failed (%s); keeping the heuristic plan", error)
        return start, lower_bound(sizes, problem.starts, problem.ends), "heuristic"
    solved = [int(round(variable.value() or 0)) * alignment for variable in slot] if model.sol_status > 0 else start
    if _arena(solved, sizes) > upper or not _disjoint(solved, problem):
        solved = start
    bound = max(lower_bound(sizes, problem.starts, problem.ends), _proven_bound(solver, model, alignment))
    optimal = model.sol_status == pulp.LpSolutionOptimal or _arena(solved, sizes) <= bound
    return solved, bound, "optimal" if optimal else "feasible"


def _proven_bound(solver: pulp.LpSolver, model: pulp.LpProblem, alignment: int) -> int:
    """The solver's best bound on the arena, in bytes (0 when it reports none)."""
    highs = getattr(model, "solverModel", None)
    if highs is None:
        return 0
    bound = highs.getInfo().mip_dual_bound
    return int(math.ceil(bound - 1e-6)) * alignment if math.isfinite(bound) else 0


def _disjoint(offsets: Sequence[int], problem: _Problem) -> bool:
    return overlapping_pair(problem.sizes, problem.starts, problem.ends, offsets) is None


# ---------------------------------------------------------------------------------------------
# Plumbing

def _checked(sizes, starts, ends, alignment, method) -> _Problem:
    if method not in METHODS:
        raise PlanError(f"unknown planning method {method!r}; use one of {', '.join(METHODS)}")
    if not (len(sizes) == len(starts) == len(ends)):
        raise PlanError(f"sizes, starts and ends differ in length ({len(sizes)}, {len(starts)}, {len(ends)})")
    if alignment < 1:
        raise PlanError(f"alignment must be at least 1, got {alignment}")
    for i, (size, start, end) in enumerate(zip(sizes, starts, ends)):
        if size < 0 or start > end:
            raise PlanError(f"buffer {i}: size {size} live on [{start}, {end}] is not a buffer")
    return _Problem(tuple(int(s) for s in sizes), tuple(int(s) for s in starts), tuple(int(e) for e in ends))


def _round_up(size: int, alignment: int) -> int:
    return -(-size // alignment) * alignment


def _prefix_sums(sizes: Sequence[int]) -> list[int]:
    offsets, running = [], 0
    for size in sizes:
        offsets.append(running)
        running += size
    return offsets


def _finish(problem: _Problem, offsets: tuple[int, ...], bound: int, proven: int, method: str, status: str,
            started: float) -> MemoryPlan:
    arena = _arena(offsets, problem.sizes)
    proven = max(bound, min(proven, arena))
    if arena == proven:
        status = "optimal"
    gap = (arena - proven) / arena if arena else 0.0
    return MemoryPlan(offsets, arena, bound, method, status, gap, time.perf_counter() - started)
