"""Autoregressive decoding: model.generate with a static KV cache, the forward compiled as Hugging Face documents.

transformers' Llama (the suite config: hidden 2048, 8 layers) generates greedily from a 16-token prompt into a
static cache of --cache tokens; `model.forward` is eager, torch.compile default, torch.compile reduce-overhead
(Hugging Face's recipe) or torch.compile(backend="ember"), each with generate's own compilation turned off
(`disable_compile`); and once more as generate runs by default: for a static cache on a GPU, transformers
compiles the model itself with Inductor's reduce-overhead mode ("generate_auto"). Tokens/s over the timed generate calls (median of
--rounds, interleaved: each round runs every variant once, on its own copy of the model, after two warm-up calls that compile; and
ember against reduce-overhead paired round by round), first-call seconds, and whether the greedy tokens equal eager's;
then, in float32, whether ember's greedy tokens are identical to eager's.
Usage: python bench/decode.py [--out bench/results] [--batches 1 8] [--new-tokens 128] [--cache 1024]
       python bench/decode.py --device cpu --size tiny --batches 1 --new-tokens 8 --cache 64   (a smoke test)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from ember import models

from common import environment, write_results

PROMPT_TOKENS = 16
VARIANTS = {"eager": None, "generate_auto": "auto", "inductor": {"mode": "default"}, "inductor_ro": {"mode": "reduce-overhead"},
            "ember": {"backend": "ember"}}


def llama(size: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """transformers' Llama as the suite builds it (default config otherwise: use_cache as shipped)."""
    t = models._transformers()
    torch.manual_seed(0)
    return t.LlamaForCausalLM(models._llama_config(t, size)).to(device=device, dtype=dtype).eval()


def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, cache: int, *,
             auto_compile: bool = False) -> torch.Tensor:
    """Greedy tokens: exactly `new_tokens` of them (no early stop at an end token), into a static cache of `cache`;
    with `auto_compile`, as generate runs by default (compiling the model itself), else the forward as it is."""
    return model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          cache_implementation="static", max_cache_len=cache, pad_token_id=0,
                          disable_compile=not auto_compile)


def prepare(model: torch.nn.Module, variant: str, prompt: torch.Tensor, args: argparse.Namespace) -> dict:
    """The variant's own copy of the model, its forward compiled as the variant says, and two warm-up generates
    (the first timed: it compiles); the copy lets every variant's timed rounds interleave with the others'."""
    auto = VARIANTS[variant] == "auto"
    if VARIANTS[variant] is not None:
        model = copy.deepcopy(model)
        if not auto:
            model.forward = torch.compile(model.forward, fullgraph=True, **VARIANTS[variant])
    started = time.perf_counter()
    tokens = generate(model, prompt, args.new_tokens, args.cache, auto_compile=auto)
    _synchronize(prompt)
    first_s = time.perf_counter() - started
    generate(model, prompt, args.new_tokens, args.cache, auto_compile=auto)
    return {"model": model, "auto": auto, "first_call_s": first_s, "tokens": tokens, "seconds": []}


def time_round(state: dict, prompt: torch.Tensor, args: argparse.Namespace) -> None:
    """One timed generate of a prepared variant."""
    _synchronize(prompt)
    started = time.perf_counter()
    generate(state["model"], prompt, args.new_tokens, args.cache, auto_compile=state["auto"])
    _synchronize(prompt)
    state["seconds"].append(time.perf_counter() - started)


def _synchronize(prompt: torch.Tensor) -> None:
    if prompt.is_cuda:
        torch.cuda.synchronize()


def run_variants(model: torch.nn.Module, variants: list[str], prompt: torch.Tensor,
                 args: argparse.Namespace) -> dict[str, dict]:
    """Each variant prepared, then --rounds rounds in which every variant that compiled generates once, in turn
    (so a machine that slows down mid-run slows all of them alike); tokens/s over the median round."""
    results: dict[str, dict] = {}
    for variant in variants:
        try:
            results[variant] = prepare(model, variant, prompt, args)
        except Exception as error:  # a variant that breaks on this stack is recorded, not fatal
            results[variant] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    ready = [state for state in results.values() if "error" not in state]
    for _ in range(args.rounds):
        for state in ready:
            time_round(state, prompt, args)
    for state in ready:
        state["round_seconds"] = state.pop("seconds")
        state["tokens_per_s"] = prompt.shape[0] * args.new_tokens / statistics.median(state["round_seconds"])
        del state["model"]
    torch._dynamo.reset()  # the compiled copies go, and their caches with them
    return results


def paired_ratios(rows: list[dict], batch: int, reduce_overhead: float) -> list[float]:
    """Per round, the reduce-overhead variant's time over ember's (speed ratio): rounds interleave, so each pair
    ran on the machine as it was then, and host noise that drifts between rounds cancels."""
    by = {r["variant"]: r for r in rows if r["batch"] == batch}
    theirs = next((by[name] for name in ("inductor_ro", "generate_auto")
                   if name in by and by[name]["tokens_per_s"] == reduce_overhead), None)
    if theirs is None or "ember" not in by:
        return []
    return [other / ours for other, ours in zip(theirs["round_seconds"], by["ember"]["round_seconds"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="suite", choices=models.SIZES)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cache", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    rows = []
    model = llama(args.size, torch.bfloat16 if args.device == "cuda" else torch.float32, args.device)
    vocab = model.config.vocab_size
    with torch.no_grad():
        for batch in args.batches:
            prompt = torch.randint(1, vocab, (batch, PROMPT_TOKENS), device=args.device)
            results = run_variants(model, args.variants, prompt, args)
            for variant, result in results.items():
                rows.append({"batch": batch, "variant": variant, "tokens_per_s": result.get("tokens_per_s", float("nan")),
                             "first_call_s": result.get("first_call_s", float("nan")), "error": result.get("error", ""),
                             "round_seconds": result.get("round_seconds", []),
                             "same_tokens_as_eager": "tokens" in result and bool(torch.equal(result["tokens"],
                                                                                             results["eager"]["tokens"]))})
                print(f"batch {batch} {variant}: {rows[-1]['tokens_per_s']:,.1f} tokens/s {rows[-1]['error']}", flush=True)
        model = llama(args.size, torch.float32, args.device)
        prompt = torch.randint(1, vocab, (1, PROMPT_TOKENS), device=args.device)
        short = argparse.Namespace(**{**vars(args), "new_tokens": min(args.new_tokens, 32), "rounds": 1})
        fp32 = {variant: state["tokens"] for variant, state in run_variants(model, ["eager", "ember"], prompt, short).items()}
    identical = bool(torch.equal(fp32["eager"], fp32["ember"]))
    lines = [f"Decoding: Llama {args.size}, static cache {args.cache}, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new "
             "tokens, greedy; tokens/s (median of rounds)",
             f"{'batch':>5} {'variant':13} {'tokens/s':>10} {'× eager':>8} {'first call s':>13} {'same tokens':>12}"]
    for row in rows:
        eager = next(r for r in rows if r["batch"] == row["batch"] and r["variant"] == "eager")["tokens_per_s"]
        lines.append(f"{row['batch']:5d} {row['variant']:13} {row['tokens_per_s']:10,.1f} "
                     f"{row['tokens_per_s'] / eager:7.2f}× {row['first_call_s']:13.1f} {str(row['same_tokens_as_eager']):>12}"
                     + (f"  failed: {row['error']}" if row["error"] else ""))
    for batch in args.batches:
        by = {r["variant"]: r["tokens_per_s"] for r in rows if r["batch"] == batch}
        best = max((by.get(name, float("nan")) for name in ("inductor", "inductor_ro", "generate_auto")),
                   key=lambda v: -1 if v != v else v)
        reduce_overhead = max((by.get(name, float("nan")) for name in ("inductor_ro", "generate_auto")),
                              key=lambda v: -1 if v != v else v)
        if "ember" in by:
            lines.append(f"batch {batch}: ember / reduce-overhead (ours or generate's) = {by['ember'] / reduce_overhead:.2f} "
                         f"(target ≥ 1.10); ember / best torch.compile that ran = {by['ember'] / best:.2f}")
            paired = paired_ratios(rows, batch, reduce_overhead)
            if paired:
                lines.append(f"    paired by round (each round's reduce-overhead time over ember's, as the machine ran "
                             f"then): median {statistics.median(paired):.2f}, from {min(paired):.2f} to {max(paired):.2f}")
    lines.append(f"float32, {short.new_tokens} tokens: ember's greedy tokens identical to eager's: {identical}")
    device = torch.device(args.device)
    write_results(args.out, "decode" if args.size == "suite" else f"decode_{args.size}",
                  {**environment(device), "rows": rows, "fp32_identical": identical, "cache": args.cache,
                   "new_tokens": args.new_tokens}, "\n".join(lines))


if __name__ == "__main__":
    main()
