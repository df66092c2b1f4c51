"""
The health monitor: one ``LoopingCall`` per endpoint, at that endpoint's
own ``check_interval``, plus model discovery.

Each check is ``GET health_check_url`` bounded by ``check_timeout``, sent
with treq on a connection pool of its own (so checks never queue behind,
or take connections from, the proxy's pool):

* ``healthy``: a 2xx answer (an empty model list is healthy: DMR lists
  only pulled models and loads them lazily);
* ``busy``: a 2xx answer slower than ``proxy.busy_threshold`` (still routable);
* ``unhealthy``: an answer that is not 2xx;
* ``offline``: connection refused, reset or timed out.

Failing endpoints back off (their interval doubles up to a cap) and return
to their normal interval on the first success.  The first round of checks
completes before :attr:`HealthMonitor.first_round` fires, so the listener
can wait for it.  Status changes are logged once, with the reason.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from .. import __version__
from ..reactors import IReactor
from ..bodies import BodyTooLarge, read_body
from .._twisted_compat import use_quiet_factory
from ..config.schema import Config
from ..failures import BAD_RESPONSE, HEADER_TIMEOUT, UpstreamFailure, classify, is_transport_failure, was_cancelled
from .models import model_ids, normalise_model
from .state import BUSY, HEALTHY, OFFLINE, UNHEALTHY, UNKNOWN, EndpointState, Fleet

log = Logger()

BACKOFF_CAP = 60.0
ALL_STATUSES = frozenset({UNKNOWN, HEALTHY, BUSY, UNHEALTHY, OFFLINE})
#: How long a --workers worker waits for the master's first health checks before it accepts anyway (seconds).
FOLLOWER_WAIT = 10.0
MAX_LIST_BYTES = 10 * 1024 * 1024
USER_AGENT = f"olladmr/{__version__}".encode()


class HTTPGetter(Protocol):
    """The part of treq's ``HTTPClient`` the monitor uses (``StubTreq`` and test fakes provide it too)."""

    def get(
        self, url: str, /, *, headers: Headers | None = ..., allow_redirects: bool = ..., unbuffered: bool = ...
    ) -> Deferred[Any]: ...


def health_client(reactor: IReactor) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client on a small pool of its own, and that pool (close it on shutdown)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    use_quiet_factory(pool)
    return HTTPClient(Agent(reactor, pool=pool)), pool


def parse_ps(body: bytes) -> dict[str, bool] | None:
    """DMR's ``/engines/ps`` array as ``{model key: still loading}``, or ``None`` if it is not one."""
    document = parse_json(body)
    if not isinstance(document, list):
        return None
    loaded: dict[str, bool] = {}
    for entry in document:
        if not isinstance(entry, dict) or not isinstance(entry.get("model_name"), str):
            return None
        mode = entry.get("mode") or "completion"
        key = normalise_model(entry["model_name"])
        # an embedding or reranking runner does not serve chat: it is known by its mode too
        loaded[key if mode == "completion" else f"{mode} {key}"] = bool(entry.get("loading", False))
    return loaded


def parse_json(body: bytes) -> Any:
    """JSON from bytes, or ``None`` if it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


class HealthMonitor(Service):
    """
    Owns the periodic checks and model discovery of every endpoint: one
    ``LoopingCall`` per endpoint on the injected clock, the health client's
    pool, and the listeners told about status changes.
    """

    name = "health"

    def __init__(
        self,
        fleet: Fleet,
        http: HTTPGetter,
        clock: IReactorTime,
        config: Config,
        *,
        pool: HTTPConnectionPool | None = None,
        observe_check: Callable[[str, str, float], None] | None = None,
        listeners: tuple[Callable[[EndpointState, str, str], None], ...] = (),
        share: Callable[[list[dict[str, object]]], None] | None = None,
        follower: bool = False,
    ) -> None:
        self.fleet = fleet
        self.http = http
        self.clock = clock
        self._pool = pool
        self._observe_check = observe_check
        self._listeners = listeners
        self._busy_threshold = config.proxy.busy_threshold
        self._discovery_interval = config.model_discovery_interval
        self._loops: dict[str, tuple[LoopingCall, float]] = {}
        self._checking: set[str] = set()
        self._soon: dict[str, Any] = {}
        self._bad_ps: set[str] = set()
        self._polling: set[str] = set()
        self._share = share  # --workers master: what the checks found goes to every worker
        self.follower = follower  # --workers worker: no checks of its own but re-checks after traffic failures
        self._wait: Any = None
        self.first_round: Deferred[None] = Deferred()

    # -- service lifecycle

    def startService(self) -> None:
        super().startService()
        if self.follower:
            # the master's first checks arrive through adopt(); if they do not, serve anyway
            self._wait = self.clock.callLater(FOLLOWER_WAIT, self._first_round_done)
            return
        firsts = self._reconcile()
        DeferredList(firsts, consumeErrors=True).addCallback(lambda _: self._first_round_done())

    def _first_round_done(self) -> None:
        if not self.first_round.called:
            self.first_round.callback(None)
        if self._wait is not None and self._wait.active():
            self._wait.cancel()

    def adopt(self, states: list[dict[str, Any]]) -> None:
        """A worker's copy of what the master's health checks found (endpoints it does not have are ignored)."""
        for state in states:
            ep = self.fleet.get(str(state.get("name")))
            status = state.get("status")
            if ep is None or ep.removed or status not in ALL_STATUSES:
                continue
            ep.adopt_checked(state)
            self._set_status(ep, str(status), str(state.get("reason") or ""))
        self._first_round_done()

    def _shared(self) -> None:
        if self._share is not None:
            self._share([ep.checked_state() for ep in self.fleet])

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for loop, _ in self._loops.values():
            if loop.running:
                loop.stop()
        self._loops.clear()
        for call in self._soon.values():
            if call.active():
                call.cancel()
        self._soon.clear()
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None

    def reconfigure(self, config: Config) -> None:
        """Adopt reloaded thresholds; start loops for new or re-timed endpoints, stop removed ones."""
        self._busy_threshold = config.proxy.busy_threshold
        self._discovery_interval = config.model_discovery_interval
        if self.running and not self.follower:
            self._reconcile()

    def _reconcile(self) -> list[Deferred[None]]:
        started: list[Deferred[None]] = []
        for name in list(self._loops):
            ep = self.fleet.get(name)
            loop, interval = self._loops[name]
            if ep is None or ep.config.check_interval != interval:
                if loop.running:
                    loop.stop()
                del self._loops[name]
        for ep in self.fleet:
            if ep.name in self._loops:
                if ep.next_check_due == 0.0 and ep.name not in self._checking:
                    started.append(self.check(ep))
                continue
            loop = LoopingCall(self._tick, ep.name)
            loop.clock = self.clock
            self._loops[ep.name] = (loop, ep.config.check_interval)
            started.append(self.check(ep))
            loop.start(ep.config.check_interval, now=False).addErrback(
                lambda f, name: log.failure("health loop for {endpoint} died", f, endpoint=name), ep.name
            )
        return started

    # -- checks

    def _tick(self, name: str) -> Deferred[None] | None:
        ep = self.fleet.get(name)
        if ep is None or name in self._checking:
            return None
        # Half an interval of slack: the tick meant for ``next_check_due`` may run a
        # little early relative to the check it is timed from (reactor jitter).
        if self.clock.seconds() < ep.next_check_due - ep.config.check_interval / 2:
            return None
        return self.check(ep)

    def check(self, ep: EndpointState) -> Deferred[None]:
        """Check ``ep`` now.  Never fails: every error becomes a status."""
        self._checking.add(ep.name)
        d = ensureDeferred(self._check(ep))

        def done(result: object) -> None:
            self._checking.discard(ep.name)
            if isinstance(result, Failure):
                log.failure("health check of {endpoint} crashed", result, endpoint=ep.name)
            self._shared()

        d.addBoth(done)
        return d

    async def fetch(self, ep: EndpointState, path: str) -> tuple[int, bytes]:
        """``GET path`` on ``ep`` within its ``check_timeout`` (headers and body): status and body."""
        headers = Headers({b"user-agent": [USER_AGENT], b"accept": [b"application/json"]})
        for name, value in ep.config.encoded_headers:
            headers.setRawHeaders(name, [value])
        timeout = ep.config.check_timeout
        d = Deferred.fromCoroutine(self._get(ep.config.url + path, headers))
        d.addTimeout(timeout, self.clock)
        try:
            return await d
        except UpstreamFailure:
            raise
        except BodyTooLarge as exc:
            raise UpstreamFailure(ep.name, BAD_RESPONSE, str(exc)) from None
        except Exception:
            failure = Failure()
            if failure.check(CancelledError, DeferredTimeout) or was_cancelled(failure):
                raise UpstreamFailure(ep.name, HEADER_TIMEOUT, f"no answer within {timeout:g}s") from None
            if not is_transport_failure(failure):
                raise  # a bug, not an endpoint problem: check() logs it
            raise classify(ep.name, failure, reused=False) from None

    async def _get(self, url: str, headers: Headers) -> tuple[int, bytes]:
        response: IResponse = await self.http.get(url, headers=headers, allow_redirects=False, unbuffered=True)
        return response.code, await read_body(response, MAX_LIST_BYTES)

    async def _check(self, ep: EndpointState) -> None:
        config = ep.config
        started = self.clock.seconds()
        try:
            code, body = await self.fetch(ep, config.health_check_url)
        except UpstreamFailure as failure:
            status = UNHEALTHY if failure.kind == BAD_RESPONSE else OFFLINE
            self._record(ep, status, f"{failure.kind}: {failure.detail}", started)
            return
        latency = self.clock.seconds() - started
        if not 200 <= code < 300:
            self._record(ep, UNHEALTHY, f"HTTP {code} from {config.health_check_url}", started)
            return
        if latency > self._busy_threshold:
            self._record(ep, BUSY, f"answered in {latency * 1000:.0f}ms", started)
        else:
            self._record(ep, HEALTHY, "ok", started)
        if config.model_url == config.health_check_url:
            self._take_models(ep, body)
        elif not ep.models_known or (ep.models_updated or 0) + self._discovery_interval <= self.clock.seconds():
            await self.discover(ep)
        if config.ps_url and ep.name not in self._polling:
            # Not awaited: which models are loaded never delays a health verdict or the first round.
            self._polling.add(ep.name)
            ensureDeferred(self.poll_loaded(ep)).addBoth(lambda _: self._polling.discard(ep.name))

    async def poll_loaded(self, ep: EndpointState) -> None:
        """``GET ps_url`` (``/engines/ps``): which models are loaded there now; a 404 or garbage means unknown."""
        try:
            code, body = await self.fetch(ep, ep.config.ps_url)
        except UpstreamFailure:
            return  # the next check tries again; what we knew stays
        loaded = parse_ps(body) if code == 200 else None
        if code == 200 and loaded is None and ep.name not in self._bad_ps:
            self._bad_ps.add(ep.name)
            log.warn("{endpoint}: {path} did not return DMR's list of loaded models", endpoint=ep.name,
                     path=ep.config.ps_url)
        ep.set_loaded(loaded)
        self._shared()

    async def discover(self, ep: EndpointState) -> None:
        """Fetch ``model_url`` into the endpoint's model list."""
        try:
            code, body = await self.fetch(ep, ep.config.model_url)
        except UpstreamFailure as failure:
            log.warn("model discovery on {endpoint} failed: {detail}", endpoint=ep.name, detail=failure.detail)
            return
        if code != 200:
            log.warn("model discovery on {endpoint} got HTTP {code}", endpoint=ep.name, code=code)
            return
        self._take_models(ep, body)

    def _take_models(self, ep: EndpointState, body: bytes) -> None:
        models = model_ids(parse_json(body))
        if models is None:
            log.warn(
                "{endpoint}: {path} did not return an OpenAI model list; keeping the previous one",
                endpoint=ep.name,
                path=ep.config.model_url,
            )
            return
        before = ep.model_keys
        ep.set_models(models)
        if ep.model_keys != before:
            log.info(
                "{endpoint} models: {models}",
                endpoint=ep.name,
                models=", ".join(str(m["id"]) for m in models) or "(none pulled)",
            )

    def _record(self, ep: EndpointState, status: str, reason: str, started: float) -> None:
        now = self.clock.seconds()
        ep.last_check = now
        ep.last_latency_ms = round((now - started) * 1000, 1)
        if self._observe_check is not None:
            self._observe_check(ep.name, status, now - started)
        healthy = status in (HEALTHY, BUSY)
        if healthy:
            ep.consecutive_check_failures = 0
            ep.next_check_due = 0.0
        else:
            ep.consecutive_check_failures += 1
            # from the start of this check, so a slow failure (a timeout) does not add a tick
            ep.next_check_due = started + self.backoff(ep)
        self._set_status(ep, status, reason)

    def backoff(self, ep: EndpointState) -> float:
        """Delay before the next check of a failing endpoint: doubling, capped."""
        interval = ep.config.check_interval
        doublings = max(0, ep.consecutive_check_failures - 1)
        return min(interval * (2 ** min(doublings, 16)), max(BACKOFF_CAP, interval))

    def _set_status(self, ep: EndpointState, status: str, reason: str) -> None:
        old = ep.status
        ep.status_reason = reason
        if old == status:
            return
        ep.status = status
        if old in (HEALTHY, BUSY) and status not in (HEALTHY, BUSY):
            ep.cache_lost()  # it may come back restarted, with an empty cache
        if old == OFFLINE and status in (HEALTHY, BUSY):
            # Back online: let one trial request through now instead of
            # waiting out a cool-down that connection failures started.
            ep.breaker.trial_now()
        emit = log.info if status in (HEALTHY, BUSY) else log.warn
        emit(
            "endpoint {endpoint} is now {status} (was {old}): {reason}",
            endpoint=ep.name,
            status=status,
            old=old,
            reason=reason,
        )
        for listener in self._listeners:
            listener(ep, old, status)

    def mark_offline(self, ep: EndpointState, reason: str) -> None:
        """Real traffic could not connect: offline now, re-checked soon."""
        if ep.removed:
            return
        # Not counted towards backoff: only real checks are (many requests can
        # fail together, and the endpoint must be re-checked soon, not late).
        self._set_status(ep, OFFLINE, reason)
        if ep.name in self._soon or not self.running:
            return
        delay = min(1.0, ep.config.check_interval)

        def recheck() -> None:
            self._soon.pop(ep.name, None)
            if ep.name not in self._checking and not ep.removed:
                self.check(ep)

        self._soon[ep.name] = self.clock.callLater(delay, recheck)
