"""Saved programs: a directory that `load` turns back into a Program without capturing or optimizing again.

It holds a manifest (schema, versions, the device it was built for, a sha256 of every file and of itself), the
final IR and every plan as JSON, the weights and a sample (inputs and the outputs they gave) as safetensors, and
the generated Triton sources for reading. No pickle: loading parses JSON and safetensors and runs nothing from the
artifact. Kernels are generated again from the saved IR and fusion plan (ember's code generator, not the saved
text, makes what runs; a difference from the saved source is logged) and compiled for the GPU at hand, through
Triton's on-disk cache: a GPU of another generation than the one the program was built on compiles them anew.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import mmap
import os
import platform
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

from ..codegen import GroupKernel, lower_schedule, precompile
from ..errors import ArtifactError
from ..ir import Graph, VerifyError
from ..ir.schedule import schedule_of
from ..ir.serialize import (SerializeError, decode_fusion, decode_graph, decode_layout, decode_value, encode_fusion,
                            encode_graph, encode_layout, encode_value)
from ..results import ResultBuilder, register_transformers_caches
from ..tolerance import TOLERANCES
from .program import CompileReport, Program

log = logging.getLogger(__name__)

SCHEMA = 1
"""The artifact layout this ember writes and the newest it reads."""
FORMAT = "ember-program"
MANIFEST = "manifest.json"
PROGRAM = "program.json"
WEIGHTS = "weights.safetensors"
SAMPLES = "samples.safetensors"
KERNELS = "kernels"
BLOCK_BYTES = 64 << 20
"""Files are checked in blocks of this many bytes, each with its own sha256, so that a load checks them on every
core (the manifest keeps each file's whole sha256 too, for `sha256sum`)."""


@dataclass(frozen=True, slots=True)
class SampleCheck:
    """One saved output against the loaded program's: the largest absolute error and what its dtype allows."""

    output: int
    dtype: str
    shape: tuple[int, ...]
    max_error: float
    tolerance: float
    ok: bool


def save_program(program: Program, path: str | Path, sample_inputs: Sequence[torch.Tensor] | None = None) -> Path:
    """Write `program` to the directory `path` (created; files already there are replaced). The sample is
    `sample_inputs` (tensor inputs in graph order), by default the example the program was compiled for."""
    directory = Path(path)
    inputs = sample_inputs if sample_inputs is not None else program.sample_inputs
    if inputs is None:
        raise ArtifactError("this program keeps no example inputs (it was not built by ember.compile): "
                            "pass sample_inputs=[tensors in graph order] to save")
    directory.mkdir(parents=True, exist_ok=True)
    graph = program.graph
    weights, saved_weights = _weights_to_save(graph, program.mutated_buffers)
    save_file(saved_weights, directory / WEIGHTS, metadata={"format": FORMAT})
    inputs = [tensor.detach().clone() for tensor in inputs]
    with torch.no_grad():  # the compiled steps, not autograd's reference run
        outputs = program.run([tensor.clone() for tensor in inputs])
    samples = {f"input.{i}": tensor.detach().cpu().contiguous() for i, tensor in enumerate(inputs)}
    samples.update((f"output.{i}", tensor.detach().cpu().contiguous()) for i, tensor in enumerate(outputs))
    save_file(samples, directory / SAMPLES, metadata={"format": FORMAT})
    kernels = [step for step in program.executor.work or () if isinstance(step, GroupKernel)]
    (directory / KERNELS).mkdir(exist_ok=True)
    for stale in (directory / KERNELS).glob("*.py"):
        stale.unlink()
    for kernel in kernels:
        (directory / KERNELS / f"{kernel.name}.py").write_text(kernel.kernel.source.source)
    try:
        description = {
            "name": program.executor.name,
            "graph": encode_graph(graph),
            "weights": weights,
            "fusion": None if program.fusion is None else encode_fusion(program.fusion),
            "layout": None if program.executor.layout is None else encode_layout(program.executor.layout),
            "cuda_graphs": program.executor.cuda_graphs,
            "check_inputs": program.check_inputs,
            "in_spec": None if program.in_spec is None else pytree.treespec_dumps(program.in_spec),
            "out_spec": None if program.out_spec is None else pytree.treespec_dumps(program.out_spec),
            "arg_count": program.arg_count,
            "kwarg_names": list(program.kwarg_names),
            "constant_inputs": [[position, encode_value(value)] for position, value in program.constant_inputs.items()],
            "mutated_buffers": [_buffer_name(buffer, graph, index) for index, buffer in enumerate(program.mutated_buffers)],
            "mutated_inputs": list(program.mutated_inputs),
            "samples": {"inputs": len(inputs), "outputs": len(outputs)},
            "report": dataclasses.asdict(program.report),
        }
    except (SerializeError, TypeError) as error:
        raise ArtifactError(f"cannot save this program: {error}") from error
    (directory / PROGRAM).write_text(json.dumps(description, indent=1) + "\n")
    files = [PROGRAM, WEIGHTS, SAMPLES, *(f"{KERNELS}/{kernel.name}.py" for kernel in kernels)]
    _write_manifest(directory, files, _built_for(graph))
    log.info("saved %s to %s", program.executor.name, directory)
    return directory


def load_program(path: str | Path, device: str | torch.device | None = None) -> Program:
    """The Program saved at `path`, rebuilt from its saved plans (no capture, no pass, no solver), its weights on
    `device` (default: the kind of device it was built for; the current GPU for one built on a GPU)."""
    started = time.perf_counter()
    directory = Path(path)
    manifest = read_manifest(directory)
    check_files(directory, manifest, [name for name in manifest["files"] if name != SAMPLES])
    target = _load_device(manifest, device)
    description = _read_json(directory, PROGRAM)
    try:
        params = {value["name"]: value for value in description["graph"]["params"]}
        weights = _load_weights(directory, description["weights"], params, target)
        graph = decode_graph(description["graph"], weights)
        graph.verify()
        fusion = None if description["fusion"] is None else decode_fusion(description["fusion"])
        layout = None if description["layout"] is None else decode_layout(description["layout"])
        report = CompileReport(**description["report"])
        in_spec = _treespec(description["in_spec"])
        out_spec = _treespec(description["out_spec"])
        constant_inputs = {int(position): decode_value(value) for position, value in description["constant_inputs"]}
        mutated_buffers = tuple(weights[name] for name in description["mutated_buffers"])
    except (SerializeError, VerifyError, KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{directory / PROGRAM}: {type(error).__name__}: {error}") from error
    work = None
    if fusion is not None:
        work = lower_schedule(graph, fusion)
        _compare_sources(directory, work)
        if target.type == "cuda":
            precompile(work, graph.types(), target)
    program = Program(graph, report, schedule=schedule_of(graph, fusion), fusion=fusion, layout=layout, work=work,
                      cuda_graphs=bool(description["cuda_graphs"]), check_inputs=bool(description["check_inputs"]),
                      name=str(description["name"]), in_spec=in_spec, out_spec=out_spec, unflatten=ResultBuilder(),
                      arg_count=description["arg_count"], kwarg_names=tuple(description["kwarg_names"]),
                      constant_inputs=constant_inputs, mutated_buffers=mutated_buffers,
                      mutated_inputs=tuple(description["mutated_inputs"]))
    program.executor.prepare(target)
    program.report.stage_seconds["load"] = time.perf_counter() - started
    return program


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, checked (its own checksum, format and schema) and every file it lists present: ArtifactError
    naming what is missing or changed, or a schema newer than this ember reads. `check_files` checks the files'
    contents (load, every file it reads; verify, the sample)."""
    if not (directory / MANIFEST).is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; not a saved ember program (save one with "
                            "program.save(path) or `ember export`)")
    manifest = _read_json(directory, MANIFEST)
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    if manifest.get("checksum") != _digest(_canonical(body)):
        raise ArtifactError(f"{directory / MANIFEST}: its checksum does not match its contents: the manifest was changed")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{directory}: format {manifest.get('format')!r} is not {FORMAT!r}")
    schema = manifest.get("schema")
    if not isinstance(schema, int) or schema > SCHEMA:
        raise ArtifactError(f"{directory}: artifact schema {schema} is newer than this ember ({_ember_version()}) "
                            f"reads (schema {SCHEMA}): upgrade ember to load it")
    for name in (PROGRAM, WEIGHTS, SAMPLES):
        if name not in manifest["files"]:
            raise ArtifactError(f"{directory / MANIFEST}: lists no {name}")
    for name in manifest["files"]:
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory / name}: missing (the manifest lists it)")
    return manifest


def check_files(directory: Path, manifest: Mapping[str, Any], names: Sequence[str]) -> None:
    """Check the files `names` against the manifest's checksums, a block at a time on every core: ArtifactError
    naming the file, the bytes and the checksum that failed."""
    for name in names:
        file, expected = directory / name, manifest["files"][name]
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise ArtifactError(f"{file}: {size} bytes, not the {expected['bytes']} the manifest records: the file "
                                "was changed or cut short")
        block = expected["block_bytes"]
        for index, (actual, recorded) in enumerate(zip(_block_digests(file, block), expected["blocks"])):
            if actual != recorded:
                raise ArtifactError(f"{file}: bytes {index * block}–{min((index + 1) * block, size) - 1} have sha256 "
                                    f"{actual}, not the {recorded} the manifest records: the file was changed")
    return manifest


def load_samples(directory: Path, program: Program) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The saved sample's inputs (on the devices the program reads them on) and outputs (on the CPU)."""
    try:
        tensors = load_file(directory / SAMPLES)
    except SafetensorError as error:
        raise ArtifactError(f"{directory / SAMPLES}: not a safetensors file ({error})") from error
    inputs = [tensors[f"input.{i}"] for i in range(len(program.graph.inputs))]
    outputs = [tensors[f"output.{i}"] for i in range(len(program.graph.outputs))]
    return place_inputs(program, inputs), outputs


def place_inputs(program: Program, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` (a call's tensor inputs in graph order) each on the device the program reads that input on."""
    device = _program_device(program)
    return [tensor.to(device if value.type.device == "cuda" else "cpu")
            for tensor, value in zip(tensors, program.graph.inputs)]


def verify_program(path: str | Path, device: str | torch.device | None = None) -> tuple[Program, list[SampleCheck]]:
    """Load the program at `path`, run its saved sample inputs and compare with the saved outputs, each within its
    dtype's tolerance (exact for integers and bools). The loaded program keeps the sample as its own."""
    program = load_program(path, device)
    check_files(Path(path), read_manifest(Path(path)), [SAMPLES])
    inputs, expected = load_samples(Path(path), program)
    program.sample_inputs = inputs
    with torch.no_grad():
        actual = program.run([tensor.clone() for tensor in inputs])
    checks = []
    for index, (got, want) in enumerate(zip(actual, expected)):
        atol, rtol = TOLERANCES.get(want.dtype, (0.0, 0.0))
        got = got.detach().cpu()
        if got.shape != want.shape or got.dtype != want.dtype:
            checks.append(SampleCheck(index, str(want.dtype), tuple(want.shape), float("inf"), 0.0, False))
            continue
        difference = (got.double() - want.double()).abs()
        allowed = atol + rtol * want.double().abs()
        error = float(difference.max()) if difference.numel() else 0.0
        ok = bool((difference <= allowed).all()) and bool((got.isnan() == want.isnan()).all())
        tolerance = float(allowed.max()) if allowed.numel() else 0.0
        checks.append(SampleCheck(index, str(want.dtype).removeprefix("torch."), tuple(want.shape), error, tolerance, ok))
    return program, checks


def _weights_to_save(graph: Graph, mutated: Sequence[torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(name -> how it is saved, key -> tensor to save): a tensor held under several names is saved once; each is
    saved dense, with its strides recorded to be restored at load."""
    described: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    named = dict(graph.weights)
    for index, buffer in enumerate(mutated):
        if not any(buffer is tensor for tensor in named.values()):
            named[f"mutated_buffer.{index}"] = buffer
    for name, tensor in named.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype, tensor.device)
        key = seen.setdefault(identity, name)
        if key == name:
            dense = tensor.detach().cpu().contiguous()
            if dense.untyped_storage().data_ptr() in storages:
                dense = dense.clone()  # safetensors keeps no two tensors in one storage
            storages.add(dense.untyped_storage().data_ptr())
            tensors[key] = dense
        described[name] = {"key": key, "strides": list(tensor.stride()), "device": tensor.device.type}
    return described, tensors


def _buffer_name(buffer: torch.Tensor, graph: Graph, index: int) -> str:
    """The weight name a buffer the model updates is saved under."""
    return next((name for name, tensor in graph.weights.items() if tensor is buffer), f"mutated_buffer.{index}")


def _load_weights(directory: Path, described: Mapping[str, Any], params: Mapping[str, Any],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """name -> tensor, each checked against its IR type (shape and dtype) and laid out at its saved strides."""
    on_device = {how["key"] for how in described.values() if how["device"] == "cuda"}
    try:
        saved = load_file(directory / WEIGHTS)
        if on_device and device.type == "cuda":  # read from the mapped file straight into the GPU's memory
            with safe_open(directory / WEIGHTS, framework="pt", device=str(device)) as file:
                saved.update((key, file.get_tensor(key)) for key in on_device)
    except SafetensorError as error:
        raise ArtifactError(f"{directory / WEIGHTS}: not a safetensors file ({error})") from error
    missing = sorted(set(params) - set(described))
    if missing:
        raise ArtifactError(f"{directory / PROGRAM}: weights {', '.join(missing)} are in the graph but not saved")
    weights: dict[str, torch.Tensor] = {}
    for name, how in described.items():
        if how["key"] not in saved:
            raise ArtifactError(f"{directory / WEIGHTS}: holds no tensor {how['key']!r} (weight {name})")
        tensor = saved[how["key"]]
        if name in params:
            expected = params[name]["type"]
            if list(tensor.shape) != expected["shape"] or str(tensor.dtype).removeprefix("torch.") != expected["dtype"]:
                raise ArtifactError(f"{directory / WEIGHTS}: weight {name} is {str(tensor.dtype).removeprefix('torch.')}"
                                    f"{list(tensor.shape)}, but the graph reads it as {expected['dtype']}{expected['shape']}")
        target = device if how["device"] == "cuda" else torch.device("cpu")
        if list(tensor.stride()) != how["strides"]:
            tensor = torch.empty_strided(tensor.shape, how["strides"], dtype=tensor.dtype, device=target).copy_(tensor)
        weights[name] = tensor.to(target)
    return weights


def _compare_sources(directory: Path, work: Sequence[Any]) -> None:
    """Log each generated kernel whose source differs from the one saved (another version of ember's codegen)."""
    for step in work:
        if isinstance(step, GroupKernel):
            saved = directory / KERNELS / f"{step.name}.py"
            if not saved.is_file() or saved.read_text() != step.kernel.source.source:
                log.warning("kernel %s: this ember generates other source than the saved %s; running this ember's",
                            step.name, saved)


def _treespec(text: str | None) -> pytree.TreeSpec | None:
    """A saved call or result structure; the modules defining its types (transformers' outputs) are imported from
    the installed packages first, never from the artifact."""
    if text is None:
        return None
    for name in _type_names(json.loads(text)):
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and "." in name:
            module = name.rsplit(".", 1)[0]
            if importlib.util.find_spec(module.split(".")[0]) is None:
                raise ArtifactError(f"the program's inputs or outputs are a {name}, and {module} is not installed")
            importlib.import_module(module)
    register_transformers_caches()
    try:
        return pytree.treespec_loads(text)
    except (NotImplementedError, KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"cannot rebuild the program's call or result structure: {error}") from error


def _type_names(data: Any) -> set[str]:
    """Every node type a serialized treespec names."""
    names: set[str] = set()
    if isinstance(data, dict):
        if isinstance(data.get("type"), str):
            names.add(data["type"])
        for value in data.values():
            names |= _type_names(value)
    elif isinstance(data, list):
        for value in data:
            names |= _type_names(value)
    return names


def _built_for(graph: Graph) -> dict[str, Any]:
    """The device the program was built for: its kind, and on a GPU its name and compute capability."""
    weights = [tensor for tensor in graph.weights.values() if tensor.is_cuda]
    on_gpu = weights or any(value.type.device == "cuda" for value in graph.inputs)
    if not on_gpu:
        return {"type": "cpu", "machine": platform.machine()}
    index = weights[0].device.index if weights else torch.cuda.current_device()
    return {"type": "cuda", "name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index))}


def _load_device(manifest: Mapping[str, Any], device: str | torch.device | None) -> torch.device:
    """Where the loaded program runs: `device`, else a GPU for one built on a GPU (refused without one)."""
    built = manifest["device"]
    if device is not None:
        target = torch.device(device)
        if target.type != built["type"]:
            raise ArtifactError(f"this program was built for {built['type']} and its plans and kernels are for "
                                f"{built['type']}: load it there, or export the model again for {target.type}")
    else:
        target = torch.device(built["type"])
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError(f"this program was built for a GPU ({built.get('name')}) and this machine has none")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        capability = list(torch.cuda.get_device_capability(target))
        if capability != built.get("capability"):
            log.info("built on compute capability %s, running on %s: kernels compile for this GPU from their sources",
                     built.get("capability"), capability)
    return target


def _program_device(program: Program) -> torch.device:
    for tensor in program.graph.weights.values():
        if tensor.is_cuda:
            return tensor.device
    return torch.device("cuda" if any(v.type.device == "cuda" for v in program.graph.inputs) else "cpu")


def _write_manifest(directory: Path, files: Sequence[str], device: Mapping[str, Any]) -> None:
    body = {
        "format": FORMAT,
        "schema": SCHEMA,
        "ember": _ember_version(),
        "torch": torch.__version__,
        "triton": _installed("triton"),
        "device": dict(device),
        "files": {name: {"sha256": _file_digest(directory / name), "bytes": (directory / name).stat().st_size,
                         "block_bytes": BLOCK_BYTES, "blocks": _block_digests(directory / name, BLOCK_BYTES)}
                  for name in files},
    }
    (directory / MANIFEST).write_text(json.dumps({**body, "checksum": _digest(_canonical(body))}, indent=1) + "\n")


def _read_json(directory: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((directory / name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{directory / name}: not readable JSON ({error})") from error
    if not isinstance(data, dict):
        raise ArtifactError(f"{directory / name}: not a JSON object")
    return data


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _block_digests(path: Path, block_bytes: int) -> list[str]:
    """The sha256 of each `block_bytes` of the file, hashed on every core (hashlib lets go of the GIL)."""
    size = path.stat().st_size
    if size == 0:
        return []
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                return list(pool.map(lambda start: hashlib.sha256(view[start:start + block_bytes]).hexdigest(),
                                     range(0, size, block_bytes)))
        finally:
            view.release()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _ember_version() -> str:
    return _installed("ember")
