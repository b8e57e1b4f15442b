"""Saved programs: compile time against load time, and save → load → the same outputs bit for bit.

Per built-in model (suite size) and device: ember.compile twice (cold, then with warm caches: the second is what
load is held to) and its first call, the program saved, then `ember.load` and its first call (the kernel cache
warm, as after a first compile on the machine), in this process and, for a few models, in a fresh Python process
(imports included). What each path costs before the first result is its time plus its first call's excess over a
warm call (the call itself is the model's, on either path: a suite MLP's call takes seconds on a CPU); target: the
load path's ≤ 1/10 of the compile path's. The loaded program's outputs are compared bit for bit with the compiled
one's on the same inputs, and `verify` runs the saved sample.
Usage: python bench/artifact.py [--out DIR] [--models ...] [--devices cuda cpu] [--fresh ...]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

import ember
from ember import models
from ember.runtime.artifact import verify_program

from common import environment, write_results

FRESH_LOAD = """
import sys, time
started = time.perf_counter()
from pathlib import Path
import torch, ember
from ember.runtime.artifact import load_samples
program = ember.load(sys.argv[1])
inputs, _ = load_samples(Path(sys.argv[1]), program)
with torch.no_grad():
    outputs = program.run(inputs)
if torch.cuda.is_available():
    torch.cuda.synchronize()
print(time.perf_counter() - started)
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _outputs(program: ember.Program, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return [tensor.clone() for tensor in pytree.tree_leaves(program(*inputs))]


def _timed_outputs(program: ember.Program, inputs: tuple, device: torch.device) -> tuple[list[torch.Tensor], float]:
    _sync(device)
    started = time.perf_counter()
    outputs = _outputs(program, inputs)
    _sync(device)
    return outputs, time.perf_counter() - started


def measure(name: str, device: torch.device, fresh: bool) -> dict:
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite")
    model = model.to(device).eval()
    inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    seconds = {}
    for attempt in ("compile_cold_s", "compile_s"):
        started = time.perf_counter()
        with torch.no_grad():
            program = ember.compile(model, inputs)
        seconds[attempt] = time.perf_counter() - started
    expected, compiled_first_s = _timed_outputs(program, inputs, device)
    call_s = sorted(_timed_outputs(program, inputs, device)[1] for _ in range(3))[1]
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        program.save(directory)
        seconds["save_s"] = time.perf_counter() - started
        size_bytes = sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())
        _sync(device)
        started = time.perf_counter()
        loaded = ember.load(directory)
        seconds["load_s"] = time.perf_counter() - started
        got, loaded_first_s = _timed_outputs(loaded, inputs, device)
        identical = len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
        _, checks = verify_program(directory)
        if fresh:
            run = subprocess.run([sys.executable, "-c", FRESH_LOAD, directory], capture_output=True, text=True)
            seconds["fresh_process_s"] = float(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None
    seconds.update(call_s=call_s, compile_path_s=seconds["compile_s"] + max(compiled_first_s - call_s, 0.0),
                   compile_cold_path_s=seconds["compile_cold_s"] + max(compiled_first_s - call_s, 0.0),
                   load_path_s=seconds["load_s"] + max(loaded_first_s - call_s, 0.0))
    return {"model": name, "device": device.type, **seconds, "artifact_bytes": size_bytes, "identical": identical,
            "verified": all(check.ok for check in checks), "fusion_groups": len(program.fusion.groups) if program.fusion else 0,
            "captured": program.executor.cuda_graphs,
            "load_share": seconds["load_path_s"] / seconds["compile_path_s"],
            "load_share_cold": seconds["load_path_s"] / seconds["compile_cold_path_s"]}


def table(rows: list[dict]) -> str:
    lines = ["Saved programs: time to the first result by compiling (cold / warm caches) and by loading; outputs bit for bit",
             "(path s: compile or load, plus the first call's excess over a warm call; ÷ warm, ÷ cold: the load path's share "
             "of the compile path's, compiling with warm caches or as the process's first compile)",
             f"{'model':12} {'dev':4} {'compile s':>15} {'path s':>7} {'save s':>7} {'load s':>7} {'path s':>7} "
             f"{'÷ warm':>6} {'÷ cold':>6} {'call s':>7} {'fresh s':>8} {'MiB':>7} {'identical':>9} {'verify':>6}"]
    for r in rows:
        fresh = f"{r['fresh_process_s']:.2f}" if r.get("fresh_process_s") else "-"
        lines.append(f"{r['model']:12} {r['device']:4} {r['compile_cold_s']:7.2f}/{r['compile_s']:<7.2f} "
                     f"{r['compile_path_s']:7.3f} {r['save_s']:7.2f} {r['load_s']:7.3f} {r['load_path_s']:7.3f} "
                     f"{r['load_share']:6.3f} {r['load_share_cold']:6.3f} {r['call_s']:7.4f} {fresh:>8} {r['artifact_bytes'] / 2**20:7.1f} "
                     f"{str(r['identical']):>9} {str(r['verified']):>6}")
    worst = max(rows, key=lambda r: r["load_share"])
    over = [f"{r['model']} on {r['device']}" for r in rows if r["load_share"] > 0.1]
    lines.append(f"worst load path ÷ compile path (warm): {worst['load_share']:.3f} ({worst['model']} on {worst['device']}; "
                 f"target ≤ 0.100; above it: {', '.join(over) or 'none'}); every output identical: {all(r['identical'] for r in rows)}, "
                 f"every sample verified: {all(r['verified'] for r in rows)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=list(models.BUILTIN))
    parser.add_argument("--devices", nargs="*", default=["cuda", "cpu"])
    parser.add_argument("--stem", default="artifact", help="name of the result files")
    parser.add_argument("--fresh", nargs="*", default=["gpt2", "llama", "bert"],
                        help="models also loaded in a fresh Python process")
    args = parser.parse_args()
    rows = []
    for device in args.devices:
        for name in args.models:
            rows.append(measure(name, torch.device(device), name in args.fresh))
            print(rows[-1], flush=True)
    device = torch.device("cuda" if "cuda" in args.devices else "cpu")
    write_results(args.out, args.stem, {**environment(device), "rows": rows}, table(rows))


if __name__ == "__main__":
    main()
