"""Speed on the GPU: eager vs torch.compile (default and reduce-overhead) vs ember's two entry points, per model.

Models are built as users build them (transformers' default configs: decoders return their KV cache; BERT once
more with a padding attention mask as served). ember runs through `torch.compile(backend="ember")` (ember_backend),
the same step by step without CUDA graphs (ember_backend_steps), and `ember.compile` (ember_export).
One process, one device, every variant of a model timed side by side in rotation (five rounds, the
median of each; step by step against torch.compile's default also paired round by round), after warm-up:
median ms per call, speedup over eager, peak memory above weights and inputs (the most allocated while a
variant is built and first called, so what it keeps between calls, such as ember's arena or a CUDA-graph pool,
counts; cuBLAS's workspaces are cleared before each variant, so each pays for its own), compile time (first
calls included), and torch.compile's and each ember variant's max error against eager (in bf16 a routing tie
moves a many-expert MoE's outputs under either tool).
Compile caches on disk (Inductor's, Triton's, ember's) start empty in a fresh temporary directory, so each tool's
first variant of a model compiles cold, as on a user's first run (a tool's later variants reuse what its first
compiled, in both tools); --warm-caches keeps the usual ones.
Usage: python bench/speed.py [--out bench/results] [--models mlp gpt2 ... | --broader] [--rounds 5] [--stem speed]
                             [--variants inductor_ro ember_backend ...]   (a subset, for a model too big for six builds;
                                                                            inductor_ma adds max-autotune)
       python bench/speed.py --from-json part1.json part2.json   (one table from runs split across calls)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch

import ember
from ember import models
from ember.optimizer.cost.calibrate import time_us

from common import environment, write_results

VARIANTS = ("eager", "inductor", "inductor_ro", "ember_backend", "ember_backend_steps", "ember_export")
EMBER = VARIANTS[3:]
MAX_AUTOTUNE = "inductor_ma"
"""torch.compile's max-autotune mode: only on request (--variants inductor_ma), its compile takes minutes a model."""
MODELS = (*models.SUITE, "bert_masked")


def build(name: str, variants: tuple[str, ...] = VARIANTS) -> tuple[dict, dict, dict, tuple]:
    """Every variant's callable, compile time (its first three calls included) and peak memory: the most
    allocated above what was allocated before it was built, while it was built and called (so what it
    keeps between calls, such as ember's arena or a CUDA-graph pool, counts, and so do its transients).
    cuBLAS's workspaces (one per stream, 32 MiB on Hopper, kept for the process's life) are cleared before
    each variant, so each pays for the ones it makes, whichever variant ran before it."""
    torch.manual_seed(0)
    model, inputs = models.load(name, "suite", device="cuda")
    calls, compile_s, peaks = {}, {}, {}
    builders = {"eager": lambda: model,
                "inductor": lambda: torch.compile(model, mode="default"),
                "inductor_ro": lambda: torch.compile(model, mode="reduce-overhead"),
                MAX_AUTOTUNE: lambda: torch.compile(model, mode="max-autotune"),
                "ember_backend": lambda: torch.compile(model, backend="ember"),
                "ember_backend_steps": lambda: torch.compile(model, backend="ember", options={"cuda_graphs": False}),
                "ember_export": lambda: ember.compile(model, inputs)}
    with torch.no_grad():
        for variant in variants:
            make = builders[variant]
            torch._dynamo.reset()  # each torch.compile variant compiles for itself
            gc.collect()
            torch.cuda.synchronize()
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            compiled = make()
            for _ in range(3):  # reduce-overhead records its graph on the third call
                result = compiled(*inputs)
                del result
            torch.cuda.synchronize()
            compile_s[variant] = 0.0 if variant == "eager" else time.perf_counter() - started
            calls[variant], peaks[variant] = compiled, torch.cuda.max_memory_allocated() - before
    return calls, compile_s, peaks, inputs


def measure(name: str, rounds: int, variants: tuple[str, ...] = VARIANTS) -> dict:
    calls, compile_s, peaks, inputs = build(name, variants)
    device = torch.device("cuda")
    samples: dict[str, list[float]] = {variant: [] for variant in variants}
    with torch.no_grad():
        expected = calls["eager"](*inputs)
        errors = {variant: models.max_error(expected, calls[variant](*inputs))
                  for variant in ("inductor", *EMBER) if variant in calls}
        for _ in range(rounds):
            for variant in variants:
                samples[variant].append(time_us(lambda: calls[variant](*inputs), device) / 1e3)
    row = {"model": name, **{f"{variant}_max_err": error for variant, error in errors.items()}}
    if "ember_export" in calls:
        program = calls["ember_export"]
        row.update({"ember_cuda_graph": any(program.executor.graphed.values()),
                    "ember_fused_groups": program.report.fusion.get("groups", 0),
                    "ember_fused_nodes": program.report.fusion.get("fused_nodes", 0), "nodes": len(program.graph.nodes)})
    if "ember_backend_steps" in calls:
        row["steps_ratio_by_round"] = [c / s for c, s in zip(samples["inductor"], samples["ember_backend_steps"])]
    for variant in variants:
        row[f"{variant}_rounds_ms"] = samples[variant]
        row[f"{variant}_ms"] = statistics.median(samples[variant])
        row[f"{variant}_peak_mib"] = peaks[variant] / 2**20
        row[f"{variant}_compile_s"] = compile_s[variant]
    torch._dynamo.reset()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--broader", action="store_true", help="the broader suite (models.BROADER) instead of --models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stem", default="speed", help="name of the result files")
    parser.add_argument("--from-json", nargs="*", default=[], help="tabulate the rows of earlier runs instead of measuring")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS),
                        help="a subset of the variants (eager and inductor always run), for a model too big to build six times in one call")
    parser.add_argument("--warm-caches", action="store_true", help="keep the usual on-disk compile caches")
    args = parser.parse_args()
    if not args.warm_caches:
        fresh = tempfile.mkdtemp(prefix="speed-caches-")
        for variable, folder in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"),
                                 ("EMBER_CACHE_DIR", "ember")):
            os.environ[variable] = os.path.join(fresh, folder)
    if args.from_json:
        runs = [json.loads(open(path).read()) for path in args.from_json]
        environment_ = {key: value for key, value in runs[0].items() if key != "models"}
        write_results(args.out, args.stem, {**environment_, "models": [row for run in runs for row in run["models"]]},
                      table([row for run in runs for row in run["models"]]))
        return
    rows = []
    for name in models.BROADER if args.broader else args.models:
        variants = tuple(v for v in (*VARIANTS, MAX_AUTOTUNE) if v in {"eager", "inductor", *args.variants})
        rows.append(measure(name, args.rounds, variants))
        print(f"{name}: " + ", ".join(f"{v} {rows[-1][v + '_ms']:.3f} ms" for v in variants), flush=True)
    write_results(args.out, args.stem, {**environment(torch.device("cuda")), "models": rows}, table(rows))


def table(rows: list[dict]) -> str:
    """The side-by-side table and the issue's ratios; a variant a row did not measure shows as "-"."""
    short = {"inductor": "compile", "inductor_ro": "reduce-ovh", "ember_backend": "backend", "ember_backend_steps": "steps",
             "ember_export": "export"}

    def cell(r: dict, key: str, form: str) -> str:
        return form % r[key] if key in r else "-"

    lines = ["Speed (median ms per call; × = speedup over eager), peak MiB above weights and inputs, compile s",
             f"{'model':11} {'eager':>7} " + " ".join(f"{short[v]:>13}" for v in VARIANTS[1:])
             + f" {'peak e/c/ro/b/s/x MiB':>26} {'compile c/ro/b/s/x s':>22} {'max err c/b/s/x':>22}"]
    for r in rows:
        times = " ".join("%6.3f %5.2f×" % (r[v + "_ms"], r["eager_ms"] / r[v + "_ms"]) if v + "_ms" in r else f"{'-':>13}"
                         for v in VARIANTS[1:])
        peaks = "/".join(cell(r, v + "_peak_mib", "%.0f") for v in VARIANTS)
        compiles = "/".join(cell(r, v + "_compile_s", "%.1f") for v in VARIANTS[1:])
        errors = "/".join(cell(r, v + "_max_err", "%.2g") for v in ("inductor", *EMBER))
        lines.append(f"{r['model']:11} {r['eager_ms']:7.3f} {times} {peaks:>26} {compiles:>22} {errors:>22}")
    best = [min(r[v + "_ms"] for v in ("inductor", "inductor_ro") if v + "_ms" in r) for r in rows]
    lines.append("ember ÷ better torch.compile mode measured (speed ratio, geomean; target ≥ 1.10, no model < 0.95):")
    for variant in ("ember_backend", "ember_export"):
        measured = [(r, b / r[variant + "_ms"]) for b, r in zip(best, rows) if variant + "_ms" in r]
        if measured:
            lines.append(f"  {short[variant]:8} {statistics.geometric_mean([ratio for _, ratio in measured]):.2f}  (" +
                         ", ".join(f"{r['model']} {ratio:.2f}" for r, ratio in measured) + ")")
    steps = [(r, r["inductor_ms"] / r["ember_backend_steps_ms"]) for r in rows if "ember_backend_steps_ms" in r]
    if steps:
        lines.append("backend step by step ÷ torch.compile default (target ≥ 1.00 on every model): " +
                     ", ".join(f"{r['model']} {ratio:.2f}" for r, ratio in steps))
        lines.append("  the same, paired round by round (median [least–most]): " + ", ".join(
            f"{r['model']} {statistics.median(r['steps_ratio_by_round']):.2f} "
            f"[{min(r['steps_ratio_by_round']):.2f}–{max(r['steps_ratio_by_round']):.2f}]" for r, _ in steps))
    peak = [(r, max(r[v + "_peak_mib"] for v in ("ember_backend", "ember_export") if v + "_peak_mib" in r)
             / max(r["inductor_peak_mib"], 1e-9)) for r in rows
            if any(v + "_peak_mib" in r for v in ("ember_backend", "ember_export"))]
    lines.append("peak of either entry point ÷ torch.compile default's (target ≤ 1.00): " +
                 ", ".join(f"{r['model']} {ratio:.2f}" for r, ratio in peak))
    autotuned = [r for r in rows if MAX_AUTOTUNE + "_ms" in r and "ember_backend_ms" in r]
    if autotuned:
        lines.append("backend ÷ torch.compile max-autotune: speed (target ≥ 0.91, within 10%), compile time (target ≤ 0.20): " +
                     ", ".join(f"{r['model']} {r[MAX_AUTOTUNE + '_ms'] / r['ember_backend_ms']:.2f} "
                               f"({r[MAX_AUTOTUNE + '_ms']:.3f} ms), "
                               f"{r['ember_backend_compile_s'] / r[MAX_AUTOTUNE + '_compile_s']:.2f} "
                               f"({r[MAX_AUTOTUNE + '_compile_s']:.0f} s)" for r in autotuned))
    return "\n".join(lines)

if __name__ == "__main__":
    main()
