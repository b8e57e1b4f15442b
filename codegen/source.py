"""What every generated kernel shares: its source and calling convention, the IR comment on top, and how a
value is addressed through its strides."""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..ir import Graph, Node, TensorType
from .expressions import FLOATS, TRITON_TYPES

IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
"""A name in generated source (a variable, or a Triton function)."""


@dataclass(frozen=True, slots=True)
class KernelSource:
    """A group's kernel: called on pointers to `inputs` then `outputs`, then `scalars`, with the `constants`
    as compile-time meta-parameters, on a 1-D grid of `programs`."""

    name: str
    source: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    programs: int
    scalars: tuple[int, ...]
    constants: tuple[tuple[str, int], ...]
    num_warps: int = 4


def check_dtypes(types: Mapping[str, TensorType], values: Iterable[str], extra: Iterable[torch.dtype] = ()) -> None:
    """Raise ValueError unless every value has a dtype generated kernels load and store (or one of `extra`)."""
    allowed = (*TRITON_TYPES, *extra)
    for value in values:
        if types[value].dtype not in allowed:
            raise ValueError(f"generated kernels handle {', '.join(map(str, allowed))}, not {types[value]}")


def header(name: str, nodes: Sequence[Node], graph: Graph, inputs: Sequence[str], outputs: int,
           parameters: str) -> list[str]:
    """The IR as comments, the imports and the `def` line of a kernel taking `inputs`, `outputs` pointers and
    then `parameters`."""
    types = graph.types()
    lines = [f"# %{node.outputs[0].name}: {node.outputs[0].type} = {node.op}("
             f"{', '.join(f'%{n}: {types[n]}' for n in node.inputs)}){f' {dict(node.attrs)}' if node.attrs else ''}"
             for node in nodes]
    pointers = [f"in{i}_ptr" for i in range(len(inputs))] + [f"out{i}_ptr" for i in range(outputs)]
    return lines + ["import triton", "import triton.language as tl", "", "", "@triton.jit",
                    f"def {name}({', '.join(pointers)}, {parameters}):"]


def coordinates(index: str, shape: Sequence[int], prefix: str, order: Sequence[int] | None = None) -> list[str]:
    """`{prefix}0, {prefix}1, …`: the index of each dimension of `shape` for the flat index `index`, which runs over
    the dims in `order` (outermost first; row-major by default)."""
    lines, inner = [], 1
    for dim in reversed(range(len(shape)) if order is None else order):
        value = f"({index} // {inner}) % {shape[dim]}" if shape[dim] != 1 else "0"
        lines.append(f"    {prefix}{dim} = {value}")
        inner *= shape[dim]
    return lines


def memory_order(value_type: TensorType) -> tuple[int, ...]:
    """The dims of a value from the largest stride to the smallest (ties in dim order): iterating in this order
    walks its memory forward, so a kernel's loads and stores of it coalesce (row-major order for a row-major value)."""
    return tuple(sorted(range(len(value_type.shape)), key=lambda dim: -value_type.layout[dim]))


def offset(value_type: TensorType, names: Sequence[str]) -> str:
    """Element offset of a value broadcast to a shape whose dims have the coordinate variables `names`
    (aligned from the right; broadcast dims stride 0)."""
    skip = len(names) - len(value_type.shape)
    terms = [f"{names[skip + dim]} * {stride}" for dim, (size, stride) in enumerate(zip(value_type.shape, value_type.layout))
             if size != 1 and stride != 0]
    return " + ".join(terms) if terms else "0"


def load(variable: str, pointer: str, value_type: TensorType, address: str, mask: str,
         scalars: Collection[str] = ()) -> str:
    """A load statement; floating values become float32. An address no coordinate reaches (a value of one
    element, or read at one: numbers, and `scalars`, variables computed from numbers alone) is spread to the
    mask's shape, as Triton wants of a masked load."""
    cast = ".to(tl.float32)" if value_type.dtype in FLOATS else ""
    return f"    {variable} = tl.load({pointer} + {spread(address, mask, scalars)}, mask={mask}, other=0){cast}"


def spread(address: str, mask: str, scalars: Collection[str] = ()) -> str:
    """`address`, spread to the mask's shape where no coordinate reaches it (a value of one element): Triton wants
    a block of pointers for a masked load or store of a block."""
    if all(name in scalars for name in IDENTIFIER.findall(address)):
        return f"{mask}.to(tl.int64) * 0 + {address}"
    return address
