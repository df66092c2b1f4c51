"""
The running daemon: the listening port and the service tree's lifecycle.

:class:`OllaService` is a ``MultiService`` whose children are the health
monitor, the config reloader and (with ``--workers``) the worker pool; the
composition root (:mod:`olladmr.build`) builds every part and hands it
the ones it drives.  Start-up order: bind the port (before privileges are
shed, so a bind failure stops the daemon with one line), pause accepting,
run the first round of health checks, then accept.  So the first request
never meets an endpoint in state ``unknown``.  Shutdown: stop accepting,
report not-ready, drain in-flight requests for up to
``server.shutdown_timeout``, abort the rest, exit 0.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Protocol, Sequence, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IFileDescriptor, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from .reactors import IReactor
from . import __version__
from ._twisted_compat import accept_one_at_a_time, clear_exit_signal
from .edge.gate import Gate
from .edge.site import OllaSite
from .fleet.health import HealthMonitor
from .fleet.state import Fleet
from .ops.lifecycle import Lifecycle
from .ops.logs import LogControl, install_on
from .proxy.proxy import InFlight
from .proxy.upstream import UpstreamClient
from .workers import WorkerPool, adopt, watch_master

log = Logger()


class _HostPort(Protocol):
    """An address with ``host`` and ``port`` (``IPv4Address``, ``IPv6Address``)."""

    host: str
    port: int


class ListenError(SystemExit):
    """The daemon cannot listen where it was told to; ends the process with one line."""


#: Pending connections the kernel may queue for us (Twisted's default is 50: a burst of 100 clients
#: connecting at once then waits a second for SYN retransmits; nginx asks for 511, Go for somaxconn).
LISTEN_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """A listen ``description`` with ``backlog=LISTEN_BACKLOG`` unless it names a backlog itself."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


class Listener(Service):
    """
    Owns the listening port: binding (or adopting an inherited socket),
    pausing, resuming, closing.  As a child service it closes when the tree
    stops; :class:`OllaService` closes it first, before the drain.
    """

    name = "listener"

    def __init__(
        self, reactor: IReactor, description: str, *, inherit: tuple[int, int] | None = None, shared: bool = False
    ) -> None:
        self._reactor = reactor
        self.description = description
        self.inherit = inherit
        self.shared = shared or inherit is not None  # other processes accept on the same socket (--workers)
        self.port: IListeningPort | None = None

    def bind(self, site: OllaSite) -> None:
        """Listen (paused: nothing is accepted until :meth:`resume`), or raise :class:`ListenError`."""
        if self.port is not None:
            return
        if self.inherit is not None:
            fd, family = self.inherit
            self.port = adopt(self._reactor, fd, family, site)
            accept_one_at_a_time(self.port)
            self.pause()
            return
        try:
            endpoint = endpoints.serverFromString(self._reactor, with_backlog(self.description))
        except (ValueError, KeyError, TypeError) as exc:
            raise ListenError(f"olladmr: invalid listen address {self.description!r}: {exc}") from None
        result: list[Any] = []
        endpoint.listen(site).addBoth(result.append)
        if not result:
            raise ListenError(f"olladmr: listening on {self.description!r} did not complete at start-up")
        outcome = result[0]
        if isinstance(outcome, Failure):
            raise ListenError(f"olladmr: cannot listen on {self.description}: {outcome.getErrorMessage()}")
        self.port = outcome
        if self.shared:
            accept_one_at_a_time(self.port)  # processes sharing the socket take turns
        self.pause()

    def pause(self) -> None:
        """Stop accepting connections (the socket stays bound)."""
        stop = getattr(self.port, "stopReading", None)
        if stop is not None:
            stop()

    def resume(self) -> None:
        """Accept connections."""
        start = getattr(self.port, "startReading", None)
        if start is not None:
            start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self.close()

    def close(self) -> Deferred[None] | None:
        """Stop listening (once)."""
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()

    def fileno(self) -> int:
        """The listening socket's file descriptor (for worker processes)."""
        assert self.port is not None, "not listening"
        return cast(IFileDescriptor, self.port).fileno()  # a socket port is its own file descriptor

    def family(self) -> int:
        """The listening socket's address family (for worker processes)."""
        sock = getattr(self.port, "socket", None)
        if sock is None:
            raise ValueError("this listening port has no socket to share")
        return int(sock.family)

    def address(self) -> str:
        """Where we listen, as ``host:port`` (or the socket path, or the description before binding)."""
        if self.port is None:
            return self.description
        host = self.port.getHost()
        if hasattr(host, "port"):
            address = cast(_HostPort, host)
            return f"{address.host}:{address.port}"
        return str(getattr(host, "name", host))


class OllaService(MultiService):
    """Owns the daemon's lifecycle: start-up order, accepting, draining and stopping its parts."""

    def __init__(
        self,
        *,
        reactor: IReactor,
        listener: Listener,
        site: OllaSite,
        fleet: Fleet,
        health: HealthMonitor,
        gate: Gate,
        inflight: InFlight,
        upstream: UpstreamClient,
        lifecycle: Lifecycle,
        log_control: LogControl,
        children: Sequence[IService] = (),
        workers: WorkerPool | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.listener = listener
        self._site = site
        self._fleet = fleet
        self._health = health
        self._inflight = inflight
        self._lifecycle = lifecycle
        self._log_control = log_control
        self._workers = workers
        # Started in this order, stopped in the reverse: the pool closes and the listener (closed before the
        # drain already) last; the health monitor, reloader and the rest first, after the drain.
        listener.setServiceParent(self)
        upstream.setServiceParent(self)
        gate.setServiceParent(self)
        health.setServiceParent(self)
        for child in children:
            child.setServiceParent(self)
        if workers is not None:
            workers.setServiceParent(self)
        self.serving: Deferred[None] = Deferred()

    @property
    def port(self) -> IListeningPort | None:
        """The listening port, once bound."""
        return self.listener.port

    # -- twistd integration

    def setServiceParent(self, parent: Any) -> None:
        install_on(parent, self._log_control)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        self.listener.bind(self._site)
        super().privilegedStartService()

    def startService(self) -> None:
        self.listener.bind(self._site)
        super().startService()
        config = self._lifecycle.config
        if config.ignored:
            log.warn(
                "{source}: ignoring keys olladmr does not use: {keys}",
                source=config.source,
                keys=", ".join(config.ignored),
            )
        if self.listener.inherit is not None:
            watch_master(self._reactor, self._master_gone, self._health.adopt)
        self._health.first_round.addCallback(self._accept)

    def _master_gone(self) -> None:
        if self.running:
            log.warn("worker {index}: the master process is gone; shutting down", index=self._lifecycle.worker_index)
            self._reactor.stop()

    def _accept(self, _: object = None) -> None:
        if not self.running or self.listener.port is None:
            return
        self.listener.resume()
        life = self._lifecycle
        log.info(
            "olladmr {version} {role} listening on {address} (config: {source}); endpoints: {endpoints}",
            version=__version__,
            role=f"worker {life.worker_index} (pid {os.getpid()})" if self.listener.inherit else f"master (pid {os.getpid()})",
            address=self.listener.address(),
            source=life.config.source,
            endpoints=", ".join(f"{ep.name}={ep.config.url} [{ep.status}]" for ep in self._fleet),
        )
        if not self.serving.called:
            self.serving.callback(None)

    def stopService(self) -> Deferred[None]:
        """Stop accepting, let in-flight requests finish (up to shutdown_timeout), then stop."""
        self._clear_exit_signal()
        self._lifecycle.drain()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._workers is not None:
            self._workers.terminate()  # they drain in parallel with us
        await _maybe(self.listener.close())
        active = len(self._inflight)
        if active:
            timeout = self._lifecycle.config.server.shutdown_timeout
            log.info("draining {count} in-flight requests (up to {timeout}s)", count=active, timeout=timeout)
            drained = self._inflight.when_idle()
            drained.addTimeout(timeout, self._reactor)
            try:
                await drained
            except Exception:
                log.warn("shutdown_timeout reached: aborting {count} requests", count=self._inflight.abort_all())
        await _maybe(super().stopService())  # (the children: the gate's sweep, the upstream pool, ...)
        self._clear_exit_signal()

    def _clear_exit_signal(self) -> None:
        # twistd re-raises SIGTERM/SIGINT at exit so the process "dies by signal";
        # a drained, orderly stop is a success: exit status 0.
        clear_exit_signal(self._reactor, (signal.SIGTERM, signal.SIGINT))


async def _maybe(value: Any) -> Any:
    if isinstance(value, Deferred):
        return await value
    return value
