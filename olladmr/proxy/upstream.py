"""
The upstream HTTP client of the proxy path: one persistent connection
pool, requests sent on the lean connections of :mod:`olladmr.proxy.wire`,
what the proxy path reads of a response and needs of a client (the
``ProxiedResponse`` and ``Upstream`` protocols, which the tests' fakes
implement too), and request bodies (``bytes``, or a producer).

No cookie jar shared between users, no content decoding, no response
buffering.  (Health checks and model discovery use treq on a pool of their
own: see :mod:`olladmr.fleet.health`.)  Failures are classified into
:class:`~olladmr.failures.UpstreamFailure` so the proxy can decide whether
failing over is safe.
"""

from __future__ import annotations

import io
from typing import IO, Any, Protocol, cast

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

from .. import __version__
from ..reactors import IReactor
from .._twisted_compat import agent_endpoint, agent_host_header
from ..config.schema import Config, ProxyConfig
from ..failures import HEADER_TIMEOUT, UpstreamFailure, classify, was_cancelled
from ..sending import SendQueue
from .headers import HeaderPairs
from .wire import ConnectionPool, request_head, send_on

USER_AGENT = f"olladmr/{__version__}".encode()
_BODY_METHODS = frozenset({b"POST", b"PUT"})  # sent with ``Content-Length: 0`` when bodiless, as Agent does


class ProxiedResponse(Protocol):
    """
    What the proxy path reads of an upstream response (the lean client's
    :class:`~olladmr.proxy.wire.UpstreamResponse`, and the tests' fakes):
    the status, the end-to-end header pairs as sent, their size, one header,
    the framing's length, and the body, delivered to a protocol.
    """

    code: int
    phrase: bytes
    length: int | object  # ``twisted.web.iweb.UNKNOWN_LENGTH`` when the body is delimited otherwise
    pairs: HeaderPairs
    head_size: int

    @property
    def headers(self) -> Headers: ...

    def header(self, name: bytes) -> bytes | None: ...

    def deliverBody(self, protocol: IProtocol) -> None: ...


#: A request body: in memory, or produced (a spooled client body).
Body = bytes | IBodyProducer | None


class Upstream(Protocol):
    """What the proxy path needs of its upstream client (:class:`UpstreamClient`, and the tests' fakes)."""

    def request(
        self,
        endpoint: str,
        method: bytes,
        url: bytes,
        headers: HeaderPairs,
        body: Body,
        *,
        fresh: bool = False,
        header_timeout: float | None = None,
    ) -> Deferred[ProxiedResponse]: ...


class _Target:
    """One upstream origin, parsed once: pool key, client endpoint, Host header."""

    __slots__ = ("key", "endpoint", "host")

    def __init__(self, agent: Agent, origin: bytes) -> None:
        uri = URI.fromBytes(origin + b"/")
        self.key = (uri.scheme, uri.host, uri.port)
        self.endpoint = agent_endpoint(agent, uri)
        self.host = agent_host_header(agent, uri)


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


def request_body(content: IO[bytes] | None) -> Body:
    """The client's (already received) body to send upstream: its bytes when in memory, else a fresh producer."""
    if content is None:
        return None
    if isinstance(content, io.BytesIO):
        return content.getvalue() or None
    content.seek(0, 2)
    if content.tell() == 0:
        return None
    content.seek(0)
    return FileBodyProducer(_Unclosable(content))


class UpstreamClient(Service):
    """
    Owns the proxy path's connection pool and sends requests to endpoints
    (see :mod:`olladmr.proxy.wire`).  An ``Agent`` is kept only to build
    each origin's client endpoint (TCP, or TLS for ``https://``, with the
    connect timeout) and ``Host`` value the way Twisted does.  As a child
    service, its pool closes when the service tree stops.
    """

    name = "upstream"

    def __init__(self, reactor: IReactor, proxy: ProxyConfig, sends: SendQueue | None = None) -> None:
        self._reactor = reactor
        self.pool = ConnectionPool(reactor, proxy.max_idle_connections, proxy.idle_connection_timeout, sends)
        self._apply(proxy)

    def reconfigure(self, config: Config) -> None:
        """Adopt reloaded timeouts and pool sizes; in-flight requests are unaffected."""
        self._apply(config.proxy)

    def _apply(self, proxy: ProxyConfig) -> None:
        self.proxy = proxy
        self.pool.max_idle = proxy.max_idle_connections
        self.pool.idle_timeout = proxy.idle_connection_timeout
        self._agent = Agent(self._reactor, connectTimeout=proxy.connection_timeout)
        self._targets: dict[bytes, _Target] = {}

    def request(
        self,
        endpoint: str,
        method: bytes,
        url: bytes,
        headers: HeaderPairs,
        body: Body,
        *,
        fresh: bool = False,
        header_timeout: float | None = None,
    ) -> Deferred[ProxiedResponse]:
        """
        Send one request; the Deferred fires with the response once its
        headers arrive, or fails with :class:`UpstreamFailure`.  Cancelling
        it aborts the connection.
        """
        timeout = self.proxy.response_header_timeout if header_timeout is None else header_timeout
        scheme, sep, rest = url.partition(b"://")
        netloc, slash, path = rest.partition(b"/")
        origin = scheme + sep + netloc
        target = self._targets.get(origin)
        if target is None:
            target = self._targets[origin] = _Target(self._agent, origin)
        payload: bytes | IBodyProducer | None
        if body is None:
            payload, length = None, (0 if method in _BODY_METHODS else None)
        elif isinstance(body, bytes):
            payload, length = body, len(body)
        else:
            payload, length = body, body.length
            if not isinstance(length, int):
                raise ValueError("an upstream request body must have a known length")
        head = request_head(method, slash + path or b"/", target.host, headers, length)
        d, reused = send_on(self.pool, target.key, target.endpoint, head, payload, method == b"HEAD", fresh)
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
        return cast("Deferred[ProxiedResponse]", d)  # (Deferred is invariant: the wire's response is one)

    def close(self) -> Deferred[None]:
        """Close every pooled connection."""
        return self.pool.close()

    def stopService(self) -> Deferred[None]:
        """As a child service: the pool closes when the service tree stops (after the drain)."""
        super().stopService()
        return self.close()
