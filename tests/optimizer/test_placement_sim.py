"""The expert-parallel traffic simulator: hand-counted trips and bytes, a per-token re-implementation of its
documented semantics on random traces, load imbalance, the replica choices, and the all-to-all time formula."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import PlanError
from ember.optimizer.cost import load_profile
from ember.optimizer.expert_placement import placement_from_lists
from ember.optimizer.moe_traces import RoutingTrace
from ember.ir.plans import home_ranks
from ember.optimizer.placement_sim import CAP_SLACK, _all_to_all_us, _cap_replicas, simulate

PROFILE = dataclasses.replace(load_profile("h200"), link_gbps=100.0, network_gbps=10.0, collective_latency_us=5.0)
"""Round bandwidths, so that hand-computed times read plainly."""

# 4 tokens, 2 layers, top-2 of 4 experts on 2 GPUs. Homes: tokens 0, 1 on GPU 0; 2, 3 on GPU 1.
HAND_EXPERTS = torch.tensor([[[0, 1], [0, 2]],
                             [[2, 0], [1, 3]],
                             [[3, 1], [2, 1]],
                             [[2, 3], [3, 0]]])
HAND_PLAN = [[0, 0, 1, 1],    # layer 0: experts 0, 1 on GPU 0; 2, 3 on GPU 1
             [0, 1, 0, 1]]    # layer 1: experts 0, 2 on GPU 0; 1, 3 on GPU 1
HAND_TRIPS = {
    # layer 0 (homes 0, 0, 1, 1; experts' GPUs [0, 0], [1, 0], [1, 0], [1, 1]): token 1 sends 0 -> 1, token 2
    # sends 1 -> 0. "stay": the next homes are the top-1 GPUs 0, 1, 1, 1, so tokens 1 and 2 combine 0 -> 1;
    # "return": token 1 combines 1 -> 0 and token 2 0 -> 1.
    # layer 1 ("stay" homes 0, 1, 1, 1; experts' GPUs [0, 0], [1, 1], [0, 1], [1, 0]): tokens 2 and 3 send
    # 1 -> 0; token 2 combines 1 -> 0 (its top-1 on GPU 0), token 3 0 -> 1. "return" (homes 0, 0, 1, 1): tokens
    # 1, 2, 3 dispatch one trip each and combine one each.
    "stay": [(2, 2), (2, 2)],
    "return": [(2, 2), (3, 3)],
}


def _trace(experts: torch.Tensor, num_experts: int, name: str = "trace") -> RoutingTrace:
    return RoutingTrace(name, experts, num_experts)


@pytest.mark.parametrize("mode", ["stay", "return"])
def test_hand_counted_trips_and_bytes(mode):
    plan = placement_from_lists(HAND_PLAN, 2)
    simulation = simulate(plan, _trace(HAND_EXPERTS, 4), PROFILE, hidden=8, element_bytes=2, mode=mode)
    assert [(layer.dispatch_trips, layer.combine_trips) for layer in simulation.layers] == HAND_TRIPS[mode]
    for layer, (dispatch, combine) in zip(simulation.layers, HAND_TRIPS[mode]):
        assert (layer.dispatch_bytes, layer.combine_bytes) == (16 * dispatch, 16 * combine)
        assert layer.cross_node_trips == 0            # 2 GPUs, one node
        assert layer.load_imbalance == pytest.approx(1.0)   # 4 (token, expert) pairs on each GPU
    trips = sum(dispatch + combine for dispatch, combine in HAND_TRIPS[mode])
    assert simulation.trips_per_token_layer == pytest.approx(trips / 8)
    assert simulation.total_bytes == 16 * trips
    assert simulation.top1_remote == pytest.approx(0.25)   # only token 2's top-1 moves, GPU 1 -> 0
    assert (simulation.tokens, simulation.k, simulation.gpus, simulation.mode) == (4, 2, 2, mode)
    assert simulation.method == "given" and simulation.trace == "trace"


def test_every_trip_crosses_nodes_with_one_gpu_per_node():
    plan = placement_from_lists(HAND_PLAN, 2, gpus_per_node=1)
    simulation = simulate(plan, _trace(HAND_EXPERTS, 4), PROFILE, mode="return")
    assert [layer.cross_node_trips for layer in simulation.layers] == [4, 6]
    assert simulation.cross_node_share == pytest.approx(1.0)


def test_hand_counted_all_to_all_time_over_the_link_and_the_network():
    """Layer 0 in "stay": GPU 0 sends 1 row and receives 1 at dispatch, and sends 2 rows at combine."""
    row_bytes = 4096 * 2
    for per_node, gbps in ((2, PROFILE.link_gbps), (1, PROFILE.network_gbps)):
        plan = placement_from_lists(HAND_PLAN, 2, gpus_per_node=per_node)
        first = simulate(plan, _trace(HAND_EXPERTS, 4), PROFILE, hidden=4096, element_bytes=2).layers[0]
        assert first.dispatch_us == pytest.approx(row_bytes / gbps / 1e3 + PROFILE.collective_latency_us)
        assert first.combine_us == pytest.approx(2 * row_bytes / gbps / 1e3 + PROFILE.collective_latency_us)
    assert first.combine_us == pytest.approx(6.6384)   # 16384 B at 10 GB/s is 1.6384 us, plus 5 us


def test_all_to_all_time_mixes_link_and_network_and_takes_the_slowest_gpu():
    node = torch.tensor([0, 0, 1, 1])
    sent = torch.zeros(4, 4, dtype=torch.float64)
    sent[0, 1] = 1000.0     # within node 0: link
    sent[0, 2] = 200.0      # node 0 -> node 1: network
    sent[3, 2] = 500.0      # within node 1
    sent[1, 2] = 300.0      # GPU 2 receives 200 + 300 over the network and 500 over the link
    send_0 = 1000.0 / 100.0 + 200.0 / 10.0            # ns
    receive_2 = 500.0 / 100.0 + (200.0 + 300.0) / 10.0
    expected = max(send_0, receive_2) / 1e3 + 5.0
    assert _all_to_all_us(sent, node, PROFILE) == pytest.approx(expected)
    assert _all_to_all_us(torch.zeros(4, 4, dtype=torch.float64), node, PROFILE) == pytest.approx(5.0)


def test_all_to_all_time_grows_with_bytes():
    plan = placement_from_lists(HAND_PLAN, 2)
    times = [simulate(plan, _trace(HAND_EXPERTS, 4), PROFILE, hidden=hidden).all_to_all_us for hidden in (256, 1024, 4096)]
    assert times[0] < times[1] < times[2]
    element = [simulate(plan, _trace(HAND_EXPERTS, 4), PROFILE, element_bytes=size).all_to_all_us for size in (1, 4)]
    assert element[0] < element[1]


def test_load_imbalance_is_the_busiest_gpu_over_the_mean():
    plan = placement_from_lists([[0, 0, 0, 1]], 2)       # experts 0-2 on GPU 0, 3 on GPU 1
    trace = _trace(torch.tensor([[[0, 1]], [[2, 3]], [[0, 3]]]), 4)
    layer, = simulate(plan, trace, PROFILE).layers
    assert layer.load_imbalance == pytest.approx(4 / 3)   # GPU 0 runs 4 pairs, GPU 1 runs 2
    two = placement_from_lists([[0, 0, 0, 1], [1, 0, 0, 0]], 2)
    trace = _trace(torch.tensor([[[0, 1], [0, 1]], [[2, 3], [2, 3]], [[0, 3], [1, 2]]]), 4)
    simulation = simulate(two, trace, PROFILE)   # layer 1: GPU 0 runs 1, 2, 3, 1, 2; GPU 1 runs 0
    assert [layer.load_imbalance for layer in simulation.layers] == pytest.approx([4 / 3, 5 / 3])
    assert simulation.load_imbalance == pytest.approx(1.5) and simulation.worst_load_imbalance == pytest.approx(5 / 3)


def test_homes_are_contiguous_chunks():
    assert home_ranks(4, 2).tolist() == [0, 0, 1, 1]
    assert home_ranks(5, 3).tolist() == [0, 0, 1, 1, 2]
    assert home_ranks(2, 4).tolist() == [0, 2]


def test_tokens_replays_a_prefix_of_the_trace():
    plan = placement_from_lists(HAND_PLAN, 2)
    trace = _trace(HAND_EXPERTS, 4)
    prefix = simulate(plan, trace, PROFILE, tokens=2)
    sliced = simulate(plan, _trace(HAND_EXPERTS[:2], 4), PROFILE)
    assert prefix.layers == sliced.layers and prefix.tokens == 2


# ---- a per-token re-implementation of the documented semantics -------------------------------------------------

def _brute(gpu_of: list[list[int]], experts: list, gpus: int, per_node: int, mode: str):
    """Per layer (dispatch trips, combine trips, cross-node trips, load max/mean) and the top-1 remote share, one
    token at a time: token t starts on GPU t * G // T, is sent from its home to every other GPU holding one of
    its experts, and each of those sends back to the next home (top-1's GPU in "stay", its own home in "return")."""
    tokens, layers = len(experts), len(experts[0])
    start = [t * gpus // tokens for t in range(tokens)]
    home, previous_top1, remote, result = list(start), None, 0, []
    for layer in range(layers):
        dispatch = combine = cross = 0
        load = [0] * gpus
        top1 = []
        for t in range(tokens):
            where = [gpu_of[layer][e] for e in experts[t][layer]]
            for gpu in where:
                load[gpu] += 1
            following = where[0] if mode == "stay" else start[t]
            for gpu in set(where):
                if gpu != home[t]:
                    dispatch += 1
                    cross += gpu // per_node != home[t] // per_node
                if gpu != following:
                    combine += 1
                    cross += gpu // per_node != following // per_node
            top1.append(where[0])
            home[t] = following
        if previous_top1 is not None:
            remote += sum(a != b for a, b in zip(top1, previous_top1))
        previous_top1 = top1
        result.append((dispatch, combine, cross, max(load) / (sum(load) / gpus)))
    return result, remote / (tokens * max(layers - 1, 1))


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 23), layers=st.integers(1, 4), num_experts=st.integers(2, 9), k=st.integers(1, 3),
       gpus=st.integers(1, 6), per_node=st.integers(1, 4), mode=st.sampled_from(["stay", "return"]),
       seed=st.integers(0, 2**16))
def test_simulator_agrees_with_a_per_token_replay(tokens, layers, num_experts, k, gpus, per_node, mode, seed):
    k = min(k, num_experts)
    generator = torch.Generator().manual_seed(seed)
    experts = torch.rand(tokens, layers, num_experts, generator=generator).argsort(-1)[..., :k]
    gpu_of = torch.randint(gpus, (layers, num_experts), generator=generator).tolist()
    plan = placement_from_lists(gpu_of, gpus, gpus_per_node=per_node)
    expected, remote = _brute(gpu_of, experts.tolist(), gpus, per_node, mode)
    for replica_choice in ("capped", "local", "spread"):   # without replicas the choice changes nothing
        simulation = simulate(plan, _trace(experts, num_experts), PROFILE, hidden=16, element_bytes=4, mode=mode,
                              replica_choice=replica_choice)
        got = [(layer.dispatch_trips, layer.combine_trips, layer.cross_node_trips, layer.load_imbalance)
               for layer in simulation.layers]
        assert [row[:3] for row in got] == [row[:3] for row in expected]
        assert [row[3] for row in got] == pytest.approx([row[3] for row in expected])
        assert simulation.top1_remote == pytest.approx(remote)
        assert [layer.dispatch_bytes for layer in simulation.layers] == [64 * row[0] for row in expected]
        assert [layer.combine_bytes for layer in simulation.layers] == [64 * row[1] for row in expected]


# ---- replicas --------------------------------------------------------------------------------------------------

# Layer 0 runs every token's only expert (0) on GPU 0, so in "stay" all 20 tokens arrive at layer 1 on GPU 0,
# whose expert 0 has replicas on GPUs 0 and 1.
FUNNEL_PLAN = [[0, 1, [0, 1]], [[0, 1], 1, 0]]
FUNNEL_TRACE = torch.zeros(20, 2, 1, dtype=torch.int64)


@pytest.mark.parametrize("choice, on_gpu_0", [("local", 20), ("spread", 10), ("capped", math.ceil(10 * (1 + CAP_SLACK)))])
def test_replica_choice_on_a_funnel(choice, on_gpu_0):
    plan = placement_from_lists(FUNNEL_PLAN, 2)
    simulation = simulate(plan, _trace(FUNNEL_TRACE, 3), PROFILE, replica_choice=choice)
    second = simulation.layers[1]
    assert second.load_imbalance == pytest.approx(on_gpu_0 / 10)
    assert second.dispatch_trips == 20 - on_gpu_0           # each token run on GPU 1 is sent there...
    assert second.combine_trips == 0                         # ...and stays there, with its only expert
    assert simulation.layers[0].dispatch_trips == 10         # tokens 10-19 start on GPU 1


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 40), k=st.integers(1, 3), gpus=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_capped_never_leaves_a_replica_over_its_cap(tokens, k, gpus, seed):
    num_experts = 4
    generator = torch.Generator().manual_seed(seed)
    gpus_of = [tuple(sorted(torch.randperm(gpus, generator=generator)[:int(torch.randint(1, gpus + 1, (1,),
                                                                                         generator=generator))]
                            .tolist())) for _ in range(num_experts)]
    chosen = torch.rand(tokens, num_experts, generator=generator).argsort(-1)[:, :k]
    skewed = torch.rand(tokens, k, generator=generator) < 0.8   # most pairs on each expert's first replica
    first = torch.tensor([gpus_of[e][0] for e in range(num_experts)])[chosen]
    anywhere = torch.tensor([[gpus_of[e][int(torch.randint(len(gpus_of[e]), (1,), generator=generator))]
                              for e in row] for row in chosen.tolist()]).reshape(tokens, k)
    gpu = torch.where(skewed, first, anywhere)
    capped = _cap_replicas(gpu, chosen, gpus_of)
    assert torch.equal(gpu, torch.where(skewed, first, anywhere))   # the input is left alone
    for expert, replicas in enumerate(gpus_of):
        mine = chosen == expert
        assert all(int(g) in replicas for g in capped[mine].tolist())
        if len(replicas) == 1:
            assert torch.equal(capped[mine], gpu[mine])
            continue
        cap = math.ceil(int(mine.sum()) / len(replicas) * (1 + CAP_SLACK))
        for replica in replicas:
            assert int((capped[mine] == replica).sum()) <= cap
            if int((gpu[mine] == replica).sum()) <= cap:   # a replica within its cap loses no tokens
                assert bool((capped[mine & (gpu == replica)] == replica).all())


def test_capped_replicas_stay_within_the_cap_in_a_simulation():
    """Replicas of expert 0 on GPUs 0 and 1; every token starts there or is funnelled there: the capped load of
    GPU 0 is what the cap allows, so the layer's imbalance equals cap / mean."""
    trace = torch.zeros(41, 2, 1, dtype=torch.int64)
    simulation = simulate(placement_from_lists(FUNNEL_PLAN, 2), _trace(trace, 3), PROFILE, replica_choice="capped")
    cap = math.ceil(41 / 2 * (1 + CAP_SLACK))
    assert simulation.layers[1].load_imbalance == pytest.approx(cap / (41 / 2))


# ---- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts, num_experts, message", [
    (torch.zeros(4, 3, 2, dtype=torch.int64), 4, "3 layers x 4 experts, the placement 2 x 4"),
    (torch.zeros(4, 2, 2, dtype=torch.int64), 5, "2 layers x 5 experts, the placement 2 x 4"),
    (torch.zeros(0, 2, 2, dtype=torch.int64), 4, "no tokens"),
])
def test_a_mismatched_trace_is_a_plan_error(experts, num_experts, message):
    with pytest.raises(PlanError, match=message):
        simulate(placement_from_lists(HAND_PLAN, 2), _trace(experts, num_experts), PROFILE)


@pytest.mark.parametrize("kwargs, message", [({"mode": "bounce"}, "unknown expert-parallel mode 'bounce'"),
                                             ({"replica_choice": "random"}, "unknown replica choice 'random'"),
                                             ({"tokens": 0}, "no tokens")])
def test_bad_simulation_options_are_plan_errors(kwargs, message):
    with pytest.raises(PlanError, match=message):
        simulate(placement_from_lists(HAND_PLAN, 2), _trace(HAND_EXPERTS, 4), PROFILE, **kwargs)
