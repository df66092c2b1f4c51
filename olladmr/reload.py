"""
Configuration reload: SIGHUP (or ``POST /internal/reload``) re-reads the
same file, validates it completely, then applies it atomically.

Buildbot's split, made small: the :class:`ConfigReloader` is given a
``load`` callable (validate: path -> Config, or ConfigError) and an
``apply`` callable (:meth:`Reconfiguration.apply`), which hands the new
configuration to every reconfigurable part, in a fixed order, through one
protocol: ``reconfigure(config)``.  An invalid file changes nothing: the
daemon keeps running on the old configuration and logs one line (file,
key path, problem).  The signal handler itself only schedules the work on
the reactor thread.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from .config.reader import ConfigError
from .config.schema import Config
from .ops.lifecycle import ReloadResult

log = Logger()


class Reconfigurable(Protocol):
    """A part that adopts a reloaded configuration (in-flight work keeps what it started with)."""

    def reconfigure(self, config: Config) -> None: ...


def describe_changes(old: Config, new: Config, *, listen_fixed: bool) -> str:
    """A one-line summary of what ``new`` changes against ``old``."""
    before = {ep.name: ep for ep in old.endpoints}
    after = {ep.name: ep for ep in new.endpoints}
    added = [name for name in after if name not in before]
    removed = [name for name in before if name not in after]
    changed = [name for name in after if name in before and before[name] != after[name]]
    parts = []
    for label, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            parts.append(f"{label} {', '.join(names)}")
    for section in ("proxy", "logging"):
        if getattr(old, section) != getattr(new, section):
            parts.append(f"{section} settings changed")
    if old.server.request_limits != new.server.request_limits:
        parts.append("request limits changed")
    if not listen_fixed and old.server.listen != new.server.listen:
        parts.append("listen address change needs a restart")
    return "; ".join(parts) or "no changes"


class Reconfiguration:
    """Owns the configuration in force and the ordered list of parts a new one is applied to."""

    def __init__(self, config: Config, parts: Sequence[Reconfigurable], *, listen: str, listen_fixed: bool) -> None:
        self.config = config
        self._parts = tuple(parts)
        self._listen = listen
        self._listen_fixed = listen_fixed

    def apply(self, config: Config) -> str:
        """Switch every part to ``config``; returns the one-line summary of what changed."""
        summary = describe_changes(self.config, config, listen_fixed=self._listen_fixed)
        if not self._listen_fixed and config.server.listen != self.config.server.listen:
            log.warn(
                "the listen address changed to {new}; it takes effect only after a restart (still on {old})",
                new=config.server.listen,
                old=self._listen,
            )
        for part in self._parts:
            part.reconfigure(config)
        self.config = config
        return summary


class ConfigReloader(Service):
    """Owns the SIGHUP handler, the reload procedure and the reload counts."""

    name = "reloader"

    def __init__(
        self,
        path: str | None,
        reactor: IReactorFromThreads,
        *,
        load: Callable[[str], Config],
        apply: Callable[[Config], str],
        observers: Sequence[Callable[[ReloadResult], None]] = (),
        forward: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.reactor = reactor
        self._load = load
        self._apply = apply
        self._observers = tuple(observers)  # told of every reload's result (metrics, the dashboard's event log)
        self._forward = forward  # tell worker processes to reload too
        self._previous: Any = None
        self.reloads = 0
        self.failures = 0

    def counts(self) -> tuple[int, int]:
        """(succeeded, failed) reloads so far."""
        return self.reloads, self.failures

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
        if self._forward is not None:
            self._forward()  # each worker re-reads the same file

    def reload(self) -> ReloadResult:
        """Re-read, validate and apply the configuration file."""
        if self.path is None:
            log.warn("reload requested, but olladmr runs on its built-in defaults: no file to re-read")
            return ReloadResult(False, "no configuration file")
        try:
            config = self._load(self.path)
        except ConfigError as error:
            self.failures += 1
            log.error("reload failed, keeping the running configuration: {error}", error=str(error))
            return self._tell(ReloadResult(False, str(error)))
        summary = self._apply(config)
        self.reloads += 1
        log.info("reloaded {path}: {summary}", path=self.path, summary=summary)
        return self._tell(ReloadResult(True, summary))

    def _tell(self, result: ReloadResult) -> ReloadResult:
        for observe in self._observers:
            observe(result)
        return result
