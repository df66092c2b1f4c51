"""
Configuration reload: SIGHUP (or ``POST /internal/reload``) re-reads the
same file, validates it completely, then applies it atomically.

An invalid file changes nothing: the daemon keeps running on the old
configuration and logs one line (file, key path, problem).  The signal
handler itself only schedules the work on the reactor thread.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import Service
from twisted.logger import Logger

from .config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from .service import OllaService

log = Logger()


class ReloadResult:
    """What a reload did: ``ok`` and a one-line summary (or the error)."""

    def __init__(self, ok: bool, summary: str) -> None:
        self.ok = ok
        self.summary = summary


class ConfigReloader(Service):
    """Owns the SIGHUP handler and the reload procedure for one service."""

    name = "reloader"

    def __init__(
        self, target: OllaService, path: str | None, reactor: Any, loader: Callable[[str], Config] = load_config
    ) -> None:
        self.target = target
        self.path = path
        self.reactor = reactor
        self.loader = loader
        self._previous: Any = None
        self.reloads = 0
        self.failures = 0

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = signal.signal(signal.SIGHUP, self._on_sighup)
        except ValueError:  # not the main thread (e.g. some test runners)
            self._previous = None

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._reload_all)

    def _reload_all(self) -> None:
        self.reload()
        workers = getattr(self.target, "workers", None)
        if workers is not None:
            workers.signal_all("HUP")  # each worker re-reads the same file

    def reload(self) -> ReloadResult:
        """Re-read, validate and apply the configuration file."""
        if self.path is None:
            log.warn("reload requested, but olladmr runs on its built-in defaults: no file to re-read")
            return ReloadResult(False, "no configuration file")
        try:
            config = self.loader(self.path)
        except ConfigError as error:
            self.failures += 1
            self.target.metrics.reloads.labels("failure").inc()
            log.error("reload failed, keeping the running configuration: {error}", error=str(error))
            return ReloadResult(False, str(error))
        summary = self.target.apply_config(config)
        self.reloads += 1
        self.target.metrics.reloads.labels("success").inc()
        log.info("reloaded {path}: {summary}", path=self.path, summary=summary)
        return ReloadResult(True, summary)
