"""
The daemon's own state as operators see it: when it started, which
configuration is in force and since when, where it listens, which worker
this is, and whether it is draining.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

from ..config.schema import Config


class ReloadResult:
    """What a reload did: ``ok`` and a one-line summary (or the error)."""

    def __init__(self, ok: bool, summary: str) -> None:
        self.ok = ok
        self.summary = summary


class Lifecycle:
    """Owns the process's start time, the configuration in force (and its load time) and the draining flag."""

    def __init__(
        self,
        clock: IReactorTime,
        config: Config,
        *,
        address: Callable[[], str],
        worker_index: int = 0,
        workers: int = 1,
    ) -> None:
        self._clock = clock
        self.config = config
        self.address = address
        self.worker_index = worker_index
        self.workers = workers
        self.started_at = clock.seconds()
        self.loaded_at = self.started_at
        self.draining = False

    def reconfigure(self, config: Config) -> None:
        """``config`` is now in force."""
        self.config = config
        self.loaded_at = self._clock.seconds()

    def now(self) -> float:
        """The clock's time now."""
        return self._clock.seconds()

    def uptime(self) -> float:
        """Seconds since start."""
        return self._clock.seconds() - self.started_at

    def drain(self) -> None:
        """The daemon is shutting down: report not-ready from now on."""
        self.draining = True
