"""Where the host time of a decode step's forward goes inside generate, through torch.compile(backend="ember"):
each layer of the call (dynamo's frame, ember's runner, the executor, the captured call, the replay, the write-back)
timed with the clock around it, medians over one generate after two (batch 1, static cache, suite Llama).
Usage: python bench/decode_host_split.py [--new-tokens 64] [--out bench/results]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import environment, write_results
from decode import PROMPT_TOKENS, generate, llama
from ember import backend
from ember.runtime import cuda_graph, executor, program

LAYERS = {"runner (all of ember)": (backend.ExportedRunner, "__call__"),
          "executor": (executor.Executor, "__call__"),
          "captured call": (cuda_graph.GraphedCall, "__call__"),
          "replay": (torch.cuda.CUDAGraph, "replay"),
          "hand out": (cuda_graph.GraphedCall, "_hand_out"),
          "finish (write-back)": (program.Program, "finish")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {label: [] for label in ("forward (dynamo and ember)", *LAYERS)}

    def timed(label, function):
        def call(*positional, **kwargs):
            started = time.perf_counter()
            result = function(*positional, **kwargs)
            seconds[label].append(time.perf_counter() - started)
            return result
        return call

    for label, (owner, name) in LAYERS.items():
        setattr(owner, name, timed(label, getattr(owner, name)))
    model = llama("suite", torch.bfloat16, "cuda")
    model.forward = timed("forward (dynamo and ember)", torch.compile(model.forward, backend="ember", fullgraph=True))
    prompt = torch.randint(1, model.config.vocab_size, (1, PROMPT_TOKENS), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            for values in seconds.values():
                values.clear()
            torch.cuda.synchronize()
            started = time.perf_counter()
            generate(model, prompt, args.new_tokens, 1024)
            torch.cuda.synchronize()
            rate = args.new_tokens / (time.perf_counter() - started)
    lines = [f"Host µs per decode-step forward inside generate (suite Llama, batch 1, {args.new_tokens} tokens, "
             f"{rate:.1f} tokens/s with the clocks on); each layer includes those below it",
             f"{'layer':28} {'calls':>5} {'median µs':>10}"]
    lines += [f"{label:28} {len(values):5d} {statistics.median(values[1:] or values or [0.0]) * 1e6:10.1f}"
              for label, values in seconds.items()]
    write_results(args.out, "decode_host_split", {**environment(torch.device("cuda")), "rows": {
        label: values for label, values in seconds.items()}}, "\n".join(lines))


if __name__ == "__main__":
    main()
