"""Progress on long work (capture, passes, kernel compilation, memory planning, calibration).

Library code reports through `task`; nothing shows unless a caller (the CLI) opened `shown`, which draws rich
progress on stderr when it is a terminal. Every task is also logged at debug level, so `EMBER_LOG=debug` shows it.
"""
from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_PROGRESS: contextvars.ContextVar[Any] = contextvars.ContextVar("ember_progress", default=None)
"""The rich Progress that `shown` opened in this context, or None: where `task` draws."""


@contextmanager
def shown(enabled: bool = True, console: Any = None) -> Iterator[None]:
    """Draw every `task` opened inside on `console` (stderr by default), when `enabled` and it is a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        token = _PROGRESS.set(bar)
        try:
            yield
        finally:
            _PROGRESS.reset(token)


@contextmanager
def task(description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """One line of progress for a stage; yields `update(advance=0, description=None)`.

    A no-op (bar the debug log) unless `shown` is active in this context.
    """
    bar = _PROGRESS.get()
    task_id = bar.add_task(description, total=total) if bar is not None else None
    started = time.perf_counter()
    log.debug("%s …", description)
    shown_last = [description]  # the planner reports after every probe: log a line only when it says something new

    def update(advance: float = 0, description: str | None = None) -> None:
        if description is not None and description != shown_last[0]:
            shown_last[0] = description
            log.debug("%s", description)
        if bar is not None:
            bar.update(task_id, advance=advance, **({"description": description} if description else {}))

    try:
        yield update
    finally:
        log.debug("%s: done in %.2f s", description, time.perf_counter() - started)
        if bar is not None:
            bar.remove_task(task_id)
