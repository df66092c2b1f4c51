"""
The upstream HTTP client: one persistent connection pool, plain ``Agent``
requests for the proxy path, small capped reads for health checks.

The proxy path deliberately uses ``twisted.web.client.Agent`` directly
rather than treq's wrappers: no cookie jar shared between users, no content
decoding, no response buffering.  Failures are classified into
:class:`UpstreamFailure` so the proxy can decide whether failing over is
safe.
"""

from __future__ import annotations

import io
import json
from typing import IO, Any, Hashable

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    URI,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from . import __version__
from .config import ProxyConfig

USER_AGENT = f"olladmr/{__version__}".encode()

# Failure kinds.  "Safe" ones mean the upstream cannot have started work.
REFUSED = "connection_refused"
CONNECT_TIMEOUT = "connect_timeout"
UNREACHABLE = "unreachable"
RESET = "connection_reset"
HEADER_TIMEOUT = "header_timeout"
BAD_RESPONSE = "bad_response"
SAFE_KINDS = frozenset({REFUSED, CONNECT_TIMEOUT, UNREACHABLE})


class UpstreamFailure(Exception):
    """Why an upstream request produced no usable response."""

    def __init__(self, endpoint: str, kind: str, detail: str, *, reused: bool = False, sent: bool = True) -> None:
        self.endpoint = endpoint
        self.kind = kind
        self.detail = detail
        self.reused = reused  # the request went out on a pooled keep-alive connection
        self.sent = sent  # the whole request may have reached the upstream
        super().__init__(f"{endpoint}: {kind}: {detail}")

    @property
    def safe_to_retry(self) -> bool:
        """The upstream cannot have started on the request."""
        return self.kind in SAFE_KINDS or (self.kind == RESET and not self.sent)

    @property
    def stale_connection(self) -> bool:
        """A pooled connection died before any response byte: retry it fresh."""
        return self.kind == RESET and self.reused

    @property
    def marks_offline(self) -> bool:
        return self.kind in SAFE_KINDS


def _cancelled(failure: Failure) -> bool:
    """Twisted wraps a cancelled request in ResponseNeverReceived/RequestTransmissionFailed."""
    reasons = getattr(failure.value, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


def _first_reason(failure: Failure) -> BaseException:
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return reasons[0].value
    return failure.value


def classify(endpoint: str, failure: Failure, *, reused: bool, timeout: float) -> UpstreamFailure:
    """Turn a failed ``Agent.request`` into an :class:`UpstreamFailure`."""
    value = failure.value
    if isinstance(value, ierror.ConnectionRefusedError):
        return UpstreamFailure(endpoint, REFUSED, "connection refused", sent=False)
    if isinstance(value, ierror.TimeoutError):
        return UpstreamFailure(endpoint, CONNECT_TIMEOUT, "timed out connecting", sent=False)
    if isinstance(value, (ierror.DNSLookupError, ierror.NoRouteError)):
        return UpstreamFailure(endpoint, UNREACHABLE, str(value).strip() or type(value).__name__, sent=False)
    if isinstance(value, ierror.ConnectError):
        return UpstreamFailure(endpoint, UNREACHABLE, str(value).strip() or type(value).__name__, sent=False)
    if isinstance(value, RequestTransmissionFailed):
        return UpstreamFailure(
            endpoint, RESET, f"connection lost while sending the request ({_first_reason(failure)!r})",
            reused=reused, sent=False,
        )
    if isinstance(value, ResponseNeverReceived):
        reason = _first_reason(failure)
        if isinstance(reason, (ierror.ConnectionLost, ierror.ConnectionDone)):
            return UpstreamFailure(endpoint, RESET, "connection closed before any response", reused=reused)
        return UpstreamFailure(endpoint, BAD_RESPONSE, f"invalid response: {reason}", reused=reused)
    if isinstance(value, ResponseFailed):
        return UpstreamFailure(endpoint, BAD_RESPONSE, f"invalid response: {_first_reason(failure)}", reused=reused)
    return UpstreamFailure(endpoint, BAD_RESPONSE, f"{type(value).__name__}: {value}", reused=reused)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _TrackingPool(HTTPConnectionPool):
    """A connection pool that remembers whether it last handed out a cached connection."""

    _factory = _QuietFactory
    last_reused = False

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        self.last_reused = bool(self._connections.get(key))
        return super().getConnection(key, endpoint)


class _Target:
    """One upstream origin, parsed once: pool key, client endpoint, Host header."""

    __slots__ = ("key", "endpoint", "uri", "host")

    def __init__(self, agent: Agent, origin: bytes) -> None:
        self.uri = URI.fromBytes(origin + b"/")
        self.key = (self.uri.scheme, self.uri.host, self.uri.port)
        self.endpoint = agent._getEndpoint(self.uri)
        self.host = agent._computeHostValue(self.uri.scheme, self.uri.host, self.uri.port)


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
        self._fresh_pool._factory = _QuietFactory
        self.configure(proxy)

    def configure(self, proxy: ProxyConfig) -> None:
        """Apply (new) timeouts and pool sizes; in-flight requests are unaffected."""
        self.proxy = proxy
        self.pool.maxPersistentPerHost = proxy.max_idle_connections
        self.pool.cachedConnectionTimeout = proxy.idle_connection_timeout
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
            if result.check(CancelledError) or _cancelled(result):
                return Failure(CancelledError())
            return Failure(classify(endpoint, result, reused=reused, timeout=timeout))

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
        return agent._requestWithEndpoint(
            target.key, target.endpoint, method, target.uri, headers, body, slash + path or b"/"
        )

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


class BodyTooLarge(Exception):
    """A response body read for the proxy's own use exceeded its cap."""


class _CappedReader(Protocol):
    """Collects a response body up to ``limit`` bytes, then gives up."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._parts.clear()
            if not self._done.called:
                self._done.errback(BodyTooLarge(f"body larger than {self._limit} bytes"))
            self.transport.stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


def read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """Read a whole (small) response body, failing past ``limit`` bytes."""
    reader: _CappedReader

    def cancel(d: Deferred[bytes]) -> None:
        if reader.transport is not None:
            reader.transport.stopProducing()

    done: Deferred[bytes] = Deferred(cancel)
    reader = _CappedReader(done, limit)
    response.deliverBody(reader)
    return done


def parse_json(body: bytes) -> Any:
    """JSON from bytes, or ``None`` if it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
