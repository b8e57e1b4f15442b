"""The simulator predicts what the expert-parallel runtime sends: a plan fitted by ember, replayed on two gloo
processes, sends per layer exactly the rows and bytes the simulator counts, in both modes, and the planned
placement sends fewer than the contiguous one on held-out tokens."""
from __future__ import annotations

import multiprocessing
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from ember.optimizer.cost import load_profile
from ember.optimizer.expert_placement import plan_placement
from ember.optimizer.moe_traces import synthetic_trace
from ember.optimizer.placement_sim import simulate
from ember.runtime.expert_parallel import MoEConfig, build_expert_parallel, ep_forward, home_tokens

WORLD = 2
CONFIG = MoEConfig(hidden=12, ffn=20, experts=6, layers=4, k=2)
TOKENS = 53


def traces():
    """A fitting and a held-out token sample of one synthetic model with strong inter-layer affinity."""
    fit = synthetic_trace(CONFIG.experts, CONFIG.layers, CONFIG.k, 400, 0.9, seed=3, sample_seed=1, name="fit")
    held_out = synthetic_trace(CONFIG.experts, CONFIG.layers, CONFIG.k, TOKENS, 0.9, seed=3, sample_seed=2,
                               name="held-out")
    return fit, held_out


def plans():
    fit, _ = traces()
    return {method: plan_placement([fit], WORLD, method=method, time_limit_s=5)
            for method in ("contiguous", "descent")}


def _worker(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    _, held_out = traces()
    hidden = torch.randn(TOKENS, CONFIG.hidden, generator=torch.Generator().manual_seed(0))
    results = {}
    for name, plan in plans().items():
        placement = [[gpus[0] for gpus in layer] for layer in plan.gpus_of]
        model = build_expert_parallel(CONFIG, placement, seed=0)
        for mode in ("stay", "return"):
            output = ep_forward(model, hidden[home_tokens(TOKENS, WORLD, rank)], TOKENS, held_out.experts, mode=mode)
            results[name, mode] = output.stats
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp("placement_runtime") / "stats.pt")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(rank, port, path)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    for process in processes:
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in processes] == [0, 0], "an expert-parallel worker failed or hung"
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("mode", ["stay", "return"])
@pytest.mark.parametrize("method", ["contiguous", "descent"])
def test_simulator_counts_what_the_runtime_sends(measured, method, mode):
    _, held_out = traces()
    simulated = simulate(plans()[method], held_out, load_profile("h200"), hidden=CONFIG.hidden, element_bytes=4,
                         mode=mode)
    stats = measured[method, mode]
    assert [sum(layer.dispatch_tokens) for layer in stats.layers] == [layer.dispatch_trips for layer in simulated.layers]
    assert [sum(layer.combine_tokens) for layer in stats.layers] == [layer.combine_trips for layer in simulated.layers]
    assert [sum(layer.dispatch_bytes) + sum(layer.combine_bytes) for layer in stats.layers] == [
        layer.dispatch_bytes + layer.combine_bytes for layer in simulated.layers]


def test_planned_placement_sends_less_than_contiguous_on_held_out_tokens(measured):
    sent = {method: sum(sum(layer.dispatch_tokens) + sum(layer.combine_tokens) for layer in measured[method, "stay"].layers)
            for method in ("contiguous", "descent")}
    assert sent["descent"] < sent["contiguous"]
