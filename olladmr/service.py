"""
The service tree: one :class:`OllaService` owning the configuration, the
fleet, the upstream client, the proxy, the route tree, the listening port
and (as child services) the health monitor and the config reloader.

Start-up order: bind the port (before privileges are shed, so a bind
failure stops the daemon with one line), pause accepting, run the first
round of health checks, then accept.  So the first request never meets an
endpoint in state ``unknown``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__
from .config import Config
from .fleet import Fleet
from .gate import Gate
from .health import HealthMonitor
from .logs import AccessLog, LogControl, install_on
from .metrics import Metrics
from .models import Catalogue
from .proxy import Proxy
from .reload import ConfigReloader
from .routes import OllaApp
from .site import OllaSite
from .upstream import UpstreamClient
from .workers import WorkerPool, adopt, family_of, watch_master

log = Logger()


class ListenError(SystemExit):
    """The daemon cannot listen where it was told to; ends the process with one line."""


class OllaService(MultiService):
    """Owns the running daemon: config, fleet, proxy, site, port, child services."""

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any,
        listen: str | None = None,
        config_path: str | None = None,
        log_control: LogControl | None = None,
        workers: int = 1,
        inherit: tuple[int, int] | None = None,
        worker_index: int = 0,
    ) -> None:
        super().__init__()
        self.inherit = inherit
        self.worker_index = worker_index
        self.reactor = reactor
        self.config = config
        self.config_path = config_path
        self.log_control = log_control or LogControl(config.logging.level, config.logging.format)
        self.listen_description = listen or config.server.listen
        self.started_at = reactor.seconds()
        self.loaded_at = self.started_at
        self.client = UpstreamClient(reactor, config.proxy)
        self.fleet = Fleet(config, reactor)
        self.catalogue = Catalogue(self.fleet)
        self.proxy = Proxy(self.fleet, self.client, reactor, config)
        self.health = HealthMonitor(
            self.fleet,
            self.client,
            reactor,
            busy_threshold=lambda: self.config.proxy.busy_threshold,
            discovery_interval=lambda: self.config.model_discovery_interval,
        )
        self.health.setServiceParent(self)
        self.proxy.health = self.health
        self.reloader = ConfigReloader(self, config_path, reactor)
        self.reloader.setServiceParent(self)
        self.listen_overridden = listen is not None or inherit is not None
        self.workers: WorkerPool | None = None
        if workers > 1 and inherit is None:
            argv = ["-n", "--pidfile=", "olladmr"] + (["--config", config_path] if config_path else [])
            self.workers = WorkerPool(
                reactor,
                workers,
                fd=lambda: self.port.fileno(),  # type: ignore[union-attr]
                family=lambda: family_of(self.port),
                argv=argv,
                shutdown_timeout=lambda: self.config.server.shutdown_timeout,
            )
            self.workers.setServiceParent(self)
        self.gate = Gate(config.server, reactor)
        self.proxy.gate = self.gate
        self.metrics = Metrics(self.fleet, lambda: len(self.proxy.active))
        self.access_log = AccessLog(self.log_control)
        self.proxy.observers += [self.metrics, self.access_log]
        self.health.observe_check = self.metrics.health_checks_observe
        self.metrics.config_loaded.set(self.loaded_at)
        self.app = OllaApp(self)
        self.site = OllaSite(self.app.resource(), reactor, config.server)
        self.site.access_log = self.access_log
        self.port: IListeningPort | None = None
        self.serving: Deferred[None] = Deferred()
        self.draining = False

    # -- twistd integration

    def setServiceParent(self, parent: Any) -> None:
        install_on(parent, self.log_control)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        self._bind()
        super().privilegedStartService()

    def _bind(self) -> None:
        if self.port is not None:
            return
        if self.inherit is not None:
            fd, family = self.inherit
            self.port = adopt(self.reactor, fd, family, self.site)
            self.port.stopReading()  # type: ignore[attr-defined]
            watch_master(self.reactor, self._master_gone)
            return
        try:
            endpoint = endpoints.serverFromString(self.reactor, self.listen_description)
        except (ValueError, KeyError, TypeError) as exc:
            raise ListenError(f"olladmr: invalid listen address {self.listen_description!r}: {exc}") from None
        result: list[Any] = []
        endpoint.listen(self.site).addBoth(result.append)
        if not result:
            raise ListenError(f"olladmr: listening on {self.listen_description!r} did not complete at start-up")
        outcome = result[0]
        if isinstance(outcome, Failure):
            raise ListenError(
                f"olladmr: cannot listen on {self.listen_description}: {outcome.getErrorMessage()}"
            )
        self.port = outcome
        pause = getattr(outcome, "stopReading", None)
        if pause is not None:
            pause()  # accept nothing until the first health round is done

    def startService(self) -> None:
        self._bind()
        super().startService()
        self.gate.start()
        if self.config.ignored:
            log.warn(
                "{source}: ignoring keys olladmr does not use: {keys}",
                source=self.config.source,
                keys=", ".join(self.config.ignored),
            )
        self.health.first_round.addCallback(self._accept)

    def _master_gone(self) -> None:
        if self.running:
            log.warn("worker {index}: the master process is gone; shutting down", index=self.worker_index)
            self.reactor.stop()

    def _accept(self, _: object = None) -> None:
        if not self.running or self.port is None:
            return
        resume = getattr(self.port, "startReading", None)
        if resume is not None:
            resume()
        log.info(
            "olladmr {version} {role} listening on {address} (config: {source}); endpoints: {endpoints}",
            version=__version__,
            role=f"worker {self.worker_index} (pid {os.getpid()})" if self.inherit else f"master (pid {os.getpid()})",
            address=self.address,
            source=self.config.source,
            endpoints=", ".join(
                f"{ep.name}={ep.config.url} [{ep.status}]" for ep in self.fleet
            ),
        )
        if not self.serving.called:
            self.serving.callback(None)

    @property
    def address(self) -> str:
        if self.port is None:
            return self.listen_description
        host = self.port.getHost()
        if hasattr(host, "port"):
            return f"{host.host}:{host.port}"
        return str(getattr(host, "name", host))

    def stopService(self) -> Deferred[None]:
        """Stop accepting, let in-flight requests finish (up to shutdown_timeout), then stop."""
        self._clear_exit_signal()
        self.draining = True
        port, self.port = self.port, None
        return Deferred.fromCoroutine(self._stop(port))

    async def _stop(self, port: IListeningPort | None) -> None:
        if self.workers is not None:
            self.workers.terminate()  # they drain in parallel with us
        if port is not None:
            await _maybe(port.stopListening())
        active = len(self.proxy.active)
        if active:
            timeout = self.config.server.shutdown_timeout
            log.info("draining {count} in-flight requests (up to {timeout}s)", count=active, timeout=timeout)
            drained = self.proxy.when_idle()
            drained.addTimeout(timeout, self.reactor)
            try:
                await drained
            except Exception:
                left = list(self.proxy.active)
                log.warn("shutdown_timeout reached: aborting {count} requests", count=len(left))
                for exchange in left:
                    exchange.abort()
        await _maybe(super().stopService())
        self.gate.stop()
        await self.client.close()
        self._clear_exit_signal()

    def _clear_exit_signal(self) -> None:
        # twistd re-raises SIGTERM/SIGINT at exit so the process "dies by signal";
        # a drained, orderly stop is a success: exit status 0.
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None

    # -- reload

    def apply_config(self, config: Config) -> str:
        """Switch to ``config`` atomically; returns a one-line summary of what changed."""
        old = self.config
        added, removed, changed = self.fleet.apply(config)
        self.proxy.configure(config)
        self.site.configure(config.server)
        self.gate.configure(config.server)
        self.log_control.configure(config.logging.level, config.logging.format)
        self.config = config
        self.loaded_at = self.reactor.seconds()
        self.metrics.config_loaded.set(self.loaded_at)
        if self.running:
            self.health.reconcile()
        parts = []
        for label, names in (("added", added), ("removed", removed), ("changed", changed)):
            if names:
                parts.append(f"{label} {', '.join(names)}")
        for section in ("proxy", "logging"):
            if getattr(old, section) != getattr(config, section):
                parts.append(f"{section} settings changed")
        if old.server.request_limits != config.server.request_limits:
            parts.append("request limits changed")
        if not self.listen_overridden and old.server.listen != config.server.listen:
            log.warn(
                "the listen address changed to {new}; it takes effect only after a restart (still on {old})",
                new=config.server.listen,
                old=self.listen_description,
            )
            parts.append("listen address change needs a restart")
        return "; ".join(parts) or "no changes"

    # -- readiness

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        routable = self.fleet.routable()
        if not routable:
            return False, "no endpoint is routable"
        return True, f"{len(routable)} of {len(self.fleet)} endpoints routable"

    def status(self) -> dict[str, Any]:
        from .status import service_status

        return service_status(self)

    def endpoints_status(self) -> dict[str, Any]:
        from .status import endpoints_status

        return endpoints_status(self)

    def models_status(self) -> dict[str, Any]:
        from .status import models_status

        return models_status(self)


async def _maybe(value: Any) -> Any:
    if isinstance(value, Deferred):
        return await value
    return value
