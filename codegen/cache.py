"""Generated kernels on disk: one module per source, named by the hash of (source, triton version).

Triton needs a kernel's source in a real file (it reads it back through `inspect`), and it caches the
compiled binary per device itself, so a source written once serves every later process. The cache
lives in $EMBER_CACHE_DIR/kernels (default ~/.cache/ember/kernels).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

_LOADED: dict[Path, Any] = {}


def cache_dir() -> Path:
    """Where kernel sources are kept."""
    root = os.environ.get("EMBER_CACHE_DIR") or Path.home() / ".cache" / "ember"
    return Path(root) / "kernels"


def load_kernel(name: str, source: str) -> Callable[..., Any]:
    """The `@triton.jit` function `name` defined by `source`, written to the cache on first use."""
    import triton

    digest = hashlib.sha256(f"{triton.__version__}\n{source}".encode()).hexdigest()[:20]
    path = cache_dir() / f"{name}_{digest}.py"
    if path not in _LOADED:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(source)
            partial.replace(path)  # atomic: a concurrent compile never reads half a file
        spec = importlib.util.spec_from_file_location(f"ember_kernels.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _LOADED[path] = module
    return getattr(_LOADED[path], name)
