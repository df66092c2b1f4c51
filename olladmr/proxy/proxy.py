"""
The proxy: what every exchange shares, and the set of exchanges in flight.

:class:`Proxy` is built once by the composition root with everything an
:class:`~olladmr.proxy.exchange.Exchange` needs -- fleet, upstream
client, clock, configuration, the health feedback callable and the
observers that get each finished record -- and starts one exchange per
proxied request.  :class:`InFlight` owns the live exchanges, so the
service can drain them and the metrics can count them without knowing
about the proxy.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from ..config.schema import Config
from ..fleet.balancer import Balancer, make_balancer
from ..fleet.sessions import SessionRouter
from ..fleet.state import EndpointState, Fleet
from .affinity import ResponseAffinity
from .exchange import Exchange
from .record import ExchangeRecord, ProxyCall
from .upstream import UpstreamClient

log = Logger()


class ExchangeObserver(Protocol):
    """Told about every proxied request when it ends (metrics, access log)."""

    def exchange_done(self, record: ExchangeRecord) -> None: ...


class InFlight:
    """Owns the set of exchanges in flight, and who waits for it to empty."""

    def __init__(self) -> None:
        self._active: set[Exchange] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._active)

    def __iter__(self) -> Iterator[Exchange]:
        return iter(list(self._active))

    def add(self, exchange: Exchange) -> None:
        """``exchange`` has started."""
        self._active.add(exchange)

    def discard(self, exchange: Exchange) -> None:
        """``exchange`` has ended; wake the idle waiters if it was the last."""
        self._active.discard(exchange)
        if not self._active and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires when no exchange is in flight (at once if none is); cancellable."""
        d: Deferred[None] = Deferred(lambda d: self._idle_waiters.remove(d) if d in self._idle_waiters else None)
        if not self._active:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    def abort_all(self) -> int:
        """Abort every exchange's client connection (shutdown deadline); returns how many."""
        left = list(self._active)
        for exchange in left:
            exchange.abort()
        return len(left)


class Proxy:
    """Owns the balancer and what exchanges share: fleet, upstream client, clock, configuration, response affinity, observers."""

    def __init__(
        self,
        fleet: Fleet,
        client: UpstreamClient,
        clock: IReactorTime,
        config: Config,
        *,
        inflight: InFlight,
        responses: ResponseAffinity,
        sessions: SessionRouter,
        mark_offline: Callable[[EndpointState, str], None],
        observers: Sequence[ExchangeObserver] = (),
    ) -> None:
        self.fleet = fleet
        self.client = client
        self.clock = clock
        self.config = config
        self.inflight = inflight
        self.responses = responses
        self.sessions = sessions
        self._mark_offline = mark_offline
        self._observers = tuple(observers)
        self.balancer: Balancer = make_balancer(config.proxy.load_balancer)

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` for new exchanges; running ones keep what they started with."""
        if config.proxy.load_balancer != self.balancer.name:
            self.balancer = make_balancer(config.proxy.load_balancer)
        self.config = config

    def handle(self, request: Request, call: ProxyCall) -> None:
        """Proxy ``request``; the exchange finishes it."""
        Exchange(self, request, call).start()

    # -- ExchangeHost

    def mark_offline(self, endpoint: EndpointState, reason: str) -> None:
        """Real traffic could not connect to ``endpoint``: tell the health monitor."""
        self._mark_offline(endpoint, reason)

    def started(self, exchange: Exchange) -> None:
        self.inflight.add(exchange)

    def finished(self, exchange: Exchange) -> None:
        self.inflight.discard(exchange)
        for observer in self._observers:
            try:
                observer.exchange_done(exchange.record)
            except Exception:
                log.failure("exchange observer failed")
