"""Expert-parallel MoE over two gloo processes: same result as the one-device stack, token trips counted right."""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ember.errors import InputError, PlanError
from ember.runtime.expert_parallel import (
    MoEConfig, MoEStack, build_expert_parallel, check_placement, ep_forward, gather_hidden, home_tokens,
    measure_steps, median_stats, reference_error)
from ember.tolerance import result_tolerance

CONFIG = MoEConfig(hidden=16, ffn=24, experts=4, layers=3, k=2)
TOKENS = 37
WORLD = 2
SEED = 5
PLACEMENTS = {
    "contiguous": [[0, 0, 1, 1]] * 3,
    "scrambled": [[1, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]],   # uneven, and rank 1 holds nothing at layer 2
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def forced_routing() -> torch.Tensor:
    """Distinct random experts per token and layer, [tokens, layers, k]."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.rand(TOKENS, CONFIG.layers, CONFIG.experts, generator=generator).argsort(-1)[..., :CONFIG.k]


def affine_routing() -> torch.Tensor:
    """Each token uses experts (0, 1) or (3, 2) at every layer, [tokens, layers, k]."""
    pairs = torch.tensor([[0, 1], [3, 2]])[torch.randint(2, (TOKENS,), generator=torch.Generator().manual_seed(SEED))]
    return pairs[:, None, :].expand(TOKENS, CONFIG.layers, CONFIG.k).contiguous()


def random_hidden(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(TOKENS, CONFIG.hidden, generator=torch.Generator().manual_seed(SEED)).to(dtype)


def scenarios() -> list[tuple[str, str, str, bool]]:
    """(placement, mode, dtype, forced routing): every placement and mode in float32 with both routings, float64
    with the router's, bfloat16 forced (a near tie in bfloat16 may pick other experts than the reference)."""
    cases = []
    for placement in PLACEMENTS:
        for mode in ("return", "stay"):
            cases += [(placement, mode, "float32", True), (placement, mode, "float32", False),
                      (placement, mode, "float64", False), (placement, mode, "bfloat16", True)]
    return cases


def _worker(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    results = {}
    for case in scenarios():
        placement, mode, dtype, forced = case
        model = build_expert_parallel(CONFIG, PLACEMENTS[placement], seed=SEED, dtype=DTYPES[dtype])
        routing = forced_routing() if forced else None
        output = ep_forward(model, random_hidden(DTYPES[dtype])[home_tokens(TOKENS, WORLD, rank)], TOKENS,
                            routing, mode=mode)
        results[case] = (gather_hidden(model, output, TOKENS), output.stats)
    model = build_expert_parallel(CONFIG, PLACEMENTS["contiguous"], seed=SEED)
    for mode in ("stay", "return"):
        output = ep_forward(model, random_hidden(torch.float32)[home_tokens(TOKENS, WORLD, rank)], TOKENS,
                            affine_routing(), mode=mode)
        results["affine", mode] = (gather_hidden(model, output, TOKENS), output.stats)
    model = build_expert_parallel(CONFIG, PLACEMENTS["scrambled"], seed=SEED)
    chunk = random_hidden(torch.float32)[home_tokens(TOKENS, WORLD, rank)]
    results["measured"] = median_stats(measure_steps(model, chunk, TOKENS, forced_routing(), mode="stay",
                                                     warmup=1, repeats=3))
    results["reference_error"] = reference_error(CONFIG, PLACEMENTS["scrambled"], TOKENS, mode="stay", seed=SEED)
    try:
        ep_forward(model, chunk, TOKENS, forced_routing()[:, :2], mode="stay")
    except InputError as error:
        results["routing_error"] = str(error)
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict:
    """What rank 0 saw, for every scenario, from one launch of two gloo processes."""
    path = str(tmp_path_factory.mktemp("expert_parallel") / "results.pt")
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, port, path)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    hung = [process for process in processes if process.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, "the expert-parallel workers hung"
    assert [process.exitcode for process in processes] == [0, 0], "an expert-parallel worker failed"
    return torch.load(path, weights_only=False)


def brute_force_trips(placement: list[list[int]], routing: torch.Tensor, mode: str) -> list[tuple[list[int], list[int]]]:
    """Per layer, (dispatch rows sent by each rank, combine rows sent by each rank), token by token."""
    tokens = routing.shape[0]
    trips = [([0] * WORLD, [0] * WORLD) for _ in range(routing.shape[1])]
    for token in range(tokens):
        home = token * WORLD // tokens
        for layer, chosen in enumerate(routing[token].tolist()):
            holders = {placement[layer][expert] for expert in chosen}
            trips[layer][0][home] += len(holders - {home})
            next_home = home if mode == "return" else placement[layer][chosen[0]]
            for holder in holders - {next_home}:
                trips[layer][1][holder] += 1
            home = next_home
    return trips


@pytest.mark.parametrize("case", scenarios(), ids=lambda case: "-".join(str(part) for part in case))
def test_expert_parallel_matches_one_device_stack(ran, case):
    placement, mode, dtype, forced = case
    with torch.no_grad():
        expected = MoEStack(CONFIG, seed=SEED, dtype=DTYPES[dtype])(random_hidden(DTYPES[dtype]),
                                                                     forced_routing() if forced else None)
    actual, _ = ran[case]
    error = float((actual.double() - expected.double()).abs().max())
    assert error <= result_tolerance(expected), f"{case}: max error {error}"


@pytest.mark.parametrize("case", [case for case in scenarios() if case[2] != "bfloat16"],
                         ids=lambda case: "-".join(str(part) for part in case))
def test_counted_trips_match_a_token_by_token_count(ran, case):
    placement, mode, dtype, forced = case
    routing = forced_routing()
    if not forced:
        with torch.no_grad():
            _, routing = MoEStack(CONFIG, seed=SEED, dtype=DTYPES[dtype]).forward_with_routing(random_hidden(DTYPES[dtype]))
    stats = ran[case][1]
    row_bytes = CONFIG.hidden * DTYPES[dtype].itemsize
    counted = [(list(layer.dispatch_tokens), list(layer.combine_tokens)) for layer in stats.layers]
    assert counted == brute_force_trips(PLACEMENTS[placement], routing, mode)
    assert all(layer.dispatch_bytes == tuple(n * row_bytes for n in layer.dispatch_tokens)
               and layer.combine_bytes == tuple(n * row_bytes for n in layer.combine_tokens) for layer in stats.layers)


def test_staying_tokens_stop_travelling_when_their_experts_share_a_rank(ran):
    """Every token keeps experts {0, 1} or {2, 3} (one rank's) at every layer: "stay" moves the tokens homed
    elsewhere once, at the first dispatch; "return" moves them there and back at every layer."""
    away = sum(token * WORLD // TOKENS != PLACEMENTS["contiguous"][0][int(experts[0])]
               for token, experts in enumerate(affine_routing()[:, 0]))
    stay, back = ran["affine", "stay"][1], ran["affine", "return"][1]
    assert away > 0
    assert [(sum(l.dispatch_tokens), sum(l.combine_tokens)) for l in stay.layers] == [(away, 0), (0, 0), (0, 0)]
    assert [(sum(l.dispatch_tokens), sum(l.combine_tokens)) for l in back.layers] == [(away, away)] * 3
    with torch.no_grad():
        expected = MoEStack(CONFIG, seed=SEED)(random_hidden(torch.float32), affine_routing())
    for mode in ("stay", "return"):
        assert float((ran["affine", mode][0] - expected).abs().max()) <= result_tolerance(expected)


def test_measured_steps_record_times_and_traffic(ran):
    measured = ran["measured"]
    assert measured.mode == "stay" and measured.world == WORLD and len(measured.layers) == CONFIG.layers
    assert measured.step_s > 0 and all(layer.layer_s >= layer.dispatch_s > 0 for layer in measured.layers)
    counted = [(list(layer.dispatch_tokens), list(layer.combine_tokens)) for layer in measured.layers]
    assert counted == brute_force_trips(PLACEMENTS["scrambled"], forced_routing(), "stay")


def test_reference_check_passes(ran):
    error, allowed = ran["reference_error"]
    assert error <= allowed


def test_wrong_routing_shape_is_an_input_error(ran):
    assert "[tokens, layers, k]" in ran["routing_error"]


@pytest.mark.parametrize("placement, says", [
    ([[0, 0, 1, 1]] * 2, "3 layers of 4 experts"),
    ([[0, 0, 1, 1], [0, 0, 1], [0, 0, 1, 1]], "3 layers of 4 experts"),
    ([[0, 0, 1, 2]] * 3, "outside the world of 2 ranks"),
    ([[0, -1, 1, 1]] * 3, "placed nowhere"),
    ([[0, None, 1, 1]] * 3, "placed nowhere"),
])
def test_bad_placement_is_a_plan_error(placement, says):
    with pytest.raises(PlanError, match=says):
        check_placement(placement, CONFIG, WORLD)


def test_home_tokens_are_contiguous_chunks_covering_every_token():
    chunks = [home_tokens(TOKENS, WORLD, rank) for rank in range(WORLD)]
    assert torch.equal(torch.cat(chunks), torch.arange(TOKENS))
    assert all(int(token) * WORLD // TOKENS == rank for rank, chunk in enumerate(chunks) for token in chunk)


@pytest.fixture
def bench(monkeypatch):
    """bench/placement_gpu.py as a module (its CPU-only pieces: reading the inputs, summing a step)."""
    bench_dir = Path(__file__).resolve().parents[2] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("placement_gpu", bench_dir / "placement_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_summary_totals_the_measured_step(ran, bench):
    summary = bench.summary(ran["measured"])
    trips = brute_force_trips(PLACEMENTS["scrambled"], forced_routing(), "stay")
    row_bytes = CONFIG.hidden * 4
    assert summary["dispatch_tokens"] == sum(sum(dispatch) for dispatch, _ in trips)
    assert summary["combine_tokens"] == sum(sum(combine) for _, combine in trips)
    assert summary["bytes_per_rank"] == [row_bytes * sum(d[rank] + c[rank] for d, c in trips) for rank in range(WORLD)]
    assert summary["step_ms"] > 0 and len(summary["layers"]) == CONFIG.layers


def test_bench_reads_placements_and_routing_cut_to_the_layers_asked(tmp_path, bench):
    (tmp_path / "placements.json").write_text(json.dumps(PLACEMENTS))
    save_file({"experts": forced_routing().contiguous()}, str(tmp_path / "routing.safetensors"))
    args = argparse.Namespace(placements=str(tmp_path / "placements.json"), routing=str(tmp_path / "routing.safetensors"),
                              tokens=11, layers=2)
    placements, routing = bench.load_inputs(args)
    assert placements == {name: placement[:2] for name, placement in PLACEMENTS.items()}
    assert torch.equal(routing, forced_routing()[:11, :2])
