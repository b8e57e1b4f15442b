"""ONNX export of every built-in model, checked in onnxruntime on the CPU against ember's own outputs.

Per built-in model at its suite architecture, but in float32 (the suite's bf16 weights and float inputs converted:
onnxruntime's CPU provider has no bfloat16 kernels): ember.compile on `--device`, export_onnx of the optimized graph
(weights in a data file past 1 GiB, as the API decides), verify_onnx on the compiled example (each output within
float32's atol 1e-4 + rtol 1e-3, and the language models' argmax). A model that fails records its error and the run
goes on. `--batch` overrides the batch dimension of token inputs (integer ids and masks) to keep CPU runs bearable.
Usage: python bench/onnx_export.py [--device cpu] [--models ...] [--batch N] [--out DIR] [--stem NAME]
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

import ember
from ember import models
from ember.codegen.onnx import export_onnx, first_line
from ember.codegen.onnx_verify import verify_onnx
from ember.errors import ExportError

from common import environment, write_results

LANGUAGE_MODELS = ("demo", "gpt2", "llama", "llama_b1", "mixtral")
"""Built-ins whose first output is a language model's logits: verification also compares their argmax."""


def float32_suite(name: str, batch: int | None) -> tuple[torch.nn.Module, tuple]:
    """The model at suite architecture in float32, its float inputs float32 too; with `batch`, token inputs
    (integer tensors of two or more dims) cut or repeated along their first dim to that many rows."""
    model, inputs = models.load(name, "suite")
    model = model.float().eval()
    inputs = tuple(_float32(value) for value in inputs)
    if batch is not None:
        inputs = tuple(_rebatched(value, batch) if _is_tokens(value) else value for value in inputs)
    return model, inputs


def _float32(value: object) -> object:
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _is_tokens(value: object) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() >= 2


def _rebatched(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    return tokens[torch.arange(batch) % tokens.shape[0]]


def _shapes(inputs: tuple) -> str:
    return " ".join("x".join(map(str, value.shape)) for value in inputs if isinstance(value, torch.Tensor))


def measure(name: str, device: torch.device, batch: int | None, directory: Path) -> dict:
    """Compile, export and verify one model; returns what was measured, with `error` (one line) where a step
    failed and the steps before it."""
    row: dict = {"model": name, "ok": False, "error": None}
    try:
        torch.manual_seed(0)
        model, inputs = float32_suite(name, batch)
        row["inputs"] = _shapes(inputs)
        model = model.to(device)
        inputs = tuple(value.to(device) if isinstance(value, torch.Tensor) else value for value in inputs)
        started = time.perf_counter()
        with torch.no_grad():
            program = ember.compile(model, inputs)
            row["compile_s"] = time.perf_counter() - started
            del model
            started = time.perf_counter()
            expected = [tensor.detach().clone().cpu() for tensor in
                        program.run([tensor.clone() for tensor in program.sample_inputs])]
            row["ember_run_s"] = time.perf_counter() - started
        path = directory / f"{name}.onnx"
        started = time.perf_counter()
        written = export_onnx(program.graph, path)
        row.update(export_s=time.perf_counter() - started, onnx_nodes=written.node_count, opset=written.opset,
                   model_bytes=written.model_bytes, weight_bytes=written.weight_bytes,
                   data_bytes=written.data_path.stat().st_size if written.data_path else 0,
                   external_data=written.external_data, decomposed=dict(written.decomposed))
        sample = [tensor.cpu() for tensor in program.sample_inputs]
        del program
        gc.collect()
        started = time.perf_counter()
        try:
            result = verify_onnx(path, sample, expected, language_model=name in LANGUAGE_MODELS)
        finally:
            row["verify_s"] = time.perf_counter() - started
        row.update(outputs=[{"name": check.name, "dtype": check.dtype, "max_abs_error": check.max_abs_error,
                             "allowed_error": check.allowed_error, "ok": check.ok} for check in result.outputs],
                   argmax_agreement=result.argmax_agreement, ok=result.ok)
    except Exception as error:  # one model's failure is recorded, and the run goes on
        reason = "; ".join(line.strip() for line in str(error).strip().splitlines()) if isinstance(error, ExportError) \
            else first_line(error)
        row["error"] = f"{type(error).__name__}: {reason}"
    finally:
        for file in directory.iterdir():
            file.unlink()
        gc.collect()
    return row


def _worst(row: dict) -> dict | None:
    """The output furthest past (or nearest to) its allowed error."""
    def share(output: dict) -> float:
        if output["allowed_error"] > 0:
            return output["max_abs_error"] / output["allowed_error"]
        return 0.0 if output["max_abs_error"] == 0 else float("inf")
    return max(row.get("outputs") or [], key=share, default=None)


def _mib(row: dict, key: str) -> str:
    return f"{row[key] / 2**20:.1f}" if key in row else "-"


def _seconds(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"


def table(rows: list[dict], device: torch.device, batch: int | None) -> str:
    lines = [f"ONNX export of ember's optimized graph (compiled on {device.type}), run in onnxruntime on the CPU "
             "against ember's outputs",
             "suite architectures in float32 (converted from the suite's bf16: onnxruntime's CPU provider has no "
             "bfloat16 kernels); float32 outputs within atol 1e-4 + rtol 1e-3, integers exactly",
             *([f"batch of token inputs overridden to {batch} (models without token inputs keep their own)"]
               if batch is not None else []),
             "worst output: its max abs error / the error allowed there; argmax: share of positions where the "
             "logits' argmax agrees (language models)",
             f"{'model':12} {'inputs':>14} {'nodes':>6} {'onnx MiB':>8} {'weights MiB':>11} {'ext':>3} "
             f"{'export s':>8} {'verify s':>8} {'outs':>4} {'worst output':>34} {'argmax':>7} {'ok':>5}"]
    for row in rows:
        worst = _worst(row)
        worst_text = (f"%{worst['name'][:14]} {worst['max_abs_error']:.2g}/{worst['allowed_error']:.2g}"
                      if worst else "-")
        argmax = f"{row['argmax_agreement']:.2%}" if row.get("argmax_agreement") is not None else "-"
        external = ("yes" if row["external_data"] else "no") if "external_data" in row else "-"
        lines.append(f"{row['model']:12} {row.get('inputs', '-'):>14} {row.get('onnx_nodes', '-'):>6} "
                     f"{_mib(row, 'model_bytes'):>8} {_mib(row, 'weight_bytes'):>11} {external:>3} "
                     f"{_seconds(row, 'export_s'):>8} {_seconds(row, 'verify_s'):>8} "
                     f"{len(row.get('outputs') or []) or '-':>4} {worst_text:>34} {argmax:>7} {str(row['ok']):>5}")
        if row["error"]:
            lines.append(f"  {row['error']}")
    verified = sum(row["ok"] for row in rows)
    failed = ", ".join(row["model"] for row in rows if not row["ok"])
    lines.append(f"verified in onnxruntime: {verified} of {len(rows)} models{f' (failed: {failed})' if failed else ''}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where ember compiles and runs (default: cuda if available, else cpu)")
    parser.add_argument("--models", nargs="*", default=list(models.BUILTIN))
    parser.add_argument("--batch", type=int, default=None,
                        help="override the batch dimension of token inputs (ids and masks)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--stem", default="onnx_export", help="name of the result files")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            rows.append(measure(name, device, args.batch, Path(directory)))
            print({key: value for key, value in rows[-1].items() if key != "outputs"}, flush=True)
    result = {**environment(device), "onnxruntime": _version("onnxruntime"), "onnxscript": _version("onnxscript"),
              "dtype": "float32 (suite architectures, converted from bf16)", "batch": args.batch, "rows": rows}
    write_results(args.out, args.stem, result, table(rows, device, args.batch))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
