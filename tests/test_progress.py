"""Long work reports progress where the CLI shows it, and nothing anywhere else."""
from __future__ import annotations

import io
import logging

from rich.console import Console

from ember import progress
from ember.optimizer.memory_plan import plan_intervals


def test_shown_draws_tasks_and_their_updates_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with progress.shown(console=console):
        with progress.task("capturing Model", total=2) as update:
            update(advance=1, description="pass 1/2: fold")
    assert "capturing Model" in out.getvalue() and "\x1b[2K" in out.getvalue()  # drawn, then cleared


def test_nothing_is_drawn_off_a_terminal_or_when_quiet():
    for console, enabled in ((Console(file=io.StringIO(), force_terminal=False), True),
                             (Console(file=io.StringIO(), force_terminal=True), False)):
        with progress.shown(enabled, console=console):
            with progress.task("capturing") as update:
                update(description="still capturing")
        assert console.file.getvalue() == ""


def test_memory_planning_reports_its_best_arena_and_bound(caplog):
    """The planner's incumbent and bound reach the progress line (and the debug log, which mirrors it)."""
    sizes = [512, 1216, 1152, 320, 768, 1280, 1024, 1216, 192, 1280, 64, 1024]  # greedy is 64 bytes above the bound
    starts = [4, 8, 3, 3, 7, 8, 8, 7, 6, 10, 2, 3]
    ends = [9, 9, 9, 7, 10, 13, 8, 12, 12, 10, 3, 9]
    with caplog.at_level(logging.DEBUG, logger="ember.progress"):
        plan_intervals(sizes, starts, ends, alignment=64, time_limit=2.0)
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("planning memory: 12 buffers") for message in messages)
    assert any("best" in message and "bound" in message for message in messages)
