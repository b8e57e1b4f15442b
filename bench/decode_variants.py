"""Decode tokens/s of ember's runtime choices side by side in one process, beside generate's own compilation.

The suite Llama generates 128 tokens into a new static cache per generate (as transformers makes one) through
torch.compile(backend="ember"): as shipped ("head"); with a cache in new memory copied in on every call rather
than captured again ("copy"); with generated kernels launched through Triton's JIT rather than directly ("jit");
and "auto", generate compiling the model itself (Inductor reduce-overhead). Each capture's seconds, warm-up calls
and aliased inputs are listed.
Usage: python bench/decode_variants.py [--out bench/results] [--batches 8 1]
"""
from __future__ import annotations

import argparse
import time

import torch
from ember.codegen import kernels
from ember.runtime import cuda_graph, executor

from common import environment, write_results
from decode import PROMPT_TOKENS, llama, run_variant

CONFIGS = ("auto", "head", "copy", "jit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 1])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args()
    captures: list[tuple[float, int, int]] = []
    capture = cuda_graph.GraphedCall.__init__

    def timed(self, *positional, **options) -> None:
        started = time.perf_counter()
        capture(self, *positional, **options)
        captures.append((time.perf_counter() - started, options.get("warm_up"), len(options.get("aliased", ()))))

    cuda_graph.GraphedCall.__init__ = timed
    shipped = (executor.RECAPTURE_AFTER, kernels.launch_hooks_set)
    run_args = argparse.Namespace(new_tokens=128, cache=1024, rounds=3)
    model = llama("suite", torch.bfloat16, "cuda")
    rows = []
    with torch.no_grad():
        for batch in args.batches:
            prompt = torch.randint(1, model.config.vocab_size, (batch, PROMPT_TOKENS), device="cuda")
            for config in args.configs:
                executor.RECAPTURE_AFTER = 10**9 if config == "copy" else shipped[0]
                kernels.launch_hooks_set = (lambda: True) if config == "jit" else shipped[1]
                captures.clear()
                result = run_variant(model, "generate_auto" if config == "auto" else "ember", prompt, run_args)
                rows.append({"batch": batch, "config": config, "tokens_per_s": result["tokens_per_s"],
                             "captures": list(captures)})
    executor.RECAPTURE_AFTER, kernels.launch_hooks_set = shipped
    lines = ["Decoding 128 tokens (suite Llama, static cache 1024): ember's runtime choices, tokens/s",
             f"{'batch':>5} {'config':6} {'tokens/s':>9} {'÷ auto':>7}  captures (s, warm-up calls, aliased inputs)"]
    for row in rows:
        auto = next((r["tokens_per_s"] for r in rows if r["batch"] == row["batch"] and r["config"] == "auto"), float("nan"))
        shown = ", ".join(f"({s:.3f}, {w}, {a})" for s, w, a in row["captures"])
        lines.append(f"{row['batch']:5d} {row['config']:6} {row['tokens_per_s']:9.1f} {row['tokens_per_s'] / auto:7.2f}  {shown}")
    write_results(args.out, "decode_variants", {**environment(torch.device("cuda")), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
