"""Layer skipping, the choice: which residual sublayers to remove under an accuracy budget, judged on calibration
inputs by running the rewritten graph (optimizer.layer_skip finds and removes them).

Four scorers, each giving the order in which it removes things (its curve):
- `bi` (ShortGPT): whole blocks by Block Influence, 1 - mean cos(stream in, stream out), lowest first, in one shot;
- `sleb` (SLEB): whole blocks, greedily, each round the one whose removal raises the calibration loss least,
  the first and last blocks kept;
- `finercut` (FinerCut): attention and feed-forward sublayers, greedily by the same loss;
- `ember`: sublayers, greedily, each round the one with the most predicted time saved (the cost model's, on the
  target's profile) per unit of loss added; under a budget, only removals that keep within it.
The loss is the calibration perplexity's relative increase for a language model (its first output the logits of
its first input's tokens), else the divergence of its first output, 1 - mean cosine of its rows.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CompileError
from ..ir import Graph
from ..progress import task
from .cost import CostModel
from .layer_skip import Sublayer, blocks, find_sublayers, passed_through, skip_sublayers

log = logging.getLogger(__name__)

METHODS = ("ember", "finercut", "sleb", "bi")
METRICS = ("perplexity", "divergence")

LAZY = ("finercut", "ember")
"""Scorers over sublayers run their greedy search lazily (see `_greedy`): over 60 sublayers an exact one runs the
model thousands of times. SLEB's, over blocks, runs exactly, as SLEB does."""

FLAT_LOSS = 1e-4
"""A removal that adds less loss than this (or lowers it) is priced as adding this much: time saved per unit of
loss stays finite, and among such removals the one saving most goes first."""


@dataclass(frozen=True, slots=True)
class SkipPoint:
    """One point of a scorer's curve: what is removed so far and what that costs and saves."""

    removed: tuple[int, ...]
    flops_removed: float
    """Share of the model's FLOPs."""
    time_removed: float
    """Share of the model's predicted time (the cost model's, unfused)."""
    loss: float
    """On the calibration inputs: relative perplexity increase, or divergence."""


@dataclass(frozen=True, slots=True)
class SkipPlan:
    """What to remove, why, and what it was measured to cost; plain data, saved with a program."""

    method: str
    metric: str
    budget: float
    sublayers: int
    """How many residual sublayers the model has (a plan applies only to a model with as many)."""
    removed: tuple[int, ...]
    labels: tuple[str, ...]
    """Each removed sublayer's weights' prefix and kind (`model_layers_3_mlp (ffn)`)."""
    flops_removed: float
    predicted_speedup: float
    """Predicted time of the full model over the skipped one's (the cost model's, unfused)."""
    calibration_full: float
    """The full model's calibration perplexity (0 for divergence)."""
    calibration_loss: float
    """The skipped model's loss on the calibration inputs, in `metric`'s terms."""
    heldout: dict[str, float] = field(default_factory=dict)
    """Numbers measured on inputs the choice never saw, by who measured them."""
    measured_speedup: dict[str, float] = field(default_factory=dict)
    """Time of the full model over the skipped one's, as measured, by where and how (`measure_speedup`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkipPlan:
        """The plan `to_dict` gave (as JSON keeps it); CompileError when it is not one."""
        try:
            plan = cls(**{**data, "removed": tuple(int(i) for i in data["removed"]), "labels": tuple(data["labels"])})
        except (KeyError, TypeError, ValueError) as error:
            raise CompileError(f"not a skip plan ({type(error).__name__}: {error})") from error
        if any(not 0 <= index < plan.sublayers for index in plan.removed):
            raise CompileError(f"the skip plan removes sublayers {plan.removed} of a model with {plan.sublayers}")
        return plan


@dataclass(frozen=True, slots=True)
class LayerSkip:
    """A request to ember.compile: remove the most the scorer finds whose calibration loss keeps within `budget`
    (a relative perplexity increase for a language model, else a divergence), judged on `calibration`: calls, each
    the model's inputs as ember.compile takes its example (a tensor, a tuple of args, a dict of kwargs), all of one
    shape."""

    budget: float
    calibration: Sequence[Any]
    method: str = "ember"
    metric: str | None = None

    def __post_init__(self) -> None:
        if not self.budget >= 0:
            raise CompileError(f"a skip budget is a loss of 0 or more, not {self.budget}")
        if self.method not in METHODS:
            raise CompileError(f"unknown layer-skip method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.metric is not None and self.metric not in METRICS:
            raise CompileError(f"unknown skip metric {self.metric!r}: use one of {', '.join(METRICS)}")
        if not self.calibration:
            raise CompileError("layer skipping needs calibration inputs: give at least one call")


def as_layer_skip(value: Any) -> SkipPlan | LayerSkip:
    """Options.layer_skip as given: a SkipPlan or LayerSkip, a plan's dict, or the path of a plan's JSON file."""
    if isinstance(value, (SkipPlan, LayerSkip)):
        return value
    if isinstance(value, Mapping):
        return SkipPlan.from_dict(dict(value))
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CompileError(f"cannot read a skip plan from {path}: {error}") from error
        return SkipPlan.from_dict(data.get("plan", data) if isinstance(data, dict) else data)
    raise CompileError(f"layer_skip takes a SkipPlan, a LayerSkip, a plan's dict or its JSON file's path; got "
                       f"{type(value).__name__}")


@dataclass(slots=True)
class Calibration:
    """A graph, the calibration calls it is judged on (each its tensor inputs, in graph order) and the full graph's
    outputs on them: the loss of any skip set.

    Greedy search removes one more thing at a time, so each candidate is run only from the first sublayer where
    it differs from the last choice (`rebase`), on that choice's values kept from one whole run."""

    graph: Graph
    calls: Sequence[Sequence[torch.Tensor]]
    metric: str = ""
    cost: CostModel | None = None
    sublayers: tuple[Sublayer, ...] = ()
    full: list[torch.Tensor] = field(default_factory=list)
    """The full graph's score per call: per-token log-likelihoods (perplexity), or first-output rows (divergence)."""
    evaluations: int = 0
    base: tuple[int, ...] | None = None
    base_values: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Every value of the graph with `base` removed, per call."""

    def __post_init__(self) -> None:
        if not self.calls:
            raise CompileError("layer skipping needs calibration inputs: give at least one call")
        self.sublayers = find_sublayers(self.graph)
        if not self.sublayers:
            raise CompileError("no residual sublayers found in this model: layer skipping applies to transformers "
                               "(residual adds around attention and feed-forward branches)")
        self.metric = self.metric or ("perplexity" if is_language_model(self.graph) else "divergence")
        if self.metric not in METRICS:
            raise CompileError(f"unknown skip metric {self.metric!r}: use one of {', '.join(METRICS)}")
        self.full = [self._score(run_graph(self.graph, call)[0], call) for call in self.calls]

    def _score(self, output: torch.Tensor, call: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.metric == "perplexity":
            return token_log_likelihoods(output, call[0])
        return output.detach().float().reshape(-1, output.shape[-1])

    def loss(self, removed: Collection[int]) -> float:
        """The loss of the graph with `removed` skipped, on every calibration call."""
        self.evaluations += 1
        graph = skip_sublayers(self.graph, removed, self.sublayers)
        start = self._start(removed)
        if start is None:
            scores = [self._score(run_graph(graph, call)[0], call) for call in self.calls]
        else:
            steps, downstream = _steps_from(graph, start)
            scores = [self._score(_run_steps(steps, downstream, dict(values), graph.outputs[0]), call)
                      for call, values in zip(self.calls, self.base_values)]
        return self.loss_of(scores)

    def loss_of(self, scores: Sequence[torch.Tensor]) -> float:
        """The loss of outputs scored like `full`, call by call."""
        if self.metric == "perplexity":
            full = torch.cat([score.flatten() for score in self.full]).mean()
            skipped = torch.cat([score.flatten() for score in scores]).mean()
            return math.expm1(float(full - skipped))
        cosines = torch.cat([torch.nn.functional.cosine_similarity(a, b, dim=-1) for a, b in zip(scores, self.full)])
        return float(1 - cosines.mean())

    def rebase(self, removed: Collection[int]) -> None:
        """Keep every value of the graph with `removed` skipped, for runs of candidates that remove more."""
        if any(node.definition.schema.is_mutable for node in self.graph.nodes):
            return  # a node writes into a value: kept values would not stay what they were
        graph = skip_sublayers(self.graph, removed, self.sublayers)
        steps, _ = _steps_from(graph, None)
        self.base_values = []
        for call in self.calls:
            env = dict(graph.weights)
            env.update((value.name, tensor) for value, tensor in zip(graph.inputs, call))
            with torch.no_grad():
                for step in steps:
                    results = step.run([env[name] for name in step.inputs], ())
                    env.update(zip(step.outputs, (results[position] for position in step.positions)))
            self.base_values.append(env)
        self.base = tuple(sorted(removed))

    def _start(self, removed: Collection[int]) -> str | None:
        """The value a run of `removed` can start from on the base's kept values (None: run it whole)."""
        if self.base is None or not set(self.base) < set(removed):
            return None
        first = min(set(removed) - set(self.base))
        passed = passed_through(self.base, self.sublayers)
        name = self.sublayers[first].stream_in
        return passed.get(name, name)

    def full_perplexity(self) -> float:
        """The full graph's perplexity on the calibration calls (0 unless the metric is perplexity)."""
        if self.metric != "perplexity":
            return 0.0
        return math.exp(-float(torch.cat([score.flatten() for score in self.full]).mean()))


def _steps_from(graph: Graph, start: str | None) -> tuple[tuple[Any, ...], set[str]]:
    """The graph's bound steps, and the nodes that read `start` or what was made from it (all, for None)."""
    from ..ir.schedule import schedule_of
    from ..runtime.executor import plan_steps

    steps = plan_steps(schedule_of(graph), graph)
    if start is None:
        return steps, {node.name for node in graph.nodes}
    reached, downstream = {start}, set()
    for node in graph.nodes:
        if reached.intersection(node.inputs):
            downstream.add(node.name)
            reached.update(value.name for value in node.outputs)
    return steps, downstream


def _run_steps(steps: Sequence[Any], downstream: set[str], env: dict[str, torch.Tensor], output: str) -> torch.Tensor:
    """Run the `downstream` steps on `env` (the values upstream of them already there); the value `output`."""
    with torch.no_grad():
        for step in steps:
            if step.node in downstream:
                results = step.run([env[name] for name in step.inputs], ())
                env.update(zip(step.outputs, (results[position] for position in step.positions)))
    return env[output]


def is_language_model(graph: Graph) -> bool:
    """Whether the graph reads token ids [batch, length] first and gives logits [batch, length, vocab] first: a
    vocabulary as large as the rows of the embedding table that looks those tokens up."""
    if not graph.inputs or not graph.outputs:
        return False
    tokens, logits = graph.inputs[0], graph.types()[graph.outputs[0]]
    if tokens.type.dtype.is_floating_point or len(tokens.type.shape) != 2 or len(logits.shape) != 3:
        return False
    weights = {value.name: value.type for value in graph.params}
    from_tokens = {tokens.name}
    for node in graph.nodes:
        if from_tokens & set(node.inputs) and node.op != "embedding":
            from_tokens.update(value.name for value in node.outputs)
    vocabularies = {weights[node.inputs[0]].shape[0] for node in graph.nodes
                    if node.op == "embedding" and node.inputs[0] in weights and from_tokens & set(node.inputs[1:])}
    return tuple(logits.shape[:2]) == tuple(tokens.type.shape) and logits.shape[-1] in vocabularies


def token_log_likelihoods(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The log-likelihood of each next token [batch, length - 1] under `logits` [batch, length, vocab]."""
    predicted = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return predicted.gather(-1, tokens[:, 1:].unsqueeze(-1).to(predicted.device)).squeeze(-1)


def run_graph(graph: Graph, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The graph's outputs on `inputs`, its nodes' reference ops run one by one (no plan, no kernels)."""
    from ..runtime.executor import Executor

    with torch.no_grad():
        return Executor(graph).interpret(list(inputs))


def measure_speedup(calibration: Calibration, removed: Collection[int], repeats: int = 5) -> float:
    """Wall time of the full graph over the skipped one's on the first calibration call, each run op by op on its
    reference ops where the calibration lives (median of `repeats` after one warm-up run, the two alternated)."""
    skipped = skip_sublayers(calibration.graph, removed, calibration.sublayers)
    call = calibration.calls[0]
    synchronize = torch.cuda.synchronize if any(tensor.is_cuda for tensor in call) else (lambda: None)
    times: dict[int, list[float]] = {0: [], 1: []}
    for repeat in range(repeats + 1):
        for which, graph in enumerate((calibration.graph, skipped)):
            synchronize()
            started = time.perf_counter()
            run_graph(graph, call)
            synchronize()
            if repeat:
                times[which].append(time.perf_counter() - started)
    return statistics.median(times[0]) / statistics.median(times[1])


# ---------------------------------------------------------------------------------------------
# The scorers

def curve(calibration: Calibration, method: str, *, max_flops: float = 0.5, budget: float = math.inf) -> list[SkipPoint]:
    """The scorer's removals in order, each point with what is removed so far, until `max_flops` of the model's
    FLOPs are removed or no removal keeps the calibration loss within `budget`. The first point removes nothing."""
    if method not in METHODS:
        raise CompileError(f"unknown layer-skip method {method!r}: use one of {', '.join(METHODS)}")
    price = _Pricing(calibration)
    points = [SkipPoint((), 0.0, 0.0, 0.0)]
    if method == "bi":
        for group in _bi_order(calibration):
            removed = tuple(sorted({*points[-1].removed, *group}))
            point = price.point(removed, calibration.loss(removed))
            if point.loss > budget:
                break
            points.append(point)
            if point.flops_removed >= max_flops:
                break
        return points
    singles = [(sublayer.index,) for sublayer in calibration.sublayers]
    grouped = blocks(calibration.sublayers)
    candidates = {"sleb": grouped[1:-1] if len(grouped) > 2 else grouped, "finercut": singles, "ember": singles}[method]
    score = _saved_per_loss if method == "ember" else _least_loss
    stale: dict[tuple[int, ...], float] | None = {} if method in LAZY else None
    with task(f"layer skipping: {method} over {len(calibration.sublayers)} sublayers"):
        while points[-1].flops_removed < max_flops:
            calibration.rebase(points[-1].removed)
            chosen = _greedy(calibration, price, points[-1], candidates, score, budget, stale)
            if chosen is None:
                break
            points.append(chosen)
            log.info("%s: removed %s, %.1f%% of FLOPs, loss %.4f (%d runs so far)", method, chosen.removed,
                     100 * chosen.flops_removed, chosen.loss, calibration.evaluations)
    return points


def plan(calibration: Calibration, budget: float, method: str = "ember", *, max_flops: float = 0.9) -> SkipPlan:
    """The scorer's largest removal whose calibration loss keeps within `budget`. A budget of 0 removes nothing,
    even a removal that happens to lower the calibration loss: it asks for the model's own results."""
    if not budget >= 0:
        raise CompileError(f"a skip budget is a loss of 0 or more, not {budget}")
    if budget == 0:
        return make_plan(calibration, method, budget, SkipPoint((), 0.0, 0.0, 0.0))
    points = curve(calibration, method, max_flops=max_flops, budget=budget)
    return make_plan(calibration, method, budget, points[-1])


def make_plan(calibration: Calibration, method: str, budget: float, point: SkipPoint) -> SkipPlan:
    """The plan that removes `point.removed`, with its numbers."""
    sublayers = calibration.sublayers
    return SkipPlan(method, calibration.metric, budget, len(sublayers), point.removed,
                    tuple(f"{sublayers[i].label} ({sublayers[i].kind})" for i in point.removed),
                    point.flops_removed, 1 / max(1 - point.time_removed, 1e-9), calibration.full_perplexity(),
                    point.loss)


class _Pricing:
    """FLOPs and predicted time of each node of the calibration graph, and of the nodes a skip set removes."""

    def __init__(self, calibration: Calibration):
        self.calibration = calibration
        cost = calibration.cost or CostModel(_reference_profile())
        self.costs = cost.nodes(calibration.graph)
        self.flops = sum(c.flops for c in self.costs.values()) or 1
        self.time = sum(c.predicted_us for c in self.costs.values()) or 1.0
        self._removed: dict[tuple[int, ...], tuple[float, float]] = {}

    def removed(self, removed: Collection[int]) -> tuple[float, float]:
        """(share of FLOPs, share of predicted time) the skip set removes."""
        key = tuple(sorted(removed))
        if key not in self._removed:
            graph = self.calibration.graph
            kept = {node.name for node in skip_sublayers(graph, key, self.calibration.sublayers).nodes}
            gone = [self.costs[node.name] for node in graph.nodes if node.name not in kept]
            self._removed[key] = (sum(c.flops for c in gone) / self.flops, sum(c.predicted_us for c in gone) / self.time)
        return self._removed[key]

    def point(self, removed: Sequence[int], loss: float) -> SkipPoint:
        flops, time = self.removed(removed)
        return SkipPoint(tuple(sorted(removed)), flops, time, loss)


def _bi_order(calibration: Calibration) -> list[tuple[int, ...]]:
    """Blocks by Block Influence, lowest first (ShortGPT): how little a block turns the stream."""
    sublayers = calibration.sublayers
    grouped = blocks(sublayers)
    names = sorted({name for group in grouped for name in (sublayers[group[0]].stream_in, sublayers[group[-1]].stream_out)})
    probe = _with_outputs(calibration.graph, names)
    influence = torch.zeros(len(grouped), dtype=torch.float64)
    for call in calibration.calls:
        values = dict(zip(probe.outputs, run_graph(probe, call)))
        for index, group in enumerate(grouped):
            before, after = values[sublayers[group[0]].stream_in], values[sublayers[group[-1]].stream_out]
            before, after = before.float().reshape(-1, before.shape[-1]), after.float().reshape(-1, before.shape[-1])
            influence[index] += float(1 - torch.nn.functional.cosine_similarity(before, after, dim=-1).mean())
    order = sorted(range(len(grouped)), key=lambda index: float(influence[index]))
    log.info("block influence: %s", ", ".join(f"{i}: {float(influence[i]) / len(calibration.calls):.4f}" for i in order))
    return [grouped[index] for index in order]


def _greedy(calibration: Calibration, price: _Pricing, current: SkipPoint, candidates: Sequence[tuple[int, ...]],
            score: Callable[[SkipPoint, SkipPoint], float], budget: float,
            stale: dict[tuple[int, ...], float] | None) -> SkipPoint | None:
    """The candidate (a group of sublayers) whose removal on top of `current` scores best, among those keeping
    within `budget`; None when none is left. With `stale` (each candidate's score when last run), lazily: run
    candidates best stale score first and stop at one that still beats every stale score left (Minoux's
    accelerated greedy: exact while a removal's score only falls as more is removed)."""
    left = [group for group in candidates if not set(group) <= set(current.removed)]
    if stale is not None:
        left.sort(key=lambda group: -stale.get(group, math.inf))
    best: tuple[float, SkipPoint] | None = None
    for position, group in enumerate(left):
        removed = tuple(sorted({*current.removed, *group}))
        point = price.point(removed, calibration.loss(removed))
        fresh = score(current, point) if point.loss <= budget else -math.inf
        if stale is not None:
            stale[group] = fresh
        if fresh > -math.inf and (best is None or fresh > best[0]):
            best = (fresh, point)
        following = left[position + 1] if position + 1 < len(left) else None
        if stale is not None and best is not None and (following is None or best[0] >= stale.get(following, math.inf)):
            break
    return None if best is None else best[1]


def _least_loss(current: SkipPoint, point: SkipPoint) -> float:
    return -point.loss


def _saved_per_loss(current: SkipPoint, point: SkipPoint) -> float:
    """Predicted time saved per unit of calibration loss added (FLAT_LOSS at least)."""
    return (point.time_removed - current.time_removed) / max(point.loss - current.loss, FLAT_LOSS)


def _with_outputs(graph: Graph, names: Sequence[str]) -> Graph:
    return dataclasses.replace(graph, outputs=tuple(names))


def _reference_profile():
    from .cost import load_profile
    from .pipeline import REFERENCE_PROFILE

    return load_profile(REFERENCE_PROFILE)


__all__ = ["Calibration", "FLAT_LOSS", "LayerSkip", "as_layer_skip", "METHODS", "METRICS", "SkipPlan", "SkipPoint", "curve", "is_language_model",
           "make_plan", "plan", "run_graph", "token_log_likelihoods"]
