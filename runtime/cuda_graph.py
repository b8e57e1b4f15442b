"""CUDA-graph replay of a call: the host issues one graph launch instead of every step.

Shapes are static per Program and the weights are held by reference, so one capture serves every later
call: inputs are copied into the captured input buffers and the graph is replayed. Memory a captured step
allocates (arenas included) comes from the graph's own pool, once, and the next replay overwrites it; so
the last few steps, when the outputs they make are large, run after the replay on their own, into memory
outside that pool (reading what the graph left in it, arenas still open included). A small output still in
the pool is copied out; a larger one is lent: the caller gets a tensor over the pool's memory, and before
the next replay overwrites it, any lent tensor still referenced (or any view of it) is moved into memory of
its own, its data copied there. So the caller's tensors never change under it, and the copy (and its
memory) is only paid for what is kept. (A torch that cannot move storages moves the tensor alone; while the
caller holds a view of lent memory, calls run without the graph.) A call that cannot be captured (an op
that syncs with the host, such as routing that reads expert counts) leaves the Program running step by
step, with one warning.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from ..ir import TensorType

log = logging.getLogger(__name__)

WARM_UP_CALLS = 2

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


LENDS = hasattr(torch.UntypedStorage, "_swap_data_ptr_")
"""Whether this torch can move a storage (and so every view of it) into other memory. Without it, a lent tensor
is moved by swapping its contents with a copy's, which only the tensor itself follows: while the caller holds a
view of lent memory, that memory cannot be moved (the loan is pinned)."""

LEND_MIN_BYTES = 1 << 20
"""Outputs in a graph's pool smaller than this are copied out at once rather than lent: copying a small one costs
the device next to nothing, while moving a kept loan costs the host several microseconds (a small model's KV
cache would cost a call a few hundred)."""

PINNED_CALLS_BEFORE_COPYING = 3
"""Calls refused for a pinned loan after which a graph copies its outputs out rather than lend them (a caller,
or torch.compile's wrappers, that keeps views of results into the next call)."""

_KEPT: list[tuple[Any, list[Loan]]] = []
"""The pool memory of graphs dropped while loans of it were pinned, kept until those loans end."""


class PoolInUse(Exception):
    """The caller still holds views of a graph's pool that this torch cannot move: a replay would overwrite
    them, so the call runs without the graph."""


@dataclass(slots=True)
class Loan:
    """Memory lent out of a graph's pool: the storage handed out and, where torch cannot move storages, the
    tensor handed out (both held weakly: the caller's holding them is what keeps the loan open)."""

    storage: StorageWeakRef
    tensor: weakref.ref | None
    holders: int
    """References to the storage when lent (the tensor's, and torch's own Python object for it): more mean views."""


def lend(tensor: torch.Tensor) -> tuple[torch.Tensor, Loan]:
    """A tensor over `tensor`'s memory with a storage of its own that does not own that memory, and the loan of
    it: it and every view of it share the storage, so `reclaim` moves them all (where torch can)."""
    extent = TensorType(tuple(tensor.shape), tensor.dtype, tuple(tensor.stride())).storage_bytes
    storage = torch._C._construct_storage_from_data_pointer(tensor.data_ptr(), tensor.device, extent)
    lent = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(storage, 0, tensor.shape, tensor.stride())
    reference = StorageWeakRef(lent.untyped_storage())
    return lent, Loan(reference, None if LENDS else weakref.ref(lent), torch._C._storage_Use_Count(reference.cdata))


def reclaim(loans: Sequence[Loan], stream: torch.Stream | None = None) -> tuple[int, list[Loan]]:
    """Moves the memory of every loan still open into memory of its own (allocated on the current stream), its
    data copied there on `stream` (default: the current one). Returns how many moved, and the loans that could
    not (pinned: see LENDS)."""
    moved, pinned = 0, []
    for loan in loans:
        if loan.storage.expired():
            continue
        if LENDS:
            storage = torch.UntypedStorage._new_with_weak_ptr(loan.storage.cdata)
            own = _copied(storage, stream)
            storage._swap_data_ptr_(own)  # `own` now holds the pool's address, owning nothing
        elif not _swap_out(loan, stream):
            pinned.append(loan)
            continue
        moved += 1
    return moved, pinned


def _copied(storage: torch.UntypedStorage, stream: torch.Stream | None) -> torch.UntypedStorage:
    """A copy of `storage` in memory allocated on the current stream (the caller's, who uses it next), copied
    on `stream` (ordered after the caller's work, before the next replay)."""
    own = torch.empty(storage.nbytes(), dtype=torch.uint8, device=storage.device).untyped_storage()
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        own.copy_(storage)
    return own


def _swap_out(loan: Loan, stream: torch.Stream | None) -> bool:
    """Moves a lent tensor by swapping its contents with a copy's; False where a view of its memory (or a weak
    reference to it) is held elsewhere, which the swap would leave behind."""
    tensor = loan.tensor() if loan.tensor is not None else None
    if tensor is None or torch._C._storage_Use_Count(loan.storage.cdata) != loan.holders or tensor._use_count() != 1:
        return False
    storage = tensor.untyped_storage()
    own = _copied(storage, stream)
    del storage
    copy = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(own, tensor.storage_offset(), tensor.shape,
                                                                          tensor.stride())
    loan.tensor = None  # the swap refuses a tensor with weak references
    try:
        torch.utils.swap_tensors(tensor, copy)
    except RuntimeError:
        loan.tensor = weakref.ref(tensor)
        return False
    return True


def keep_pinned(carried: Any, pinned: list[Loan]) -> None:
    """Keeps a dropped graph's memory (`carried`: the tensors in its pool, its input buffers) while any of its
    `pinned` loans is open."""
    _KEPT[:] = [(memory, loans) for memory, loans in _KEPT if not all(loan.storage.expired() for loan in loans)]
    if pinned:
        _KEPT.append((carried, pinned))


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per device on which every ember graph warms up, is captured and replays.

    One stream, not one per capture: cuBLAS keeps a workspace per stream for the life of the process, so a
    stream per Program would hold one more workspace per Program."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class GraphedCall:
    """`run_prefix` captured on `device` on buffers shaped like `example`, what it returns (tensors in the graph's memory)
    handed to `run_tail` after each replay; raises at construction if capture fails. The first `written_back`
    outputs are new values of buffers and inputs, copied into them before the next replay, so they are handed
    back uncopied; the `staged` inputs (CPU ones the graph only copies to the device) get buffers on the device.
    `warm_up` calls run first, uncaptured, for what runs lazily once (none are needed when capturing again).
    The `aliased` inputs (ones the model updates in place, such as a static KV cache, whose new values are
    written back after the call) are captured as the caller's own tensors, not copied in on every call: a call
    handing one in other memory gets None, and the caller captures again (on the new memory, or copying in).
    Each warm-up call runs on fresh copies of the `unrepeatable` inputs (aliased ones an update is written over
    that a second run would change again, a counter's add), so that the caller's values change only once per call
    and every warm-up call writes what the first did (a cache update at the position its counter holds).

    A call with a `tail` runs on the capture stream, ordered after the caller's stream and before the caller's
    next work on it: the tail's matrix products then share the workspace cuBLAS made for the capture rather than
    making one for the caller's stream. The tensors handed back are recorded on the caller's stream, so their
    memory is not reused before the caller's work on them is done. A call without one (the replay alone, as a
    decode step's) runs on the caller's stream: no stream to switch to and back, nothing to record. Outputs left in the pool are lent (see the
    module's docstring): those still referenced when the next call comes, or when this one is dropped, are
    moved out first; a call raises PoolInUse while one cannot be moved."""

    def __init__(self, run_prefix: Callable[[Sequence[torch.Tensor]], Any],
                 run_tail: Callable[[Sequence[torch.Tensor], Any], list[torch.Tensor]], example: Sequence[torch.Tensor],
                 device: torch.device, *, written_back: int = 0, staged: frozenset[int] = frozenset(),
                 aliased: frozenset[int] = frozenset(), unrepeatable: frozenset[int] = frozenset(),
                 warm_up: int = WARM_UP_CALLS, tail: bool = True):
        self.inputs = [tensor if position in aliased else tensor.to(device, copy=True) if position in staged
                       else tensor.clone() for position, tensor in enumerate(example)]
        self.aliased = tuple(sorted(aliased))
        self.staged = tuple(sorted(staged - aliased))
        self.copied = tuple(position for position in range(len(example)) if position not in aliased | staged)
        self.copies_in = _by_dtype(self.copied, self.inputs)
        """(buffers, input positions) per dtype: each set copied in by one multi-tensor copy."""
        self.written_back = written_back
        self.run_tail = run_tail
        self.tail = tail
        self.own = frozenset(id(self.inputs[position]) for position in self.aliased)
        """The caller's own tensors among what a replay hands back (aliased inputs updated in place): made on the
        caller's side, never recorded on its stream."""
        self.stream = capture_stream(device)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # capture wants the lazy initialisations (cuBLAS handles, kernels) done
            warm_up_calls(run_prefix, self.inputs, warm_up, unrepeatable & aliased)
        torch.cuda.current_stream().wait_stream(self.stream)
        # The graph bakes in the address of the cuBLAS workspace it uses: made afresh during capture, that
        # workspace lives in the graph's own pool, so a later clearing of workspaces (torch.compile's
        # reduce-overhead mode clears them) cannot hand it to other tensors while the graph still writes it.
        torch._C._cuda_clearCublasWorkspaces()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.carried = run_prefix(self.inputs)
        self.pool = {tensor.untyped_storage().data_ptr() for tensor in pytree.tree_leaves(self.carried)
                     if isinstance(tensor, torch.Tensor)}
        """Memory the next call overwrites: the graph's (arenas, results) and the buffers inputs are copied into
        (an output viewing an input views its buffer)."""
        self.pool |= {self.inputs[position].untyped_storage().data_ptr() for position in (*self.copied, *self.staged)}
        self.lent: list[Loan] = []
        self.calls = 0
        """Calls replayed so far."""
        self.pinned_calls = 0
        """Calls refused because a loan was pinned."""

    def __del__(self) -> None:
        # the pool goes with the graph: what the caller still holds of it moves out first, or keeps it
        if getattr(self, "lent", None) and not sys.is_finalizing():
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            keep_pinned((self.carried, self.inputs), reclaim(self.lent)[1])
            torch.cuda.synchronize(self.stream.device)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        for position in self.aliased:
            if inputs[position].data_ptr() != self.inputs[position].data_ptr():
                return None
        caller = torch.cuda.current_stream()
        if self.tail:
            self.stream.wait_stream(caller)
        self.lent = reclaim(self.lent, self.stream if self.tail else None)[1]
        if self.lent:
            if self.tail:
                caller.wait_stream(self.stream)
            self.pinned_calls += 1
            if self.pinned_calls == PINNED_CALLS_BEFORE_COPYING:
                log.info("views of lent outputs were held into the next call %d times (this torch cannot move them): "
                         "copying outputs out of the CUDA graph's memory from now on", self.pinned_calls)
            raise PoolInUse
        self.calls += 1
        if not self.tail:
            return self._replay_here(inputs)
        with torch.cuda.stream(self.stream):
            outputs = self._replay_here(inputs)
        caller.wait_stream(self.stream)
        for output in outputs:  # made on the capture stream, used on the caller's: freed only once the caller is done
            if output.is_cuda and id(output) not in self.own:
                output.record_stream(caller)
        return outputs

    def _replay_here(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copies `inputs` in, replays, runs the tail and hands the outputs out, all on the current stream."""
        for buffers, positions in self.copies_in:
            torch._foreach_copy_(buffers, [inputs[position] for position in positions])
        for position in self.staged:
            self.inputs[position].copy_(inputs[position])
        self.graph.replay()
        return self._hand_out(self.run_tail(inputs, self.carried))

    @property
    def copies_out(self) -> bool:
        """Whether outputs in the pool are copied out rather than lent (loans were pinned call after call)."""
        return self.pinned_calls >= PINNED_CALLS_BEFORE_COPYING

    def _hand_out(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs as the caller gets them: those in the graph's pool lent when they hold LEND_MIN_BYTES or
        more, else copied out (by one multi-tensor copy per dtype; every one, once loans were pinned call after
        call); the rest (written-back ones included) as they are."""
        pooled = [index for index in range(self.written_back, len(outputs))
                  if outputs[index].numel() and outputs[index].untyped_storage().data_ptr() in self.pool]
        handed = list(outputs)
        copied = [index for index in pooled if self.copies_out or outputs[index].nbytes < LEND_MIN_BYTES]
        for sources, indices in _by_dtype(copied, outputs):
            copies = [torch.empty_like(source) for source in sources]
            torch._foreach_copy_(copies, sources)
            for index, copy in zip(indices, copies):
                handed[index] = copy
        for index in pooled:
            if handed[index] is outputs[index]:
                handed[index], loan = lend(outputs[index])
                self.lent.append(loan)
        return handed


def warm_up_calls(run: Callable[[Sequence[torch.Tensor]], Any], inputs: Sequence[torch.Tensor], calls: int,
                  fresh: frozenset[int]) -> None:
    """Runs `run` on `inputs` `calls` times, each on fresh copies of the inputs at positions `fresh` (ones it
    updates in place that a second run would change again): the caller's tensors there are left as they were,
    and every call writes what the first did into the others (a cache update at the position a counter holds)."""
    for _ in range(calls):
        run([tensor.clone() if position in fresh else tensor for position, tensor in enumerate(inputs)])


def _by_dtype(positions: Sequence[int], tensors: Sequence[torch.Tensor]) -> list[tuple[list[torch.Tensor], list[int]]]:
    """The tensors at `positions`, with their positions, one set per dtype: torch's multi-tensor copy runs as one
    launch only over tensors of one dtype, and as a copy (and a launch) per tensor otherwise."""
    sets: dict[torch.dtype, tuple[list[torch.Tensor], list[int]]] = {}
    for position in positions:
        chosen, where = sets.setdefault(tensors[position].dtype, ([], []))
        chosen.append(tensors[position])
        where.append(position)
    return list(sets.values())
