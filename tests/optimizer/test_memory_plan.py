"""Memory planning: every plan passes the independent verifier; MIP ≤ greedy ≤ naive; hand-checked optima."""
from __future__ import annotations

import csv
import logging
import pathlib

import pulp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import PlanError
from ember.optimizer import memory_plan, mip
from ember.optimizer.intervals import live_per_step, lower_bound
from ember.optimizer.memory_plan import MemoryPlan, greedy_by_size, plan_intervals, time_windows
from ember.optimizer.memory_search import Packing, fits
from ember.optimizer.memory_verify import verify_plan

MINIMALLOC = pathlib.Path(__file__).parents[3] / "shared" / "data" / "minimalloc"


@st.composite
def interval_sets(draw, max_buffers: int = 10):
    count = draw(st.integers(1, max_buffers))
    starts = draw(st.lists(st.integers(0, 12), min_size=count, max_size=count))
    lengths = draw(st.lists(st.integers(0, 6), min_size=count, max_size=count))
    sizes = draw(st.lists(st.integers(1, 9000), min_size=count, max_size=count))
    return sizes, starts, [s + length for s, length in zip(starts, lengths)]


@settings(max_examples=40, deadline=None)
@given(interval_sets())
def test_every_plan_is_valid_and_mip_beats_greedy_beats_naive(problem):
    sizes, starts, ends = problem
    plans = {method: plan_intervals(sizes, starts, ends, method=method, time_limit=5) for method in ("naive", "greedy", "mip")}
    for plan in plans.values():
        verify_plan(plan, sizes, starts, ends)
        assert plan.arena_bytes >= plan.lower_bound == lower_bound([-(-s // 256) * 256 for s in sizes], starts, ends)
        assert 0 <= plan.gap <= 1
    assert plans["mip"].arena_bytes <= plans["greedy"].arena_bytes <= plans["naive"].arena_bytes


def test_small_cases_with_known_optima():
    # Two buffers live together stack; apart, they share.
    assert plan_intervals([512, 256], [0, 1], [2, 3]).arena_bytes == 768
    assert plan_intervals([512, 256], [0, 3], [2, 5]).arena_bytes == 512
    # At step 4 buffers 0, 2 and 3 are live: 2 + 2 + 3 = 7 units. Both heuristics strand a hole and need 8;
    # the optimum stacks buffer 3 on buffer 1's old place and reaches 7.
    sizes, starts, ends = [2, 3, 2, 3], [4, 2, 4, 3], [6, 3, 5, 4]
    assert lower_bound(sizes, starts, ends) == 7
    assert max(o + s for o, s in zip(greedy_by_size(sizes, starts, ends), sizes)) == 8
    assert plan_intervals([256 * s for s in sizes], starts, ends, method="greedy").arena_bytes == 8 * 256
    plan = plan_intervals([256 * s for s in sizes], starts, ends, method="mip")
    assert (plan.arena_bytes, plan.status, plan.gap) == (7 * 256, "optimal", 0.0)


def test_sizes_are_aligned_and_offsets_are_multiples_of_the_alignment():
    plan = plan_intervals([1, 300, 700], [0, 0, 1], [1, 2, 2], alignment=512)
    assert all(offset % 512 == 0 for offset in plan.offsets)
    assert plan.lower_bound == 512 + 512 + 1024


def test_disjoint_time_windows_are_planned_apart():
    assert time_windows([0, 1, 5, 6, 9], [2, 3, 7, 6, 9]) == [[0, 1], [2, 3], [4]]
    plan = plan_intervals([256, 256, 512, 256, 1024], [0, 1, 5, 6, 9], [2, 3, 7, 6, 9])
    assert plan.arena_bytes == 1024 and plan.offsets[4] == 0


def test_the_verifier_catches_broken_plans():
    sizes, starts, ends = [256, 256], [0, 1], [2, 3]
    good = plan_intervals(sizes, starts, ends)
    verify_plan(good, sizes, starts, ends)
    broken = {
        "overlap": MemoryPlan((0, 0), 512, 512, "x", "heuristic", 0.0, 0.0),
        "not a non-negative multiple": MemoryPlan((0, 100), 512, 512, "x", "heuristic", 0.0, 0.0),
        "ends past the arena": MemoryPlan((0, 256), 256, 256, "x", "heuristic", 0.0, 0.0),
        "places 1 buffers": MemoryPlan((0,), 512, 512, "x", "heuristic", 0.0, 0.0),
    }
    for message, plan in broken.items():
        with pytest.raises(PlanError, match=message):
            verify_plan(plan, sizes, starts, ends)


@pytest.mark.parametrize(
    "args, message",
    [
        (([1, 2], [0], [1]), "differ in length"),
        (([-1], [0], [1]), "is not a buffer"),
        (([1], [3], [1]), "is not a buffer"),
    ],
)
def test_bad_input_is_a_plan_error(args, message):
    with pytest.raises(PlanError, match=message):
        plan_intervals(*args)
    with pytest.raises(PlanError, match="unknown planning method 'lp'"):
        plan_intervals([1], [0], [0], method="lp")


def test_a_failing_solver_leaves_the_heuristic_plan_and_one_warning(monkeypatch, caplog):
    def broken(self, lp):
        raise pulp.PulpSolverError("solver exploded")

    monkeypatch.setattr(mip._WarmHiGHS, "actualSolve", broken)
    monkeypatch.setattr(memory_plan, "pack", lambda *args: Packing(None, False))
    sizes, starts, ends = [2 * 256, 3 * 256, 2 * 256, 3 * 256], [4, 2, 4, 3], [6, 3, 5, 4]
    with caplog.at_level(logging.WARNING, logger="ember"):  # the search, finding nothing, takes all its share
        plan = plan_intervals(sizes, starts, ends, method="mip", time_limit=1)
    verify_plan(plan, sizes, starts, ends)
    assert plan.status == "heuristic" and plan.arena_bytes == 8 * 256
    assert sum("keeping the heuristic plan" in r.getMessage() for r in caplog.records) == 1


def test_no_time_left_for_the_solver_means_the_heuristic_plan(monkeypatch):
    monkeypatch.setattr(memory_plan, "pack", lambda *args: Packing(None, False))  # the search finds nothing either
    sizes, starts, ends = [2 * 256, 3 * 256, 2 * 256, 3 * 256], [4, 2, 4, 3], [6, 3, 5, 4]
    plan = plan_intervals(sizes, starts, ends, method="mip", time_limit=0)
    verify_plan(plan, sizes, starts, ends)
    assert plan.status == "heuristic" and plan.gap > 0


def _minimalloc(name: str):
    rows = list(csv.DictReader(open(MINIMALLOC / name)))
    return [int(r["size"]) for r in rows], [int(r["lower"]) for r in rows], [int(r["upper"]) - 1 for r in rows]


@pytest.mark.skipif(not MINIMALLOC.exists(), reason="shared/data/minimalloc is beside the checkout in CI")
def test_a_hard_minimalloc_instance_packs_perfectly():
    """MiniMalloc's challenging instance B: greedy needs 1.35x the capacity; the search packs it exactly."""
    sizes, starts, ends = _minimalloc("B.1048576.csv")
    plan = plan_intervals(sizes, starts, ends, alignment=1, method="mip", time_limit=20)
    verify_plan(plan, sizes, starts, ends, alignment=1)
    assert plan.arena_bytes == 1048576 and plan.status == "optimal"
    assert plan_intervals(sizes, starts, ends, alignment=1, method="greedy").arena_bytes > 1.3 * 1048576


@settings(max_examples=30, deadline=None)
@given(interval_sets(max_buffers=8), st.integers(0, 2))
def test_search_packings_are_valid_and_never_below_the_lower_bound(problem, extra_units):
    sizes, starts, ends = problem
    bound = lower_bound(sizes, starts, ends)
    import time

    packed = fits(sizes, starts, ends, bound + extra_units, time.perf_counter() + 5)
    if packed is not None:
        plan = MemoryPlan(tuple(packed), bound + extra_units, bound, "search", "optimal", 0.0, 0.0)
        verify_plan(plan, sizes, starts, ends, alignment=1)
    assert fits(sizes, starts, ends, bound - 1, time.perf_counter() + 5) is None


def test_search_is_complete_where_the_mip_proves_the_optimum():
    """Six buffers whose optimum (3, the lower bound) needs section [3, 4) left empty while [4, 5) at the same
    height takes the long buffer first."""
    import time

    sizes, starts, ends = [1, 1, 2, 1, 1, 1], [4, 0, 6, 0, 0, 3], [6, 0, 6, 0, 0, 4]
    optimum = plan_intervals(sizes, starts, ends, alignment=1, method="mip", time_limit=5)
    assert (optimum.arena_bytes, optimum.status) == (3, "optimal")
    packed = fits(sizes, starts, ends, 3, time.perf_counter() + 5)
    assert packed is not None
    verify_plan(MemoryPlan(tuple(packed), 3, 3, "search", "optimal", 0.0, 0.0), sizes, starts, ends, alignment=1)


def test_search_packs_independent_pieces_apart(monkeypatch):
    """Ten copies of the four buffers above (optimum 7, greedy 8) one after another, under one long buffer: once
    the long one is placed no unplaced buffer crosses from one copy to the next, and each copy is searched alone."""
    import time

    from ember.optimizer import memory_search

    sizes, starts, ends = [1], [0], [60]
    for copy in range(10):
        sizes += [2, 3, 2, 3]
        starts += [4 + 5 * copy, 2 + 5 * copy, 4 + 5 * copy, 3 + 5 * copy]
        ends += [6 + 5 * copy, 3 + 5 * copy, 5 + 5 * copy, 4 + 5 * copy]
    parts = []
    ranks = memory_search._ranks
    monkeypatch.setattr(memory_search, "_ranks", lambda part, *args: parts.append(len(part)) or ranks(part, *args))
    packed = fits(sizes, starts, ends, 8, time.perf_counter() + 5)
    assert packed is not None and lower_bound(sizes, starts, ends) == 8
    verify_plan(MemoryPlan(tuple(packed), 8, 8, "search", "optimal", 0.0, 0.0), sizes, starts, ends, alignment=1)
    assert parts[0] == 41 and parts.count(4) >= 10
    assert fits(sizes, starts, ends, 7, time.perf_counter() + 5) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 5), min_size=n, max_size=n),
    st.lists(st.integers(0, 8), min_size=n, max_size=n),
    st.lists(st.integers(0, 4), min_size=n, max_size=n))))
def test_search_finds_a_packing_at_every_optimum_the_mip_proves(problem):
    """Completeness: wherever the MIP alone proves an optimum, the search packs at exactly that size."""
    import time

    sizes, starts, lengths = problem
    ends = [start + length for start, length in zip(starts, lengths)]
    pairs = [(i, j) for i in range(len(sizes)) for j in range(i + 1, len(sizes))
             if starts[i] <= ends[j] and starts[j] <= ends[i]]
    _, optimum, status = memory_plan._solve_mip(memory_plan._Problem(sizes, starts, ends),
                                                pairs, greedy_by_size(sizes, starts, ends), 1, 5.0)
    assert status == "optimal"
    packed = fits(sizes, starts, ends, optimum, time.perf_counter() + 5)
    assert packed is not None
    verify_plan(MemoryPlan(tuple(packed), optimum, optimum, "search", "optimal", 0.0, 0.0), sizes, starts, ends,
                alignment=1)
    assert fits(sizes, starts, ends, optimum - 1, time.perf_counter() + 5) is None


def test_live_bytes_are_swept_once_with_sizes_rounded_and_steps_cut():
    sizes, starts, ends = [100, 300, 50], [0, 1, 3], [2, 1, 5]
    assert live_per_step(sizes, starts, ends).tolist() == [100, 400, 100, 50, 50, 50]
    assert live_per_step(sizes, starts, ends, steps=4, alignment=256).tolist() == [256, 768, 256, 256]
    assert lower_bound(sizes, starts, ends) == 400 and lower_bound([], [], []) == 0
