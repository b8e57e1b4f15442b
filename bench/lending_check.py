"""GPU check: results lent from a CUDA graph's memory keep their values, through both entry points.

Each model (tiny, captured, fp32 and bf16, every output lent however small) is called five times on new inputs, every result kept (and copied at
once), and views of each result's tensors are held into the next call (which a torch that cannot move storages
must run without the graph, then copy outputs out). Then the Program is dropped, freed memory is written over,
and every kept result (and view) must equal its copy exactly; float32 results are held to eager's within
tolerance. Lists how many calls were refused for a pinned loan and whether the graph went on to copy outputs out.
Usage: python bench/lending_check.py [--out bench/results] [--models gpt2 llama bert_masked]
"""
from __future__ import annotations

import argparse
import gc

import torch
from torch.utils import _pytree as pytree

import ember
from ember import models
from ember.runtime import cuda_graph
from ember.tolerance import result_tolerance

from common import environment, write_results


class ViewOfInput(torch.nn.Module):
    """Returns a view of its input beside a result: a captured call's input is a buffer the next call refills."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.view(-1)[3:40], torch.sigmoid(x) * 2.0


def run(name: str, dtype: torch.dtype, entry: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    model, inputs = (ViewOfInput(), (torch.randn(16, 33),)) if name == "view_of_input" else models.load(name)
    model = model.to(device=device, dtype=dtype).eval()
    first = tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs)
    calls = [tuple(t.roll(step, -1) if not t.is_floating_point() else torch.randn_like(t) if step else t for t in first)
             for step in range(5)]
    refused = []
    original = cuda_graph.GraphedCall.__call__

    def counted(self, tensors):
        try:
            return original(self, tensors)
        except cuda_graph.PoolInUse:
            refused.append(self)
            raise

    cuda_graph.GraphedCall.__call__ = counted
    smallest, cuda_graph.LEND_MIN_BYTES = cuda_graph.LEND_MIN_BYTES, 0  # tiny models: lend every output
    try:
        with torch.no_grad():
            expected = [model(*args) for args in calls]
            torch._dynamo.reset()
            compiled = (torch.compile(model, backend="ember", options={"cuda_graphs": True}) if entry == "backend"
                        else ember.compile(model, calls[0], {"cuda_graphs": True}))
            results, snapshots, held = [], [], []
            for args in calls:
                results.append(compiled(*args))  # `held`, views of the last result, are kept through this call
                snapshots.append(pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf,
                                                 results[-1]))
                held = [leaf[..., :1] for leaf in pytree.tree_leaves(results[-1]) if isinstance(leaf, torch.Tensor)]
            copies_out, refused_calls = any(graphed.copies_out for graphed in refused), len(refused)
            del compiled, refused[:]
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                scribble = torch.full((torch.cuda.mem_get_info()[0] // 8,), float("nan"), device=device)
                del scribble
            changed = max(models.max_error(s, r) for s, r in zip(snapshots, results))
            changed = max(changed, models.max_error([leaf[..., :1] for leaf in pytree.tree_leaves(snapshots[-1])
                                                     if isinstance(leaf, torch.Tensor)], held))
            error = max(models.max_error(e, r) for e, r in zip(expected, results))
    finally:
        cuda_graph.GraphedCall.__call__ = original
        cuda_graph.LEND_MIN_BYTES = smallest
    limit = result_tolerance(expected[0])
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "entry": entry, "changed": changed,
            "max_err": error, "tolerance": limit, "refused": refused_calls, "copies_out": copies_out,
            "ok": changed == 0 and (dtype != torch.float32 or error <= limit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=["gpt2", "llama", "bert_masked", "view_of_input"])
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test (nothing is captured)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [run(name, dtype, entry, device) for name in args.models for dtype in (torch.float32, torch.bfloat16)
            for entry in ("export", "backend")]
    lines = [f"Lent results kept over 5 calls (views of each held into the next call), then memory written over; "
             f"moves storages: {cuda_graph.LENDS}. changed: kept results against their copies taken at once (must be 0); "
             "max err: against eager (held to the tolerance in float32)",
             f"{'model':14} {'dtype':9} {'entry':8} {'changed':>8} {'max err':>9} {'tol':>9} {'refused':>8} "
             f"{'copies out':>10}  ok"]
    lines += [f"{r['model']:14} {r['dtype']:9} {r['entry']:8} {r['changed']:8.1e} {r['max_err']:9.2e} {r['tolerance']:9.2e} "
              f"{r['refused']:8d} {str(r['copies_out']):>10}  {'yes' if r['ok'] else 'NO'}" for r in rows]
    write_results(args.out, "lending_check" if device.type == "cuda" else "lending_check_cpu",
                  {**environment(device), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
