"""GPU check: a model updating inputs in place (a static KV cache and its position counter) under CUDA-graph capture.

Through both entry points, on the GPU with graphs on: calls on one cache (captured reading the caller's own
cache), as many on a second cache in other memory (captured again, reading it), then on each in turn after a
few calls (captured once more, copying the cache in on every call); every result, cache and counter against
eager's. The counter's add runs in place in the caller's tensor: a capture's warm-up calls must not add too.
Usage: python bench/updated_inputs.py [--out bench/results]
"""
from __future__ import annotations

import argparse

import torch

import ember

from common import environment, write_results


CACHES = (0,) * 9 + (1,) * 9 + (0, 0, 1, 0)
"""Which cache each call updates: 9 calls each outlast executor.RECAPTURE_AFTER, the alternation after does not."""


class Accumulate(torch.nn.Module):
    """Writes a projection into the cache at the position its counter holds and counts, then reads the whole
    cache (as transformers' static cache does)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        position = torch.arange(1, device=x.device) + count
        count.add_(1)
        cache.index_copy_(0, position, self.proj(x).relu())
        return cache.sum(0, keepdim=True) * 2.0


def run(entry: str) -> dict:
    torch.manual_seed(0)
    model = Accumulate().cuda().eval()
    caches = [torch.zeros(33, 64, device="cuda") for _ in range(2)]
    counts = [torch.zeros((), dtype=torch.long, device="cuda") for _ in range(2)]
    expected, expected_counts = [cache.clone() for cache in caches], [count.clone() for count in counts]
    example = (torch.randn(1, 64, device="cuda"), caches[0].clone(), counts[0].clone())
    with torch.no_grad():
        compiled = (torch.compile(model, backend="ember", options={"cuda_graphs": True}) if entry == "backend"
                    else ember.compile(model, example, {"cuda_graphs": True}))
        error = 0.0
        for which in CACHES:
            x = torch.randn(1, 64, device="cuda")
            result = compiled(x, caches[which], counts[which])
            reference = model(x, expected[which], expected_counts[which])
            error = max(error, (result - reference).abs().max().item(),
                        (caches[which] - expected[which]).abs().max().item(),
                        (counts[which] - expected_counts[which]).abs().max().item())
    captured = None if entry == "backend" else any(call is not None for call in compiled.executor.graphed.values())
    return {"entry": entry, "max_err": error, "captured": captured, "ok": error <= 1e-4 and captured is not False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows = [run("export"), run("backend")]
    lines = ["A cache and its counter updated in place under CUDA graphs: one cache, another, the first again (fp32, against eager)",
             f"{'entry':8} {'max err':>9} {'captured':>8}  ok"]
    lines += [f"{r['entry']:8} {r['max_err']:9.2e} {str(r['captured']):>8}  {'yes' if r['ok'] else 'NO'}" for r in rows]
    write_results(args.out, "updated_inputs", {**environment(torch.device("cuda")), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
