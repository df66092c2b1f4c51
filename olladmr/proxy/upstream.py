"""
The upstream HTTP client of the proxy path: one persistent connection
pool and plain ``Agent`` requests, plus a small capped body reader.

The proxy path deliberately uses ``twisted.web.client.Agent`` directly
rather than treq's wrappers: no cookie jar shared between users, no content
decoding, no response buffering.  (Health checks and model discovery use
treq on a pool of their own: see :mod:`olladmr.fleet.health`.)  Failures
are classified into :class:`~olladmr.failures.UpstreamFailure` so the
proxy can decide whether failing over is safe.
"""

from __future__ import annotations

import io
from typing import IO, Any, Hashable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from .. import __version__
from .._twisted_compat import agent_endpoint, agent_host_header, agent_request, pool_has_idle_connection, use_quiet_factory
from ..config.schema import Config, ProxyConfig
from ..failures import HEADER_TIMEOUT, UpstreamFailure, classify, was_cancelled

USER_AGENT = f"olladmr/{__version__}".encode()


class _TrackingPool(HTTPConnectionPool):
    """A connection pool that remembers whether it last handed out a cached connection."""

    last_reused = False

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        super().__init__(reactor, persistent)
        use_quiet_factory(self)

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        self.last_reused = pool_has_idle_connection(self, key)
        return super().getConnection(key, endpoint)


class _Target:
    """One upstream origin, parsed once: pool key, client endpoint, Host header."""

    __slots__ = ("key", "endpoint", "uri", "host")

    def __init__(self, agent: Agent, origin: bytes) -> None:
        self.uri = URI.fromBytes(origin + b"/")
        self.key = (self.uri.scheme, self.uri.host, self.uri.port)
        self.endpoint = agent_endpoint(agent, self.uri)
        self.host = agent_host_header(agent, self.uri)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Unclosable:
    """Lets FileBodyProducer stream a spooled body without closing it (retries reuse it)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def read(self, size: int = -1) -> bytes:
        return self._handle.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def close(self) -> None:
        pass


def body_producer(content: IO[bytes] | None) -> IBodyProducer | None:
    """A fresh producer over the client's (already received) body, from its start."""
    if content is None:
        return None
    if isinstance(content, io.BytesIO):
        body = content.getvalue()
        return BytesProducer(body) if body else None
    content.seek(0, 2)
    if content.tell() == 0:
        return None
    content.seek(0)
    return FileBodyProducer(_Unclosable(content))


class UpstreamClient:
    """Owns the connection pool and sends requests to endpoints."""

    def __init__(self, reactor: Any, proxy: ProxyConfig) -> None:
        self._reactor = reactor
        self.pool = _TrackingPool(reactor, persistent=True)
        self._fresh_pool = HTTPConnectionPool(reactor, persistent=False)
        use_quiet_factory(self._fresh_pool)
        self._apply(proxy)

    def reconfigure(self, config: Config) -> None:
        """Adopt reloaded timeouts and pool sizes; in-flight requests are unaffected."""
        self._apply(config.proxy)

    def _apply(self, proxy: ProxyConfig) -> None:
        self.proxy = proxy
        self.pool.maxPersistentPerHost = proxy.max_idle_connections
        # Twisted infers ``int`` from the default (240); it is any number of seconds (a callLater delay).
        self.pool.cachedConnectionTimeout = proxy.idle_connection_timeout  # type: ignore[assignment]
        self.pool.retryAutomatically = False
        self._agent = Agent(self._reactor, connectTimeout=proxy.connection_timeout, pool=self.pool)
        self._fresh_agent = Agent(self._reactor, connectTimeout=proxy.connection_timeout, pool=self._fresh_pool)
        self._targets: dict[bytes, _Target] = {}
        self._fresh_targets: dict[bytes, _Target] = {}

    def request(
        self,
        endpoint: str,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        *,
        fresh: bool = False,
        header_timeout: float | None = None,
    ) -> Deferred[IResponse]:
        """
        Send one request; the Deferred fires with the response once its
        headers arrive, or fails with :class:`UpstreamFailure`.  Cancelling
        it aborts the connection.
        """
        timeout = self.proxy.response_header_timeout if header_timeout is None else header_timeout
        agent = self._fresh_agent if fresh else self._agent
        self.pool.last_reused = False
        d = self._send(agent, method, url, headers, body, fresh)
        reused = self.pool.last_reused and not fresh
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._reactor.callLater(timeout, expire)

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                return result
            if timed_out:
                return Failure(
                    UpstreamFailure(endpoint, HEADER_TIMEOUT, f"no response headers within {timeout:g}s", reused=reused)
                )
            if result.check(CancelledError) or was_cancelled(result):
                return Failure(CancelledError())
            return Failure(classify(endpoint, result, reused=reused))

        d.addBoth(settled)
        return d

    def _send(
        self, agent: Agent, method: bytes, url: bytes, headers: Headers, body: IBodyProducer | None, fresh: bool
    ) -> Deferred[IResponse]:
        """
        ``agent.request`` without re-parsing the origin on every call: the
        origin's pool key, endpoint and Host header are computed once.
        """
        scheme, sep, rest = url.partition(b"://")
        netloc, slash, path = rest.partition(b"/")
        origin = scheme + sep + netloc
        targets = self._fresh_targets if fresh else self._targets
        target = targets.get(origin)
        if target is None:
            target = targets[origin] = _Target(agent, origin)
        headers.setRawHeaders(b"host", [target.host])
        return agent_request(agent, target.key, target.endpoint, method, target.uri, headers, body, slash + path or b"/")

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()
