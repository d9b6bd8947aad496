"""Hard wall-clock limits for solvers whose steps cannot all be sized in advance.

A solver sizes its search by its time limit, but some of its steps (one layer assignment with a balance repair
at DeepSeek-V3 size) can take seconds each, so a search started just before its limit overran it by minutes.
``hard_deadline(at)`` sets an absolute ``time.perf_counter()`` time for everything called inside it (per thread
and task: a context variable); long loops call ``check_deadline(where)`` between steps, which raises
``SolveTimeout`` once that time has passed, and the caller falls back to what it has (placement/replan/solve.py
re-plans from the current plan). Outside a ``hard_deadline`` block nothing is checked and nothing changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from placement.plan import PlanError

_DEADLINE: ContextVar[float | None] = ContextVar("moeplace_solver_deadline", default=None)


class SolveTimeout(PlanError):
    """A solver step started after the hard deadline of the enclosing ``hard_deadline`` block."""


@contextmanager
def hard_deadline(at: float) -> Iterator[None]:
    """Solvers called inside stop with ``SolveTimeout`` after ``at`` (perf_counter seconds); nested blocks keep
    the earlier of the two deadlines."""
    outer = _DEADLINE.get()
    token = _DEADLINE.set(at if outer is None else min(at, outer))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def deadline_left() -> float | None:
    """Seconds left before the enclosing hard deadline (None outside any ``hard_deadline`` block)."""
    at = _DEADLINE.get()
    return None if at is None else at - time.perf_counter()


def check_deadline(where: str) -> None:
    """Raise ``SolveTimeout`` naming ``where`` when the enclosing hard deadline has passed."""
    left = deadline_left()
    if left is not None and left < 0:
        raise SolveTimeout(f"{where}: stopped {-left:.1f} s after the hard deadline of its caller's time limit")
