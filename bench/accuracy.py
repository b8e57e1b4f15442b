"""Accuracy on the GPU: each suite model in bfloat16, eager and ember, each against eager in float32.

bfloat16 itself is the error a user accepts; what ember adds is its result's distance from float32 beyond
eager's. An optimization that changes what is computed (a wrong stride, a dropped mask that was not
all-keeping) shows as an ember error far above eager's, while the rounding differences of another kernel
do not.
Usage: python bench/accuracy.py [--out bench/results] [--models bert gpt2 ...]
"""
from __future__ import annotations

import argparse

import torch
from torch.utils import _pytree as pytree

import ember
from ember import models

from common import environment, write_results


def first_float(result) -> torch.Tensor:
    return next(t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor) and t.is_floating_point()).float()


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite", device="cuda")
    with torch.no_grad():
        reference = first_float(model.float()(*(t.float() if t.is_floating_point() else t for t in inputs)))
        model = model.to(torch.bfloat16)
        eager = first_float(model(*inputs))
        ember_result = first_float(ember.compile(model, inputs)(*inputs))
    eager_error, ember_error = (eager - reference).abs(), (ember_result - reference).abs()
    return {"model": name, "reference_max": reference.abs().max().item(),
            "eager_max_err": eager_error.max().item(), "eager_mean_err": eager_error.mean().item(),
            "ember_max_err": ember_error.max().item(), "ember_mean_err": ember_error.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=list(models.SUITE))
    args = parser.parse_args()
    rows = [measure(name) for name in args.models]
    result = {**environment(torch.device("cuda")), "models": rows}
    lines = [f"# {result['device']}, torch {result['torch']}, triton {result['triton']}",
             "bfloat16 against float32 eager: max and mean absolute error",
             f"{'model':10} {'|fp32| max':>10} {'eager max':>10} {'eager mean':>10} {'ember max':>10} {'ember mean':>10}"]
    lines += [f"{r['model']:10} {r['reference_max']:10.3g} {r['eager_max_err']:10.3g} {r['eager_mean_err']:10.3g} "
              f"{r['ember_max_err']:10.3g} {r['ember_mean_err']:10.3g}" for r in rows]
    write_results(args.out, "accuracy", result, "\n".join(lines))


if __name__ == "__main__":
    main()
