"""Kernel handles the runtime calls: compiled once, launched on tensors."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..ir import Graph, Node, TensorType, Value
from ..ir.plans import FusionGroup, FusionPlan
from .cache import load_kernel
from .pointwise import generate
from .reduction import generate_rows
from .source import KernelSource

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Kernel:
    """A generated kernel: call it with its input tensors and the output tensors to fill.

    On a GPU, once bound at the first call, a launch on that GPU whose pointers are all 16-byte aligned (the
    variant `warm_up` compiled) calls the compiled binary's launcher directly, skipping Triton's per-launch argument
    specialization and cache lookup (about a third of a launch's host time); any other launch, Triton's
    interpreter, or a Triton with launch hooks set (a profiler) takes Triton's own JIT path. Generated wrappers
    launch the binary themselves (`direct_launch`) and call the kernel only for pointers off alignment."""

    source: KernelSource
    _launch: Any = field(default=None, repr=False)
    _options: dict[str, int] = field(default_factory=dict, repr=False)
    _direct: DirectLaunch | None = field(default=None, repr=False)

    def __call__(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        direct = self._direct
        if direct is not None and (inputs or outputs)[0].get_device() == direct.device:
            tensors = (*inputs, *outputs)
            for tensor in tensors:
                if tensor.data_ptr() & 15:
                    break
            else:
                direct.launch(self.source.programs, tensors)
                return
        if self._launch is None:  # loaded on first use; the launch options are built once, not per call
            self._bind(inputs, outputs)
        if self.source.programs == 0:
            return
        self._launch(*inputs, *outputs, *self.source.scalars, **self._options)

    def _bind(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        jit = load_kernel(self.source.name, self.source.source)
        self._launch = jit[(self.source.programs,)]
        self._options = {**dict(self.source.constants), "num_warps": self.source.num_warps}
        tensors = (*inputs, *outputs)
        if self.source.programs and tensors and all(tensor.is_cuda for tensor in tensors):
            self._direct = _direct_launch(jit, self.source, [tensor.dtype for tensor in tensors], tensors[0].device)

    def direct_launch(self, dtypes: Sequence[torch.dtype], device: torch.device) -> DirectLaunch | None:
        """This kernel's compiled binary for 16-byte aligned pointers to `dtypes` (inputs, then outputs) on a
        GPU, bound for a generated wrapper to launch inline; None where Triton offers none (see `_direct_launch`)."""
        if self.source.programs == 0 or device.type != "cuda":
            return None
        return _direct_launch(load_kernel(self.source.name, self.source.source), self.source, dtypes, device)

    def warm_up(self, dtypes: Sequence[torch.dtype]) -> None:
        """Compile for 16-byte aligned pointers to `dtypes` (inputs, then outputs), as a launch on the arena's
        buffers would, without launching."""
        if self.source.programs == 0:
            return
        load_kernel(self.source.name, self.source.source).warmup(
            *dtypes, *self.source.scalars, grid=(self.source.programs,), **dict(self.source.constants),
            num_warps=self.source.num_warps)


@dataclass(frozen=True, slots=True)
class DirectLaunch:
    """A compiled kernel's launcher, bound: the launch arguments after the tensors are `scalars` then the
    constexpr values in the kernel's parameter order (Triton's launcher takes them and ignores the latter)."""

    run: Callable[..., Any]
    function: int
    metadata: Any
    device: int
    tail: tuple[Any, ...]

    def launch(self, programs: int, tensors: Sequence[torch.Tensor]) -> None:
        """Launch on `programs` programs over `tensors` (16-byte aligned, on this device) on the current stream."""
        self.run(programs, 1, 1, raw_stream(self.device), self.function, self.metadata, None, None, None, *tensors,
                 *self.tail)


def _direct_launch(jit: Any, source: KernelSource, dtypes: Sequence[torch.dtype], device: torch.device) -> DirectLaunch | None:
    """The direct launcher of `jit`'s variant for aligned pointers to `dtypes` on `device`, or None where this
    Triton does not offer one as expected (interpreted, launch hooks set, another launcher convention)."""
    if not hasattr(jit, "device_caches") or launch_hooks_set():
        return None
    constants = dict(source.constants)
    positional = len(dtypes) + len(source.scalars)
    try:
        with torch.cuda.device(device):
            compiled = jit.warmup(*dtypes, *source.scalars, grid=(source.programs,), **constants,
                                  num_warps=source.num_warps)
            compiled._init_handles()
        tail = (*source.scalars, *(constants[name] for name in jit.arg_names[positional:]))
        return DirectLaunch(compiled.run, compiled.function, compiled.packed_metadata, device.index, tail)
    except (AttributeError, KeyError, TypeError) as error:
        log.debug("kernel %s launches through Triton's JIT (no direct launcher: %s)", source.name, error)
        return None


def launch_hooks_set() -> bool:
    """Whether Triton has a launch hook set (a profiler's): None, or (newer Tritons) an empty chain of hooks, is not."""
    from triton import knobs

    return any(hook is not None and bool(getattr(hook, "calls", True))
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def raw_stream(device: int) -> int:
    """The current CUDA stream of `device` as the launcher takes it (a capture's stream while capturing)."""
    return torch._C._cuda_getCurrentRawStream(device)


@dataclass(frozen=True, slots=True)
class GroupKernel:
    """One fused group as a runtime step: reads `inputs`, writes `outputs` (its values read after it)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[Value, ...]
    kernel: Kernel


def generate_group(group: FusionGroup, members: Sequence[Node], graph: Graph) -> KernelSource:
    """The source of one fusion group's kernel (its `members` are the group's nodes, in order), by its kind."""
    if group.kind == "reduction":
        return generate_rows(group.name, members, graph, group.outputs, group.shape, group.reduced)
    return generate(group.name, members, graph, group.outputs)


def lower_schedule(graph: Graph, fusion: FusionPlan, debug_dir: str | None = None) -> tuple[Node | GroupKernel, ...]:
    """The fusion plan's schedule as runtime work: each kept group a generated kernel, every other node as is.
    With `debug_dir`, each kernel's source (its IR on top) is written there as <group>.py."""
    nodes = {node.name: node for node in graph.nodes}
    groups = {group.name: group for group in fusion.groups}
    types = graph.types()
    work: list[Node | GroupKernel] = []
    for name in fusion.schedule:
        if name not in groups:
            work.append(nodes[name])
            continue
        source = generate_group(groups[name], [nodes[n] for n in groups[name].nodes], graph)
        if debug_dir:
            Path(debug_dir).mkdir(parents=True, exist_ok=True)
            (Path(debug_dir) / f"{name}.py").write_text(source.source)
        work.append(GroupKernel(name, source.inputs, tuple(Value(v, types[v]) for v in groups[name].outputs),
                                Kernel(source)))
    return tuple(work)


def precompile(work: Sequence[Node | GroupKernel], types: Mapping[str, TensorType], device: torch.device) -> None:
    """Compile the kernels of `work` for `device` now, on a thread each (Triton compiles a kernel on one core, and
    much of that in ptxas, outside Python), rather than one after another at the first call. Without Triton's
    AsyncCompileMode this does nothing; a kernel that fails here compiles at its launch, which raises there."""
    import triton

    kernels = [step for step in work if isinstance(step, GroupKernel)]
    if not kernels or not hasattr(triton, "AsyncCompileMode"):
        return
    with ThreadPoolExecutor(max_workers=min(len(kernels), os.cpu_count() or 1)) as pool, \
            torch.cuda.device(device), triton.AsyncCompileMode(pool, ignore_errors=True):
        for step in kernels:
            try:
                step.kernel.warm_up([types[name].dtype for name in step.inputs] + [value.type.dtype for value in step.outputs])
            except Exception as error:  # the launch compiles it again and reports the error there
                log.warning("kernel %s did not precompile (%s): it compiles at its first launch", step.name, error)
