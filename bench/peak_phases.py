"""Where ember's peak GPU memory goes: allocated MiB above weights and inputs through each phase of building
a Program and calling it (with and without CUDA graphs), and the steps whose transient workspace (memory an
op allocates beyond its own results) is largest.
Usage: python bench/peak_phases.py [--models gpt2 mixtral ...]
"""
from __future__ import annotations

import argparse
import gc

import torch

import ember
from ember import models

from memory import step_allocations


def phases(name: str, cuda_graphs: bool) -> list[str]:
    """Peak and held MiB after compiling and after each of three calls."""
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite", device="cuda")
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    rows = []

    def mark(what: str) -> None:
        torch.cuda.synchronize()
        rows.append(f"{what} peak {(torch.cuda.max_memory_allocated() - before) / 2**20:.0f} "
                    f"held {(torch.cuda.memory_allocated() - before) / 2**20:.0f}")
        torch.cuda.reset_peak_memory_stats()

    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        program = ember.compile(model, inputs, ember.Options(cuda_graphs=cuda_graphs))
        memory = program.report.memory
        if memory:
            rows.append(f"predicted peak {memory['peak_bytes'] / 2**20:.0f} arena {memory['arena_bytes'] / 2**20:.0f}")
        mark("compile")
        for call in range(3):
            result = program(*inputs)
            del result
            mark(f"call{call + 1}")
    return rows


def workspaces(name: str, count: int = 4) -> list[str]:
    """The steps that allocate most beyond their results while they run, step by step."""
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite", device="cuda")
    with torch.no_grad():
        program = ember.compile(model, inputs, ember.Options(cuda_graphs=False))
        found = [((peak - max(made, 0)) / 2**20, made / 2**20, what)
                 for peak, made, what in step_allocations(program, inputs)]
    return [f"{extra:.1f} MiB beyond {made:.1f} MiB made: {what}" for extra, made, what in sorted(found, key=lambda f: -f[0])[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(models.SUITE))
    args = parser.parse_args()
    for name in args.models:
        print(f"{name} step by step: " + "; ".join(phases(name, False)), flush=True)
        print(f"{name} cuda graphs:  " + "; ".join(phases(name, True)), flush=True)
        print(f"{name} workspaces:   " + "; ".join(workspaces(name)), flush=True)


if __name__ == "__main__":
    main()
