"""ProcessStats' collector hook: it times pauses, and never raises, at any depth of the stack."""

from __future__ import annotations

import gc
import sys
from typing import Any

from olladmr.ops.lifecycle import Lifecycle
from olladmr.ops.process import ProcessStats


def _deepest() -> int:
    """How many more frames fit on the stack here."""
    reached = [0]

    def dive(n: int) -> None:
        reached[0] = n
        dive(n + 1)

    try:
        dive(0)
    except RecursionError:
        pass
    return reached[0]


def _collect_at(n: int) -> None:
    if n:
        _collect_at(n - 1)
    else:
        gc.collect()


def test_a_collection_near_the_recursion_limit_is_never_an_unraisable_error(monkeypatch: Any) -> None:
    """
    A collection that starts near Python's recursion limit (json.loads on a
    deeply nested request body, found by the fuzz) runs the hook where even a
    builtin's call raises RecursionError: the pause goes untimed, nothing is
    printed as unraisable, and the next collection is timed again.
    """
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_type))
    stats = ProcessStats(Lifecycle.__new__(Lifecycle))
    stats.startService()
    try:
        deepest = _deepest()
        for n in range(deepest - 30, deepest + 1):  # some leave room for gc.collect but not for the hook's calls
            try:
                _collect_at(n)
            except RecursionError:
                pass
        assert unraisable == []
        before = stats.pauses
        gc.collect()
        assert stats.pauses == before + 1 and stats._started is None
    finally:
        stats.stopService()
