"""Expert placement on GPUs: the real all-to-all traffic and time of MoE layers spread over ranks, per placement.

For each placement, mode "stay" (ExFlow: a token's next home is its top-1 expert's rank), and "return" for the
contiguous one as the classic reference, it replays a recorded routing trace through Mixtral-size experts (random
weights, seeded, made on the GPUs) and records per layer the rows and bytes each rank sent, the all-to-all,
expert and layer times (medians of `--repeats` steps after `--warmup`). At startup a small stack (hidden 256)
is checked against the one-device reference on the GPUs, each placement and mode, and the result recorded.
--device cpu runs the ranks as CPU processes over gloo instead (any number of them, no GPU): the rows and bytes
sent are the same as on GPUs, so the simulator's byte counts can be checked at 8 ranks where no 8-GPU machine is
lent; its times are the CPU's and say nothing of a GPU's.
Usage: torchrun --nproc-per-node 2 bench/placement_gpu.py --placements P.json --routing R.safetensors
       --out OUT.json [--hidden 4096 --ffn 14336 --dtype bfloat16 --tokens 4096 --layers L --warmup 5 --repeats 30]
       [--device cpu]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ember.runtime.expert_parallel import (
    MoEConfig, StepStats, build_expert_parallel, home_tokens, measure_steps, median_stats, reference_error)

from common import environment

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CHECK_HIDDEN, CHECK_FFN, CHECK_LAYERS, CHECK_TOKENS = 256, 512, 4, 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--placements", required=True, help="JSON object {name: placement[layer][expert] = rank}")
    parser.add_argument("--routing", required=True, help="safetensors with int64 'experts' [tokens, layers, k]")
    parser.add_argument("--out", required=True, help="the JSON file rank 0 writes")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=None, help="the first LAYERS layers (default: all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: CPU processes over gloo (bytes as on GPUs, times not)")
    return parser.parse_args()


def load_inputs(args: argparse.Namespace) -> tuple[dict[str, list[list[int]]], torch.Tensor]:
    """(placements cut to the layers benchmarked, routing int64 [tokens, layers, k] cut alike)."""
    placements = json.loads(Path(args.placements).read_text())
    routing = load_file(args.routing)["experts"].long()
    layers = args.layers or min(len(placement) for placement in placements.values())
    if routing.shape[1] < layers:
        raise SystemExit(f"{args.routing} routes {routing.shape[1]} layers; {layers} are asked for")
    if routing.shape[0] < args.tokens:
        raise SystemExit(f"{args.routing} holds {routing.shape[0]} tokens; --tokens {args.tokens} asks for more")
    return ({name: placement[:layers] for name, placement in placements.items()},
            routing[:args.tokens, :layers].contiguous())


def check_small(placements: dict[str, list[list[int]]], routing: torch.Tensor, device: torch.device,
                dtype: torch.dtype, seed: int) -> list[dict]:
    """Expert parallel against the one-device stack at hidden 256 on the ranks' devices: float32 with the router's
    own routing, `dtype` with the trace's."""
    checks = []
    layers = min(CHECK_LAYERS, routing.shape[1])
    for name, placement in placements.items():
        config = MoEConfig(CHECK_HIDDEN, CHECK_FFN, len(placement[0]), layers, routing.shape[2])
        for mode in ("stay", "return"):
            for check_dtype, forced in ((torch.float32, None), (dtype, routing[:CHECK_TOKENS, :layers])):
                error, allowed = reference_error(config, placement[:layers], CHECK_TOKENS, mode=mode, seed=seed,
                                                 device=device, dtype=check_dtype, routing=forced)
                checks.append({"placement": name, "mode": mode, "dtype": str(check_dtype).removeprefix("torch."),
                               "routing": "router" if forced is None else "trace", "max_error": error,
                               "allowed": allowed, "passed": error <= allowed})
    return checks


def summary(stats: StepStats) -> dict:
    """The median step as JSON, with totals over layers and ranks."""
    layers = [asdict(layer) for layer in stats.layers]
    return {"step_ms": stats.step_s * 1e3,
            "all_to_all_ms": sum(l["dispatch_s"] + l["combine_s"] for l in layers) * 1e3,
            "expert_ms": sum(l["expert_s"] for l in layers) * 1e3,
            "dispatch_tokens": sum(sum(l["dispatch_tokens"]) for l in layers),
            "combine_tokens": sum(sum(l["combine_tokens"]) for l in layers),
            "dispatch_bytes": sum(sum(l["dispatch_bytes"]) for l in layers),
            "combine_bytes": sum(sum(l["combine_bytes"]) for l in layers),
            "bytes_per_rank": [sum(l["dispatch_bytes"][r] + l["combine_bytes"][r] for l in layers)
                               for r in range(stats.world)],
            "metadata_bytes_per_row": stats.metadata_bytes_per_row,
            "layers": layers}


def main() -> None:
    args = parse_args()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    placements, routing = load_inputs(args)
    routing = routing.to(device)
    config = MoEConfig(args.hidden, args.ffn, len(next(iter(placements.values()))[0]), routing.shape[1],
                       routing.shape[2])
    checks = check_small(placements, routing, device, dtype, args.seed)
    if rank == 0:
        print(f"small check vs one device: {sum(c['passed'] for c in checks)}/{len(checks)} passed")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator, device=device).to(dtype)
    hidden = hidden[home_tokens(args.tokens, world, rank).to(device)].contiguous()
    results: dict[str, dict] = {}
    for name, placement in placements.items():
        model = build_expert_parallel(config, placement, seed=args.seed, device=device, dtype=dtype)
        for mode in ("stay", "return") if name == "contiguous" else ("stay",):   # "return": the classic reference
            steps = measure_steps(model, hidden, args.tokens, routing, mode=mode, warmup=args.warmup,
                                  repeats=args.repeats)
            results.setdefault(name, {})[mode] = summary(median_stats(steps))
            if rank == 0:
                row = results[name][mode]
                print(f"{name:>12} {mode:>6}: step {row['step_ms']:.2f} ms, all-to-all {row['all_to_all_ms']:.2f} ms,"
                      f" sent {(row['dispatch_bytes'] + row['combine_bytes']) / 2**20:.1f} MiB")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        result = {**environment(device), "world": world, "config": asdict(config), "dtype": args.dtype,
                  "tokens": args.tokens, "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                  "routing": args.routing, "small_check": checks, "placements": placements, "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
