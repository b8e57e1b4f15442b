"""Why a graph pass changed what it changed: a pass records each decision with the numbers behind it, and the
pipeline collects them per pass (`Program.report.pass_decisions`, shown in the compile report).

A pass stays a `Graph -> Graph` function: it calls `record`, which notes the decision for the pass the pipeline
is running (and logs it), and does nothing more when the pass runs on its own.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

log = logging.getLogger(__name__)

_RECORDS: ContextVar[list[str] | None] = ContextVar("ember_pass_decisions", default=None)


def record(decision: str) -> None:
    """Note one decision of the running pass, in words with its numbers ("3 linears of one row joined: ...")."""
    log.debug("%s", decision)
    records = _RECORDS.get()
    if records is not None:
        records.append(decision)


@contextmanager
def recording() -> Iterator[list[str]]:
    """The decisions the code run inside records, in order."""
    records: list[str] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)
