"""Routing traces of mixture-of-experts models: which experts each token chose at each MoE layer.

One format for traces ember records and for the shared JSON ones: `experts[token, layer, k]` expert ids (the
router's top-k, best first) and, when known, `weights[token, layer, k]` the gate weights. Expert placement
fits on the transition counts between consecutive layers' experts, never on the tokens themselves.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import PlanError

log = logging.getLogger(__name__)

FORMAT = "ember-routing-trace"


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """The experts chosen by `tokens` tokens at each of `layers` MoE layers, top-`k`, among `num_experts`."""

    name: str
    experts: torch.Tensor
    """int64 [tokens, layers, k]: token t's experts at layer l, the router's best first."""
    num_experts: int
    weights: torch.Tensor | None = None
    """float32 [tokens, layers, k], the gate weights of those experts; None when the source has none."""

    def __post_init__(self) -> None:
        check_trace(self)

    @property
    def tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def layers(self) -> int:
        return self.experts.shape[1]

    @property
    def k(self) -> int:
        return self.experts.shape[2]


def check_trace(trace: RoutingTrace) -> None:
    """Raise PlanError unless the trace is well formed: 3-d integer experts within range, weights alike."""
    experts = trace.experts
    if experts.dim() != 3 or experts.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise PlanError(f"trace {trace.name!r}: experts must be an integer tensor [tokens, layers, k], "
                        f"got {experts.dtype} of shape {tuple(experts.shape)}")
    if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= trace.num_experts):
        raise PlanError(f"trace {trace.name!r}: expert ids must lie in [0, {trace.num_experts}), found "
                        f"{int(experts.min())}..{int(experts.max())}")
    if trace.weights is not None and trace.weights.shape != experts.shape:
        raise PlanError(f"trace {trace.name!r}: weights of shape {tuple(trace.weights.shape)} do not match "
                        f"experts of shape {tuple(experts.shape)}")


def load_trace(path: str | Path, num_experts: int | None = None) -> RoutingTrace:
    """The trace at `path`: ember's safetensors format, or the shared JSON one ({"layer": [[e, ...] per token]}).
    `num_experts` defaults to what the file says (JSON: one more than the largest id seen)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"no routing trace at {path}")
    if path.suffix == ".json":
        return _load_json(path, num_experts)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise PlanError(f"{path} is not a routing trace (JSON or ember's safetensors): {error}") from error
    if metadata.get("format") != FORMAT or "experts" not in tensors:
        raise PlanError(f"{path} is a safetensors file but not an ember routing trace (format {metadata.get('format')!r})")
    try:
        count = num_experts or int(metadata["num_experts"])
    except (KeyError, ValueError) as error:
        raise PlanError(f"{path}: the trace's metadata gives no expert count ({error})") from error
    return RoutingTrace(metadata.get("name", path.stem), tensors["experts"].long(), count, tensors.get("weights"))


def _load_json(path: Path, num_experts: int | None) -> RoutingTrace:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlanError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not data:
        raise PlanError(f"{path}: a routing trace is an object from layer index to per-token expert lists")
    try:
        layers = sorted(data, key=int)
        experts = torch.tensor([data[layer] for layer in layers])
    except (ValueError, TypeError) as error:
        raise PlanError(f"{path}: every layer must list the same number of tokens, each with the same number of "
                        f"experts ({error})") from error
    if experts.dim() == 2:
        experts = experts.unsqueeze(-1)
    if experts.dim() != 3:
        raise PlanError(f"{path}: expected [layers][tokens][k] expert ids, got shape {tuple(experts.shape)}")
    experts = experts.permute(1, 0, 2).contiguous()
    if not experts.numel():
        raise PlanError(f"{path}: the trace lists no expert ids")
    if experts.is_floating_point() or experts.dtype == torch.bool:
        raise PlanError(f"{path}: expert ids must be integers, found {experts.dtype}")
    if [int(layer) for layer in layers] != list(range(len(layers))):
        raise PlanError(f"{path}: layers must be numbered 0..{len(layers) - 1} with none missing, found {layers}")
    experts = experts.long()
    return RoutingTrace(path.stem, experts, num_experts or int(experts.max()) + 1)


def save_trace(trace: RoutingTrace, path: str | Path) -> Path:
    """Write `trace` as safetensors (experts, and weights when known) with its name and expert count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"experts": trace.experts.to(torch.int64).contiguous()}
    if trace.weights is not None:
        tensors["weights"] = trace.weights.float().contiguous()
    save_file(tensors, str(path), metadata={"format": FORMAT, "name": trace.name, "num_experts": str(trace.num_experts)})
    return path


def compatible(traces: Sequence[RoutingTrace]) -> tuple[int, int]:
    """(layers, num_experts) shared by `traces`; PlanError when they differ or there are none."""
    if not traces:
        raise PlanError("no routing traces given")
    shapes = {(trace.layers, trace.num_experts) for trace in traces}
    if len(shapes) != 1:
        raise PlanError("routing traces differ in layers or experts: "
                        + ", ".join(f"{t.name}: {t.layers} layers x {t.num_experts} experts" for t in traces))
    return shapes.pop()


def transitions(traces: Sequence[RoutingTrace], k: int = 1) -> torch.Tensor:
    """float64 [layers - 1, E, E]: how many times a token used expert i at layer l and expert j at layer l + 1,
    over each token's top-`k` at both layers (k * k pairs per token and step), summed over `traces`."""
    layers, num_experts = compatible(traces)
    counts = torch.zeros(max(layers - 1, 0), num_experts * num_experts, dtype=torch.float64)
    for trace in traces:
        chosen = trace.experts[:, :, :k].long()
        pairs = chosen[:, :-1, :, None] * num_experts + chosen[:, 1:, None, :]   # [tokens, layers-1, k, k]
        pairs = pairs.permute(1, 0, 2, 3).reshape(max(layers - 1, 0), trace.tokens * k * k)
        counts.scatter_add_(1, pairs, torch.ones_like(pairs, dtype=torch.float64))
    return counts.view(-1, num_experts, num_experts)


def loads(traces: Sequence[RoutingTrace], k: int | None = None) -> torch.Tensor:
    """float64 [layers, E]: tokens routed to each expert at each layer (each token's top-`k`, all by default)."""
    layers, num_experts = compatible(traces)
    counts = torch.zeros(layers, num_experts, dtype=torch.float64)
    for trace in traces:
        chosen = trace.experts[:, :, :k].long().permute(1, 0, 2).reshape(layers, -1)
        counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=torch.float64))
    return counts


def synthetic_trace(num_experts: int, layers: int, k: int, tokens: int, affinity: float, *, skew: float = 1.0,
                    seed: int = 0, sample_seed: int | None = None, name: str | None = None) -> RoutingTrace:
    """A DeepSeek-like trace with controlled inter-layer affinity: each expert has a few favoured successors,
    and a token's top-1 at layer l + 1 is one of its top-1's favoured successors with probability `affinity`,
    else drawn from the layer's popularity (Zipf with exponent `skew`, so some experts run hot). The other k - 1
    experts follow popularity. `seed` makes the model (popularity, successors), `sample_seed` (default: drawn on from `seed`)
    its tokens: two sample seeds are two token sets from one model, to fit on one and score on the other."""
    if not 0.0 <= affinity <= 1.0 or k > num_experts or min(num_experts, layers, k, tokens) < 1:
        raise PlanError(f"synthetic trace: need 0 <= affinity <= 1 and 1 <= k <= experts, got affinity {affinity}, "
                        f"k {k}, {num_experts} experts, {layers} layers, {tokens} tokens")
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    popularity = torch.stack([(ranks ** -skew)[torch.randperm(num_experts, generator=generator)] for _ in range(layers)])
    popularity /= popularity.sum(-1, keepdim=True)
    successors = torch.stack([torch.randint(num_experts, (num_experts, 2), generator=generator) for _ in range(layers)])
    if sample_seed is not None:
        generator = torch.Generator().manual_seed(sample_seed + 1_000_003)
    experts = torch.empty(tokens, layers, k, dtype=torch.int64)
    for layer in range(layers):
        scores = torch.rand(tokens, num_experts, generator=generator, dtype=torch.float64).log() / popularity[layer]
        chosen = scores.topk(k, dim=-1).indices   # a weighted sample without replacement (exponential race)
        if layer:
            follow = torch.rand(tokens, generator=generator) < affinity
            pick = torch.randint(2, (tokens,), generator=generator)
            favoured = successors[layer, experts[:, layer - 1, 0], pick]
            clash = (chosen == favoured[:, None]) & follow[:, None]
            rest = torch.where(clash, chosen[:, -1:].expand_as(chosen), chosen)   # drop the favoured one if drawn
            chosen = torch.where(follow[:, None], torch.cat([favoured[:, None], rest[:, :k - 1]], 1), chosen)
        experts[:, layer] = chosen
    return RoutingTrace(name or f"synthetic-{num_experts}e-top{k}-a{affinity:g}", experts, num_experts)
