"""
``/internal/process``: the Python process as Olla's Go one reports itself
-- memory, garbage collection (counts and pause times), threads, uptime,
versions.

:class:`ProcessStats` is a service: it times the garbage collector's
pauses with a ``gc.callbacks`` hook while it runs.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import threading
import time
from typing import Any

import twisted
from twisted.application.service import Service

from .. import __version__
from .lifecycle import Lifecycle


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ProcessStats(Service):
    """Owns the garbage-collection pause timing; reads the rest of the process's numbers on demand."""

    name = "process"

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._started: float | None = None
        self.pauses = 0
        self.pause_total = 0.0
        self.pause_max = 0.0
        self.last_pause: float | None = None

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        # A collection can start anywhere, also deep inside a recursion near Python's limit (json.loads on a
        # deeply nested request body): there even a builtin's call raises RecursionError, which the collector
        # would print to stderr as unraisable.  Such a pause goes untimed.
        try:
            if phase == "start":
                self._started = time.perf_counter()
            elif self._started is not None:
                pause = time.perf_counter() - self._started
                self._started = None
                self.pauses += 1
                self.pause_total += pause
                if pause > self.pause_max:
                    self.pause_max = pause
                self.last_pause = pause
        except RecursionError:
            self._started = None

    def startService(self) -> None:
        super().startService()
        callbacks = getattr(gc, "callbacks", None)  # CPython only (PyPy's gc has no hooks: pauses stay 0)
        if callbacks is not None:
            callbacks.append(self._hook)

    def stopService(self) -> None:
        super().stopService()
        callbacks = getattr(gc, "callbacks", None)
        if callbacks is not None and self._hook in callbacks:
            callbacks.remove(self._hook)

    def snapshot(self) -> dict[str, Any]:
        """The JSON body of ``/internal/process`` (CPython's collector figures; empty ones on PyPy)."""
        get_stats = getattr(gc, "get_stats", None)
        stats = get_stats() if get_stats is not None else []
        if not isinstance(stats, list):
            stats = []  # PyPy: one GcStats object, not CPython's per-generation dicts
        return {
            "timestamp": time.time(),
            "pid": os.getpid(),
            "uptime_s": round(self._lifecycle.uptime(), 3),
            "memory": {"rss_bytes": _rss_bytes()},
            "garbage_collection": {
                "enabled": gc.isenabled(),
                "thresholds": list(gc.get_threshold()) if hasattr(gc, "get_threshold") else [],
                "counts": list(gc.get_count()) if hasattr(gc, "get_count") else [],
                "collections": [s.get("collections", 0) for s in stats],
                "collected": [s.get("collected", 0) for s in stats],
                "uncollectable": [s.get("uncollectable", 0) for s in stats],
                "pauses": self.pauses,
                "pause_total_ms": round(self.pause_total * 1000, 3),
                "pause_max_ms": round(self.pause_max * 1000, 3),
                "last_pause_ms": None if self.last_pause is None else round(self.last_pause * 1000, 3),
            },
            "threads": {"count": threading.active_count()},
            "runtime": {
                "olladmr": __version__,
                "python": platform.python_version(),
                "implementation": platform.python_implementation(),
                "twisted": twisted.__version__,
                "platform": sys.platform,
                "cpu_count": os.cpu_count(),
            },
        }
