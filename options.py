"""Options: every knob of ember in one documented dataclass, shared by ember.compile and torch.compile."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CompileError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, slots=True)
class Options:
    """How ember compiles a model.

    verify: run the IR verifier after every stage (cheap; catches a broken pass at the pass).
    debug: extra checks and debug logging; verifiers of every plan run too.
    debug_dir: dump the IR after each stage here; defaults to $EMBER_DEBUG_DIR.
    check_inputs: check the shape, dtype and device of every call's inputs against the compiled ones.
    reorder: reorder operators to lower the peak of live memory (results unchanged; off by default).
    arena: place intermediates in planned arenas, each allocated by a call as its window of steps opens
        and freed as it closes (off: the allocator's, value by value).
    plan_time_limit: seconds the memory planner may spend on its search and MIP before keeping its best plan.
    fusion: run fused groups as generated Triton kernels. None (default): on when the model is on a GPU.
        True on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter; for tests, slow).
    cuda_graphs: on a GPU, capture a call in a CUDA graph and replay it (inputs copied in; the last few
        steps, which make the outputs, run after it, and outputs made inside it are copied out); needs the
        arena. A program that cannot be captured runs step by step, with one warning. None (default): capture
        unless `mode` says otherwise or the cost model predicts the host's dispatch takes under a tenth of the
        device's time (see optimizer.pipeline.HOST_SHARE); kernels that keep the device that busy gain nothing
        from a graph but pay its pool and input copies.
    mode: torch.compile's mode, meaning for CUDA graphs what it means for Inductor: "reduce-overhead" and
        "max-autotune" capture, "max-autotune-no-cudagraphs" does not, "default" leaves it to the cost model;
        `cuda_graphs`, when set, wins. The report's capture decision says which decided.
    layer_skip: residual sublayers to remove (numerics change: off unless asked). A SkipPlan (from
        `ember.plan_skip` or `ember skip --json`; also as its dict or the path of its JSON) is applied as it is;
        a LayerSkip (a budget and calibration calls) has ember.compile choose one first. See
        optimizer/skip_search.py.
    ffn_gate: FFN-SkipLLM's input-adaptive gate in decode steps (numerics change: off unless asked). An FFNGate
        (threshold, cold, warmup; also as its dict): once a feed-forward leaves the residual stream turned by
        less than `threshold` (cosine), the feed-forwards after it skip, decided on the device. See
        optimizer/ffn_gate.py.
    expert_placement: where a mixture-of-experts model's experts live across GPUs (a Placement from
        `ember.plan_placement` or `ember place --out`, its dict, or the JSON's path): checked against the
        model's routers, kept in the report and the saved program, shown by inspect. See
        optimizer/expert_placement.py; runtime/expert_parallel.py runs MoE layers so placed.
    """

    verify: bool = True
    debug: bool = False
    debug_dir: str | None = field(default_factory=lambda: os.environ.get("EMBER_DEBUG_DIR") or None)
    check_inputs: bool = True
    reorder: bool = False
    arena: bool = True
    plan_time_limit: float = 10.0
    fusion: bool | None = None
    cuda_graphs: bool | None = None
    mode: str = "default"
    layer_skip: Any = None
    ffn_gate: Any = None
    expert_placement: Any = None

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise CompileError(f"unknown mode {self.mode!r}; expected one of {', '.join(COMPILE_MODES)}")
        if self.layer_skip is not None:
            from .optimizer.skip_search import as_layer_skip

            object.__setattr__(self, "layer_skip", as_layer_skip(self.layer_skip))
        if self.ffn_gate is not None:
            from .optimizer.ffn_gate import as_ffn_gate

            object.__setattr__(self, "ffn_gate", as_ffn_gate(self.ffn_gate))
        if self.expert_placement is not None:
            from .optimizer.expert_placement import as_placement

            object.__setattr__(self, "expert_placement", as_placement(self.expert_placement))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, **extra: Any) -> Options:
        """Options from torch.compile's `options={...}` dict; unknown keys are an error that lists the known ones."""
        values = {**(values or {}), **{key: value for key, value in extra.items() if value is not None}}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CompileError(f"unknown ember option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)
