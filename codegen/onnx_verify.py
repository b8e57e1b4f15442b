"""Checks an exported ONNX model in onnxruntime against ember's own outputs: each output within its dtype's
tolerance, and for a language model the argmax of its logits.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError
from ..tolerance import TOLERANCES
from .onnx import first_line

log = logging.getLogger(__name__)

FLOAT32_TOLERANCE = (1e-4, 1e-3)
"""(atol, rtol) for float32 outputs: onnxruntime's kernels sum in other orders than torch's, and the error grows
with depth."""

OTHER_FLOAT_SCALE = (10.0, 4.0)
"""Other float dtypes are held to ember.tolerance's (atol, rtol) times these: float16's rtol becomes 4e-3, about four
of its units in the last place."""


@dataclass(frozen=True, slots=True)
class OutputCheck:
    """One output of an onnxruntime run compared with ember's."""

    name: str
    dtype: str
    max_abs_error: float
    allowed_error: float
    """atol + rtol·|expected| at the element with the largest error (0 for exact dtypes)."""
    atol: float
    rtol: float
    ok: bool


@dataclass(frozen=True, slots=True)
class OnnxVerification:
    """An onnxruntime run of an exported model compared with ember's outputs."""

    path: Path
    outputs: tuple[OutputCheck, ...]
    argmax_agreement: float | None
    """For a language model, the share of positions where the logits' (first output's) argmax over the last dim
    is ember's; None otherwise."""
    ok: bool

    def summary(self) -> str:
        """One line per output, then the argmax agreement: the numbers behind `ok`."""
        lines = [f"%{check.name} ({check.dtype}): max abs error {check.max_abs_error:.3g} "
                 f"(atol {check.atol:g}, rtol {check.rtol:g}){'' if check.ok else ' — outside the tolerance'}"
                 for check in self.outputs]
        if self.argmax_agreement is not None:
            lines.append(f"argmax of the logits agrees at {self.argmax_agreement:.2%} of positions")
        return "\n".join(lines)



def verify_onnx(path: str | os.PathLike, inputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], *,
                language_model: bool = False) -> OnnxVerification:
    """Run the ONNX model at `path` in onnxruntime on the CPU with `inputs` (the graph's tensor inputs, in order) and
    compare each output with `expected` (ember's): float32 within FLOAT32_TOLERANCE, other floats within
    `tolerances`, integers and bools exactly; for a language model also the argmax of the logits (the first output)
    over the last dim. Returns the numbers; raises ExportError with them when an output is outside its tolerance."""
    import onnxruntime

    path = Path(path)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # its warnings on shapes it merged leniently are about the exporter's guesses
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"onnxruntime cannot load {path} on the CPU: {first_line(error)} (its CPU provider lacks "
                          "kernels for some dtypes, bfloat16's above all: verify a float32 graph)") from error
    arguments = session.get_inputs()
    names = [output.name for output in session.get_outputs()]
    if len(arguments) != len(inputs) or len(names) != len(expected):
        raise ExportError(f"{path} takes {len(arguments)} inputs and gives {len(names)} outputs; got {len(inputs)} "
                          f"inputs and {len(expected)} expected outputs")
    feeds = {argument.name: _to_numpy(tensor, argument.name) for argument, tensor in zip(arguments, inputs)}
    try:
        actual = [torch.from_numpy(array.copy()) for array in session.run(names, feeds)]
    except Exception as error:
        raise ExportError(f"onnxruntime failed to run {path}: {first_line(error)}") from error
    checks = tuple(compare_output(name, got, want) for name, got, want in zip(names, actual, expected))
    agreement = argmax_agreement(actual[0], expected[0]) if language_model and actual else None
    result = OnnxVerification(path, checks, agreement, all(check.ok for check in checks))
    log.info("%s in onnxruntime against ember:\n%s", path, result.summary())
    if not result.ok:
        raise ExportError(f"{path} disagrees with ember in onnxruntime:\n{result.summary()}")
    return result


def compare_output(name: str, actual: torch.Tensor, expected: torch.Tensor) -> OutputCheck:
    """How far onnxruntime's output is from ember's, and whether that is within `tolerances` of its dtype; a shape
    or dtype that differs fails with an infinite error."""
    expected = expected.detach().cpu()
    atol, rtol = tolerances(expected.dtype)
    dtype = str(expected.dtype).removeprefix("torch.")
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        log.warning("%%%s: onnxruntime gives %s %s, ember %s %s", name, str(actual.dtype).removeprefix("torch."),
                    tuple(actual.shape), dtype, tuple(expected.shape))
        return OutputCheck(name, dtype, float("inf"), 0.0, atol, rtol, False)
    if not expected.numel():
        return OutputCheck(name, dtype, 0.0, 0.0, atol, rtol, True)
    if not expected.is_floating_point():
        error = (actual.long() - expected.long()).abs() if expected.dtype != torch.bool else (actual != expected).long()
        worst = float(error.max())
        return OutputCheck(name, dtype, worst, 0.0, atol, rtol, worst == 0)
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs()
    same = (actual == expected) | (actual.isnan() & expected.isnan())  # infinities and NaNs where ember has them
    error = torch.where(same, torch.zeros_like(error), error.nan_to_num(nan=float("inf")))
    allowed = atol + rtol * expected.abs().nan_to_num(nan=0.0, posinf=0.0)
    worst = int(error.flatten().argmax())
    return OutputCheck(name, dtype, float(error.flatten()[worst]), float(allowed.flatten()[worst]), atol, rtol,
                       bool((error <= allowed).all()))


def argmax_agreement(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The share of positions where the argmax over the last dim of `actual` is that of `expected` (1.0 for none)."""
    expected = expected.detach().cpu()
    if actual.shape != expected.shape or not expected.numel():
        return 1.0 if actual.shape == expected.shape else 0.0
    return float((actual.argmax(dim=-1) == expected.argmax(dim=-1)).double().mean())


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) an onnxruntime output of this dtype is held to: FLOAT32_TOLERANCE for float32, ember.tolerance's
    numbers times OTHER_FLOAT_SCALE for other floats, (0, 0) for integers and bools."""
    if dtype == torch.float32:
        return FLOAT32_TOLERANCE
    atol, rtol = TOLERANCES.get(dtype, (0.0, 0.0))
    return atol * OTHER_FLOAT_SCALE[0], rtol * OTHER_FLOAT_SCALE[1]


def _to_numpy(tensor: torch.Tensor, name: str) -> Any:
    if tensor.dtype == torch.bfloat16:
        raise ExportError(f"input {name} is bfloat16, which onnxruntime's Python API cannot take: export a float32 "
                          "graph to verify it")
    return tensor.detach().cpu().contiguous().numpy()


__all__ = ["FLOAT32_TOLERANCE", "OnnxVerification", "OutputCheck", "argmax_agreement", "compare_output", "tolerances",
           "verify_onnx"]
