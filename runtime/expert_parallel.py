"""Expert-parallel execution of mixture-of-experts layers over torch.distributed, with the traffic it really sends.

Each rank holds only the experts a placement (`placement[layer][expert] = rank`) gives it. Per layer a token goes,
in one all-to-all, to every other rank holding one of its experts, and the weighted partial sums come back, in a
second, to its next home: its home again (mode "return", classic expert parallelism) or the rank of its top-1
expert (mode "stay", ExFlow's design), so tokens stop travelling when consecutive layers' experts share a rank.
The model is token-local (RMSNorm, router, SwiGLU experts, residual; no attention): ExFlow's all-gather of the
context for attention is out of scope.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..errors import InputError, PlanError
from ..ir.plans import home_ranks
from ..tolerance import result_tolerance

log = logging.getLogger(__name__)

MODES = ("return", "stay")
NORM_EPS = 1e-6
_SEED_STRIDE = 1_000_003
"""Seeds of one model's weight streams: seed * stride + stream; stream 0 the norms and routers, 1 + 3 * (l * E + e)
and the next two expert e of layer l's w1, w3, w2."""


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """A stack of `layers` MoE layers of `experts` SwiGLU experts (hidden -> ffn -> hidden), top-`k` routing."""

    hidden: int
    ffn: int
    experts: int
    layers: int
    k: int


@dataclass(frozen=True, eq=False, slots=True)
class ExpertWeights:
    """One SwiGLU expert: w2(silu(w1 x) * w3 x)."""

    w1: torch.Tensor
    """[ffn, hidden]"""
    w3: torch.Tensor
    """[ffn, hidden]"""
    w2: torch.Tensor
    """[hidden, ffn]"""


def _normal(shape: tuple[int, ...], std: float, seed: int, stream: int, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed * _SEED_STRIDE + stream)
    return (torch.randn(shape, generator=generator, device=device) * std).to(dtype)


def shared_weights(config: MoEConfig, seed: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm weights [layers, hidden], router weights [layers, experts, hidden]), which every rank holds."""
    generator = torch.Generator(device=device).manual_seed(seed * _SEED_STRIDE)
    norms = 1 + 0.1 * torch.randn(config.layers, config.hidden, generator=generator, device=device)
    routers = torch.randn(config.layers, config.experts, config.hidden, generator=generator, device=device)
    return norms.to(dtype), (routers * config.hidden ** -0.5).to(dtype)


def expert_weights(config: MoEConfig, seed: int, layer: int, expert: int, device: torch.device,
                   dtype: torch.dtype) -> ExpertWeights:
    """Expert `expert` of layer `layer`, drawn from a stream of its own: any rank makes the same weights alone."""
    stream = 1 + 3 * (layer * config.experts + expert)
    shape_in, shape_out = (config.ffn, config.hidden), (config.hidden, config.ffn)
    return ExpertWeights(_normal(shape_in, config.hidden ** -0.5, seed, stream, device, dtype),
                         _normal(shape_in, config.hidden ** -0.5, seed, stream + 1, device, dtype),
                         _normal(shape_out, 0.5 * config.ffn ** -0.5, seed, stream + 2, device, dtype))


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm of each token, computed in float32 (float64 stays float64), returned in hidden's dtype."""
    wide = hidden.to(_gate_dtype(hidden.dtype))
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + NORM_EPS)).to(hidden.dtype) * weight


def route(x: torch.Tensor, router: torch.Tensor, k: int,
          forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts int64 [tokens, k] best first, gates [tokens, k] summing to 1 per token) as Mixtral routes: softmax
    over the router's logits, top-k (or the `forced` experts), probabilities renormalised over the k."""
    probabilities = F.softmax(x @ router.T, dim=-1, dtype=_gate_dtype(x.dtype))
    experts = probabilities.topk(k, dim=-1).indices if forced is None else forced.long()
    gates = probabilities.gather(1, experts)
    return experts, gates / gates.sum(-1, keepdim=True)


def expert_ffn(x: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for each row of x."""
    return (F.silu(x @ weights.w1.T) * (x @ weights.w3.T)) @ weights.w2.T


def _gate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix_experts(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, weights: dict[int, ExpertWeights],
                 num_experts: int) -> torch.Tensor:
    """sum over the rows' chosen experts found in `weights` of gate * expert(x); zero where none is found. The
    (row, slot) pairs are grouped by expert with one sort and one read of the counts."""
    mixed = torch.zeros_like(x)
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    ends = torch.bincount(flat, minlength=num_experts).cumsum(0).tolist()
    for expert, expert_w in weights.items():
        pairs = order[(ends[expert - 1] if expert else 0):ends[expert]]
        if pairs.numel():
            rows, slots = pairs // experts.shape[1], pairs % experts.shape[1]
            mixed.index_add_(0, rows, expert_ffn(x[rows], expert_w) * gates[rows, slots, None].to(x.dtype))
    return mixed


class MoEStack(nn.Module):
    """The one-device reference: `layers` times h = h + moe(rms_norm(h)), every expert on one device."""

    def __init__(self, config: MoEConfig, *, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        device = torch.device(device)
        self.config = config
        self.norms, self.routers = shared_weights(config, seed, device, dtype)
        self.experts = [{e: expert_weights(config, seed, layer, e, device, dtype) for e in range(config.experts)}
                        for layer in range(config.layers)]

    def forward(self, hidden: torch.Tensor, routing: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states [tokens, hidden] after every layer; `routing` int64 [tokens, layers, k] forces the
        experts (gates are then their renormalised router probabilities)."""
        return self.forward_with_routing(hidden, routing)[0]

    def forward_with_routing(self, hidden: torch.Tensor,
                             routing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward's result, the experts chosen int64 [tokens, layers, k])."""
        check_routing(routing, hidden.shape[0], self.config)
        chosen = []
        for layer in range(self.config.layers):
            x = rms_norm(hidden, self.norms[layer])
            forced = None if routing is None else routing[:, layer]
            experts, gates = route(x, self.routers[layer], self.config.k, forced)
            hidden = hidden + _mix_experts(x, experts, gates, self.experts[layer], self.config.experts)
            chosen.append(experts)
        return hidden, torch.stack(chosen, 1)


def check_placement(placement: Sequence[Sequence[int]], config: MoEConfig, world: int) -> torch.Tensor:
    """The placement as int64 [layers, experts]; PlanError unless it gives every expert of every layer a rank
    in [0, world)."""
    if len(placement) != config.layers or any(len(row) != config.experts for row in placement):
        shape = [len(row) for row in placement]
        raise PlanError(f"placement must list {config.layers} layers of {config.experts} experts' ranks, got "
                        f"{len(placement)} layers of {shape} experts; build it for this model's config")
    for layer, row in enumerate(placement):
        for expert, rank in enumerate(row):
            if not isinstance(rank, int) or rank < 0:
                raise PlanError(f"placement: expert {expert} of layer {layer} is placed nowhere ({rank!r}); "
                                f"every expert needs one rank (no replicas)")
            if rank >= world:
                raise PlanError(f"placement: expert {expert} of layer {layer} is on rank {rank}, outside the "
                                f"world of {world} ranks; plan for {world} ranks")
    return torch.tensor(placement, dtype=torch.int64)


def check_routing(routing: torch.Tensor | None, tokens: int, config: MoEConfig) -> None:
    """InputError unless `routing` is None or integer [tokens, layers, k] expert ids in [0, experts)."""
    if routing is None:
        return
    expected = (tokens, config.layers, config.k)
    if routing.dtype.is_floating_point or routing.dtype == torch.bool or tuple(routing.shape) != expected:
        raise InputError(f"routing must be integer expert ids of shape {expected} [tokens, layers, k], got "
                         f"{routing.dtype} of shape {tuple(routing.shape)}")
    if routing.numel() and (int(routing.min()) < 0 or int(routing.max()) >= config.experts):
        raise InputError(f"routing: expert ids must lie in [0, {config.experts}), found "
                         f"{int(routing.min())}..{int(routing.max())}")


@dataclass(frozen=True, eq=False)
class ExpertParallelMoE:
    """One rank's share of an MoE stack: the replicated norms and routers, and only the experts placed here."""

    config: MoEConfig
    placement: torch.Tensor
    """int64 [layers, experts] on `device`: the rank of each expert."""
    rank: int
    world: int
    norms: torch.Tensor
    routers: torch.Tensor
    experts: tuple[dict[int, ExpertWeights], ...]
    """Per layer, the experts this rank holds, by id."""
    group: dist.ProcessGroup | None = None

    @property
    def device(self) -> torch.device:
        return self.norms.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norms.dtype


def build_expert_parallel(config: MoEConfig, placement: Sequence[Sequence[int]], *, seed: int = 0,
                          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          group: dist.ProcessGroup | None = None) -> ExpertParallelMoE:
    """This rank's share of the `MoEStack(config, seed=seed)` weights, made on `device` (only its own experts)."""
    device = torch.device(device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ranks = check_placement(placement, config, world)
    norms, routers = shared_weights(config, seed, device, dtype)
    experts = tuple({e: expert_weights(config, seed, layer, e, device, dtype)
                     for e in range(config.experts) if placement[layer][e] == rank} for layer in range(config.layers))
    log.debug("rank %d holds %d of %d experts", rank, sum(map(len, experts)), config.layers * config.experts)
    return ExpertParallelMoE(config, ranks.to(device), rank, world, norms, routers, experts, group)


def home_tokens(tokens: int, world: int, rank: int) -> torch.Tensor:
    """int64 ids of the tokens homed on `rank` at the start (ir.plans.home_ranks, as the simulator assumes)."""
    return torch.arange(tokens)[home_ranks(tokens, world) == rank]


@dataclass(frozen=True, slots=True)
class LayerTraffic:
    """One layer of one step: rows each rank sent, their payload bytes (rows * hidden * element size), and the
    slowest rank's seconds. With home(t) token t's rank entering the layer (t * world // tokens at layer 0) and
    holders(t) the distinct ranks of its k experts here:
    dispatch: home(t) sends t once to each rank of holders(t) - {home(t)};
    combine: each rank of holders(t) - {next(t)} sends one partial sum to next(t), where next(t) = home(t) in
    mode "return" and the rank of t's top-1 expert in mode "stay"; home(t) at the next layer is next(t)."""

    layer: int
    dispatch_tokens: tuple[int, ...]
    combine_tokens: tuple[int, ...]
    dispatch_bytes: tuple[int, ...]
    combine_bytes: tuple[int, ...]
    dispatch_s: float
    """Exchanging the counts, then the all-to-all of the hidden states."""
    expert_s: float
    """Unpacking what arrived and running this rank's experts."""
    combine_s: float
    """The all-to-all of the partial sums and adding them at the next home."""
    layer_s: float
    """The whole layer: norm and router at home, dispatch, experts, combine."""


@dataclass(frozen=True, slots=True)
class StepStats:
    """All layers of one step, in `mode`, over `world` ranks."""

    mode: str
    tokens: int
    world: int
    layers: tuple[LayerTraffic, ...]
    step_s: float
    """The slowest rank's seconds from the first layer's start to the last layer's end."""
    metadata_bytes_per_row: int
    """Dispatch rows also carry the token id, its experts and gates; not counted in dispatch_bytes."""


@dataclass(frozen=True, eq=False)
class EPOutput:
    """The tokens this rank homes after the last layer (ids ascending), their hidden states, and the step's stats."""

    token_ids: torch.Tensor
    hidden: torch.Tensor
    stats: StepStats


class _Clock:
    """Marks in time: CUDA events on a GPU (read after one synchronise), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> int:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self, start: int, end: int) -> float:
        if self.cuda:
            return self.marks[start].elapsed_time(self.marks[end]) / 1e3
        return self.marks[end] - self.marks[start]

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _pack(hidden: torch.Tensor, ids: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Rows of [hidden | token id, experts, float64 gates as bits, viewed in hidden's dtype], for one all-to-all."""
    metadata = torch.cat([ids[:, None], experts, gates.to(torch.float64).view(torch.int64)], 1)
    return torch.cat([hidden, metadata.view(hidden.dtype)], 1)


def _unpack(rows: torch.Tensor, hidden: int, k: int) -> tuple[torch.Tensor, ...]:
    """(hidden states, token ids, experts, float64 gates) from rows that _pack made."""
    metadata = rows[:, hidden:].contiguous().view(torch.int64)
    return rows[:, :hidden], metadata[:, 0], metadata[:, 1:1 + k], metadata[:, 1 + k:].view(torch.float64)


def _ranks_mask(ranks: torch.Tensor, world: int, exclude: int) -> torch.Tensor:
    """bool [rows, world]: which ranks appear in each row of `ranks`, rank `exclude` never."""
    mask = torch.zeros(ranks.shape[0], world, dtype=torch.bool, device=ranks.device)
    mask.scatter_(1, ranks, True)
    mask[:, exclude] = False
    return mask


def _all_to_all(rows: torch.Tensor, send_counts: list[int], receive_counts: list[int],
                group: dist.ProcessGroup | None) -> torch.Tensor:
    received = rows.new_empty(sum(receive_counts), rows.shape[1])
    dist.all_to_all_single(received, rows.contiguous(), receive_counts, send_counts, group=group)
    return received


def ep_forward(model: ExpertParallelMoE, hidden: torch.Tensor, tokens: int, routing: torch.Tensor | None = None,
               *, mode: str = "stay") -> EPOutput:
    """Run every layer over the ranks. `hidden` [n, hidden] holds this rank's home tokens `home_tokens(tokens, ...)`;
    `routing` (int64 [tokens, layers, k], the same on every rank) forces the experts. Collective: every rank calls.
    The host waits on the device three times a layer: the uneven split sizes of both all-to-alls, and the expert
    counts that group the rows."""
    config, rank, world, group = model.config, model.rank, model.world, model.group
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ids = home_tokens(tokens, world, rank).to(model.device)
    if tuple(hidden.shape) != (ids.numel(), config.hidden) or hidden.dtype != model.dtype:
        raise InputError(f"rank {rank} homes {ids.numel()} of {tokens} tokens: hidden must be {model.dtype} "
                         f"[{ids.numel()}, {config.hidden}], got {hidden.dtype} {tuple(hidden.shape)}")
    check_routing(routing, tokens, config)
    if routing is not None:
        routing = routing.to(model.device, torch.int64)
    row_bytes = config.hidden * hidden.dtype.itemsize
    clock, marks, counts = _Clock(model.device), [], []
    for layer in range(config.layers):
        start = clock.mark()
        x = rms_norm(hidden, model.norms[layer])
        forced = None if routing is None else routing[ids, layer]
        experts, gates = route(x, model.routers[layer], config.k, forced)
        needs = _ranks_mask(model.placement[layer][experts], world, rank)
        to_rank, rows = needs.T.nonzero(as_tuple=True)
        payload = _pack(hidden[rows], ids[rows], experts[rows], gates[rows])
        dispatch_start = clock.mark()
        send = needs.sum(0)
        receive = torch.empty_like(send)
        dist.all_to_all_single(receive, send, group=group)
        send_counts, receive_counts = send.tolist(), receive.tolist()
        arrived = _unpack(_all_to_all(payload, send_counts, receive_counts, group), config.hidden, config.k)
        dispatch_end = clock.mark()

        work_ids = torch.cat([ids, arrived[1]])
        order = work_ids.argsort()
        work_ids = work_ids[order]
        work_hidden = torch.cat([hidden, arrived[0]])[order]
        work_x = torch.cat([x, rms_norm(arrived[0], model.norms[layer])])[order]
        work_experts = torch.cat([experts, arrived[2]])[order]
        work_gates = torch.cat([gates, arrived[3].to(gates.dtype)])[order]
        partial = _mix_experts(work_x, work_experts, work_gates, model.experts[layer], config.experts)
        experts_end = clock.mark()

        work_ranks = model.placement[layer][work_experts]
        if mode == "return":
            next_home = work_ids * world // tokens
        else:
            next_home = work_ranks[:, 0]
        computed_here = (work_ranks == rank).any(1)
        sends = torch.zeros(work_ids.numel(), world, dtype=torch.bool, device=model.device)
        sends.scatter_(1, next_home[:, None], computed_here[:, None])
        sends[:, rank] = False
        to_rank, rows = sends.T.nonzero(as_tuple=True)
        keep = next_home == rank
        ids, hidden = work_ids[keep], work_hidden[keep] + partial[keep]
        incoming = _ranks_mask(work_ranks[keep], world, rank)
        from_rank, positions = incoming.T.nonzero(as_tuple=True)
        combine_start = clock.mark()
        combine_send, combine_receive = sends.sum(0).tolist(), incoming.sum(0).tolist()
        received = _all_to_all(partial[rows], combine_send, combine_receive, group)
        hidden = hidden.index_add(0, positions, received)
        end = clock.mark()
        marks.append((start, dispatch_start, dispatch_end, experts_end, combine_start, end))
        counts.append((sum(send_counts), sum(combine_send)))
    clock.finish()
    seconds = [(clock.seconds(d0, d1), clock.seconds(d1, e1), clock.seconds(c0, c1), clock.seconds(s, c1))
               for s, d0, d1, e1, c0, c1 in marks]
    step_s = clock.seconds(marks[0][0], marks[-1][-1]) if marks else 0.0
    stats = _gather_stats(model, mode, tokens, counts, seconds, step_s, row_bytes)
    return EPOutput(ids, hidden, stats)


def _gather_stats(model: ExpertParallelMoE, mode: str, tokens: int, counts: list[tuple[int, int]],
                  seconds: list[tuple[float, ...]], step_s: float, row_bytes: int) -> StepStats:
    """Every rank's counts and times, gathered: rows and bytes per rank, the slowest rank's seconds."""
    local = torch.tensor([[*c, *s, step_s] for c, s in zip(counts, seconds)], dtype=torch.float64,
                         device=model.device).reshape(len(counts), 7)
    everyone = [torch.empty_like(local) for _ in range(model.world)]
    dist.all_gather(everyone, local, group=model.group)
    table = torch.stack(everyone).cpu()   # [world, layers, 7]
    layers = []
    for layer in range(len(counts)):
        dispatch = tuple(int(v) for v in table[:, layer, 0])
        combine = tuple(int(v) for v in table[:, layer, 1])
        slowest = table[:, layer, 2:6].max(0).values.tolist()
        layers.append(LayerTraffic(layer, dispatch, combine, tuple(n * row_bytes for n in dispatch),
                                   tuple(n * row_bytes for n in combine), *slowest))
    slowest_step = float(table[:, 0, 6].max()) if counts else 0.0
    return StepStats(mode, tokens, model.world, tuple(layers), slowest_step,
                     8 * (1 + 2 * model.config.k))


def gather_hidden(model: ExpertParallelMoE, output: EPOutput, tokens: int) -> torch.Tensor:
    """The final hidden states of all `tokens` tokens in their original order [tokens, hidden], on every rank."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=model.device) for _ in range(model.world)]
    dist.all_gather(sizes, torch.tensor([output.token_ids.numel()], device=model.device), group=model.group)
    longest = max(int(size) for size in sizes)
    ids = torch.full((longest,), -1, dtype=torch.int64, device=model.device)
    ids[:output.token_ids.numel()] = output.token_ids
    hidden = output.hidden.new_zeros(longest, model.config.hidden)
    hidden[:output.hidden.shape[0]] = output.hidden
    all_ids = [torch.empty_like(ids) for _ in range(model.world)]
    all_hidden = [torch.empty_like(hidden) for _ in range(model.world)]
    dist.all_gather(all_ids, ids, group=model.group)
    dist.all_gather(all_hidden, hidden, group=model.group)
    result = hidden.new_empty(tokens, model.config.hidden)
    for ids, rows in zip(all_ids, all_hidden):
        present = ids >= 0
        result[ids[present]] = rows[present]
    return result


def measure_steps(model: ExpertParallelMoE, hidden: torch.Tensor, tokens: int, routing: torch.Tensor | None = None,
                  *, mode: str = "stay", warmup: int = 1, repeats: int = 5) -> list[StepStats]:
    """The stats of `repeats` steps after `warmup` untimed ones, the ranks lined up before each step."""
    line_up = torch.zeros(1, device=model.device)
    steps = []
    for step in range(warmup + repeats):
        dist.all_reduce(line_up, group=model.group)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        stats = ep_forward(model, hidden, tokens, routing, mode=mode).stats
        if step >= warmup:
            steps.append(stats)
    return steps


def median_stats(steps: Sequence[StepStats]) -> StepStats:
    """One StepStats with the median of each time over `steps` (the traffic is the first step's)."""
    if not steps:
        raise ValueError("median_stats needs at least one step")
    layers = tuple(replace(layer, **{name: statistics.median(getattr(s.layers[i], name) for s in steps)
                                     for name in ("dispatch_s", "expert_s", "combine_s", "layer_s")})
                   for i, layer in enumerate(steps[0].layers))
    return replace(steps[0], layers=layers, step_s=statistics.median(s.step_s for s in steps))


def reference_error(config: MoEConfig, placement: Sequence[Sequence[int]], tokens: int, *, mode: str = "stay",
                    seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    routing: torch.Tensor | None = None,
                    group: dist.ProcessGroup | None = None) -> tuple[float, float]:
    """(max |expert-parallel result - one-device MoEStack result|, the error allowed for dtype) on random hidden
    states, both built from `seed`. Collective: every rank calls; each builds the whole reference (keep it small)."""
    model = build_expert_parallel(config, placement, seed=seed, device=device, dtype=dtype, group=group)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    full = torch.randn(tokens, config.hidden, generator=generator, device=model.device).to(dtype)
    output = ep_forward(model, full[home_tokens(tokens, model.world, model.rank).to(model.device)], tokens,
                        routing, mode=mode)
    actual = gather_hidden(model, output, tokens)
    with torch.no_grad():
        expected = MoEStack(config, seed=seed, device=model.device, dtype=dtype)(full, routing)
    return float((actual.double() - expected.double()).abs().max()), result_tolerance(expected)
