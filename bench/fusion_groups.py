"""Which fused groups ember makes for a model on the GPU: each generated kernel's ops, and the ops left to ATen.

The fusion plan depends on the device (attention written out, padded layouts), so this is the place to see it.
Usage: python bench/fusion_groups.py [--model bert] [--out bench/results]
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

import ember
from ember import models
from ember.codegen import GroupKernel

from common import environment, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    model, inputs = models.load(args.model, "suite", device="cuda")
    with torch.no_grad():
        program = ember.compile(model, inputs, ember.Options(cuda_graphs=False))
    nodes = {node.name: node for node in program.graph.nodes}
    kernels, left = [], Counter()
    for item in program.executor.work:
        if isinstance(item, GroupKernel):
            ops = [line.split("=")[1].split("(")[0].strip() for line in item.kernel.source.source.splitlines()
                   if line.startswith("# %")]
            kernels.append((item.name, ops))
        elif nodes[item.name].definition.kind != "view":
            left[nodes[item.name].op if not nodes[item.name].is_extern else nodes[item.name].target] += 1
    lines = [f"{name}: {' '.join(ops)}" for name, ops in kernels]
    lines += ["left to ATen: " + ", ".join(f"{op} ×{count}" for op, count in left.most_common())]
    result = {"model": args.model, "kernels": kernels, "left": dict(left)}
    write_results(args.out, f"fusion_groups_{args.model}", {**environment(torch.device("cuda")), **result}, "\n".join(lines))


if __name__ == "__main__":
    main()
