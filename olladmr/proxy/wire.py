"""
The proxy path's HTTP/1.1 client connections: llhttp (``httptools``, the
parser uvicorn uses) reads upstream responses, a request's head (and a body
already in memory) goes out in one write, and :class:`ConnectionPool` keeps
idle keep-alive connections per origin.

Twisted's ``Agent`` parses responses line by line in Python and builds a
request object, a ``Headers`` round trip and a chain of Deferreds per
request; on the proxy path that was a quarter of olladmr's CPU.  What it
gives the rest of olladmr is kept: a response is an ``IResponse`` whose body
goes to an ``IProtocol`` through ``deliverBody``, the protocol's transport
is an ``IPushProducer`` over the upstream socket (backpressure, and
``stopProducing`` aborts it), and failures are Twisted's own
``ResponseNeverReceived``/``RequestTransmissionFailed``/``ResponseFailed``
so :func:`olladmr.failures.classify` reads them as before.  Connections are
made through the same client endpoints ``Agent`` uses (TCP, or TLS for
``https://``), with its connect timeout.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable, cast

import httptools
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from ..sending import SendQueue
from .headers import HeaderPairs

log = Logger()

#: Framing headers: they describe this connection's message, not the resource (Agent drops them too).
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
#: Status codes whose responses never have a body (RFC 9110 section 6.4.1).
_NO_BODY = frozenset({204, 304})
_CANONICAL: dict[bytes, bytes] = {}
_SET_HERE = frozenset({b"host", b"content-length"})
#: How every clean body ends (one Failure for all: building one per response costs more than the rest of the end).
_DONE = Failure(ResponseDone("Response body fully received"))
#: Bytes a response's status line and headers may take before the connection is dropped as a bad response
#: (llhttp sets no limit; the proxy's own 64 KB check of the parsed headers comes after this).
MAX_RESPONSE_HEAD = 72 * 1024


def canonical_name(name: bytes) -> bytes:
    """``content-type`` -> ``Content-Type`` (what Agent sends; cached)."""
    found = _CANONICAL.get(name)
    if found is None:
        found = b"-".join(part.capitalize() for part in name.split(b"-"))
        if len(_CANONICAL) < 512:
            _CANONICAL[name] = found
    return found


def request_head(
    method: bytes, target: bytes, host: bytes, headers: Iterable[tuple[bytes, bytes]], length: int | None
) -> bytes:
    """
    The request line and header block of one upstream request: ``Host``,
    then ``headers`` (lower-case names, sent canonically capitalised; any
    ``host`` or ``content-length`` among them is ignored), then
    ``Content-Length`` unless ``length`` is None.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    append = parts.append
    for name, value in headers:
        if name in _SET_HERE:
            continue
        if b"\r" in value or b"\n" in value:
            raise ValueError(f"header {name!r} has a line break in its value")
        append(canonical_name(name))
        append(b": ")
        append(value)
        append(b"\r\n")
    if length is not None:
        append(b"Content-Length: %d\r\n\r\n" % length)
    else:
        append(b"\r\n")
    return b"".join(parts)


class UnsolicitedResponse(ValueError):
    """Response bytes arrived on a connection with no request in flight."""


@implementer(IPushProducer)
class _BodyTransport:
    """What a body protocol sees as its transport: pause/resume/stop the upstream socket while its response lasts."""

    __slots__ = ("_connection", "active", "paused")

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection = connection
        self.active = True
        self.paused = False

    def pauseProducing(self) -> None:
        if self.active and not self.paused and self._connection.transport is not None:
            self.paused = True
            cast(IPushProducer, self._connection.transport).pauseProducing()  # (a TCP or TLS connection)

    def resumeProducing(self) -> None:
        if self.active and self.paused and self._connection.transport is not None:
            self.paused = False
            cast(IPushProducer, self._connection.transport).resumeProducing()

    def stopProducing(self) -> None:
        if self.active:
            self._connection.abandon()


@implementer(IResponse)
class UpstreamResponse:
    """One upstream response: status, end-to-end headers, framing length, and its body for one protocol."""

    __slots__ = (
        "code", "phrase", "pairs", "head_size", "_headers", "length", "previousResponse", "_connection", "_protocol",
        "_buffered", "_ended", "transport",
    )
    version = (b"HTTP", 1, 1)
    request = None

    def __init__(
        self, connection: UpstreamConnection, code: int, phrase: bytes, pairs: HeaderPairs, length: Any, head_size: int
    ) -> None:
        self.previousResponse: IResponse | None = None
        self.code = code
        self.phrase = phrase
        self.pairs = pairs  # the end-to-end headers as sent (framing taken out), names as the upstream spelled them
        self.head_size = head_size  # of the end-to-end header lines' names and values
        self._headers: Headers | None = None
        self.length = length
        self._connection = connection
        self._protocol: Any = None
        self._buffered: list[bytes] = []
        self._ended: Failure | None = None
        self.transport = _BodyTransport(connection)

    @property
    def headers(self) -> Headers:
        """``pairs`` as Twisted ``Headers`` (built when first asked: the proxy path reads ``pairs``)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers()
            add = headers.addRawHeader
            for name, value in self.pairs:
                add(name.lower(), value)
        return headers

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), if any."""
        for key, value in self.pairs:
            if len(key) == len(name) and key.lower() == name:
                return value
        return None

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        """Give the body to ``protocol`` (what arrived so far at once, the rest as it comes)."""
        if self._protocol is not None:
            raise RuntimeError("deliverBody called twice")
        self._protocol = protocol
        protocol.makeConnection(self.transport)
        buffered, self._buffered = self._buffered, []
        for data in buffered:
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)

    def body_data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        else:
            self._buffered.append(data)

    def body_end(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self.transport.active = False
        if self._protocol is not None:
            self._protocol.connectionLost(reason)


class UpstreamConnection(Protocol):
    """
    Owns one upstream connection: the request in flight on it (one at a
    time), llhttp's parser state, and whether the connection may be kept
    for the next request.
    """

    __slots__ = (
        "_pool", "key", "_parser", "_waiting", "_response", "_headers", "_phrase", "_sent", "_producer",
        "_head_only", "_until_close", "_error", "_abandoned", "_head_bytes", "busy", "lost", "idle_since",
    )

    def __init__(self, pool: ConnectionPool, key: Hashable) -> None:
        self._pool = pool
        self.key = key
        self._parser = httptools.HttpResponseParser(self)
        self._waiting: Deferred[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._phrase = b""
        self._sent = True  # the whole request has been written
        self._producer: IBodyProducer | None = None
        self._head_only = False
        self._until_close = False
        self._error: Failure | None = None
        self._abandoned = False
        self._head_bytes = 0
        self.busy = False
        self.lost = False
        self.idle_since = 0.0

    # -- sending

    def send(self, head: bytes, body: bytes | IBodyProducer | None, head_only: bool) -> Deferred[UpstreamResponse]:
        """Write one request; fires with its response at the end of the response's headers."""
        self.busy = True
        self._head_only = head_only
        self._headers = []
        self._phrase = b""
        self._response = None
        self._error = None
        self._head_bytes = 0
        d: Deferred[UpstreamResponse] = Deferred(self._cancel)
        self._waiting = d
        transport = self.transport
        assert transport is not None
        send = self._pool.sends.write
        if body is None:
            send(transport, head)
        elif isinstance(body, bytes):
            if len(body) <= 65536:
                send(transport, head + body)
            else:
                transport.writeSequence([head, body])  # nothing is queued for a connection between requests
        else:
            self._sent = False
            self._producer = body
            transport.write(head)  # the producer writes to the transport itself: no queue in between
            cast(IConsumer, transport).registerProducer(body, True)
            body.startProducing(transport).addCallbacks(self._body_sent, self._body_failed)
        return d

    def _body_sent(self, _: object) -> None:
        self._sent = True
        self._producer = None
        if self.transport is not None and not self.lost:
            cast(IConsumer, self.transport).unregisterProducer()

    def _body_failed(self, failure: Failure) -> None:
        self._producer = None
        if self.lost or failure.check(CancelledError):
            return
        log.failure("reading a request body for an upstream failed", failure)
        self._error = failure
        self._abort()

    def _cancel(self, d: Deferred[UpstreamResponse]) -> None:
        self._waiting = None  # Deferred.cancel errbacks it with CancelledError
        self._abort()

    # -- receiving

    def dataReceived(self, data: bytes) -> None:
        if not self.busy:
            self._abort()  # bytes nobody asked for on an idle connection: it cannot be trusted
            return
        try:
            self._parser.feed_data(data)
            if self._waiting is not None:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_RESPONSE_HEAD:
                    self._protocol_error(ValueError(f"response headers larger than {MAX_RESPONSE_HEAD} bytes"))
        except httptools.HttpParserUpgrade:
            self._protocol_error(ValueError("the upstream switched protocols"))
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__ or e
            if not isinstance(cause, UnsolicitedResponse):
                log.failure("handling an upstream response failed", Failure(cause))
            self._protocol_error(cause)
        except httptools.HttpParserError as e:
            self._protocol_error(e)

    def on_status(self, status: bytes) -> None:
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is None:  # (a chunked body's trailer fields are dropped, as Agent drops them)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if not self.busy:
            raise UnsolicitedResponse("the upstream sent a response nobody asked for")
        code = self._parser.get_status_code()
        if code < 200:  # 1xx: an interim response, then the real one on the same connection
            self._headers = []
            self._phrase = b""
            return
        pairs: HeaderPairs = []
        length: Any = UNKNOWN_LENGTH
        chunked = False
        size = 0
        keep = pairs.append
        for name, value in self._headers:
            lname = name.lower()
            if lname in _FRAMING:
                if lname == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        pass  # llhttp rejects a malformed Content-Length before this
                elif b"chunked" in value.lower():
                    chunked = True
                continue
            size += len(name) + len(value)
            keep((name, value))
        self._headers = []
        if chunked:
            length = UNKNOWN_LENGTH
        if code in _NO_BODY:
            length = 0
        self._until_close = length is UNKNOWN_LENGTH and not chunked and not self._head_only
        response = UpstreamResponse(self, code, self._phrase, pairs, length, size)
        self._response = response
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(response)
        if self._head_only:  # llhttp would wait for the body a HEAD response announces: end it here
            self._finish(False)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and not self._head_only:
            response.body_data(body)

    def on_message_complete(self) -> None:
        if self._response is None or self._head_only:
            return  # an interim (1xx) response ended, or a HEAD response already did
        self._finish(self._parser.should_keep_alive())

    def _finish(self, keep_alive: bool) -> None:
        response = self._response
        self._response = None
        reusable = keep_alive and self._sent and not self._abandoned and not self.lost and self._producer is None
        producing = self._producer
        if producing is not None:  # the upstream answered before the whole body went up
            self._producer = None
            producing.stopProducing()
            if self.transport is not None:
                cast(IConsumer, self.transport).unregisterProducer()
        if response is not None:
            paused = response.transport.paused
            response.body_end(_DONE)
            if paused and self.transport is not None:
                cast(IPushProducer, self.transport).resumeProducing()
        self.busy = False
        if self.lost:
            return
        if reusable:
            self._pool.release(self)
        elif self.transport is not None:
            self._pool.sends.flush_one(self.transport)  # (an upstream that answered before it read the request)
            self.transport.loseConnection()

    # -- ending

    def abandon(self) -> None:
        """The body's reader wants no more of it: close the connection (it cannot be reused mid-body)."""
        self._abandoned = True
        self._abort()

    def _abort(self) -> None:
        self._pool.forget(self)  # not handed out again while the abort completes
        if self.transport is not None and not self.lost:
            cast(ITCPTransport, self.transport).abortConnection()

    def _protocol_error(self, error: BaseException) -> None:
        self._error = Failure(error)
        self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._pool.forget(self)
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None
        why = self._error or reason
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            if self._sent:
                waiting.errback(ResponseNeverReceived([why]))
            else:
                waiting.errback(RequestTransmissionFailed([why]))
        response, self._response = self._response, None
        if response is not None:
            if self._until_close and self._error is None and not self._abandoned:
                response.body_end(Failure(PotentialDataLoss()))  # read until close: as Agent reports it
            else:
                response.body_end(Failure(ResponseFailed([why])))
        self.busy = False

    def expire(self) -> None:
        """Idle for too long in the pool."""
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()


class _ConnectionFactory(Factory):
    """Builds the connections of one origin for the pool (quietly: no log line per connection)."""

    noisy = False

    def __init__(self, pool: ConnectionPool, key: Hashable) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool, self._key)


class ConnectionPool:
    """
    Owns the idle keep-alive connections to upstreams, per origin: at most
    ``max_idle`` each, closed after ``idle_timeout`` seconds unused (one
    timer sweeps them all).
    """

    def __init__(self, clock: IReactorTime, max_idle: int, idle_timeout: float, sends: SendQueue | None = None) -> None:
        self._clock = clock
        self.sends = sends if sends is not None else SendQueue(clock)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[Hashable, list[UpstreamConnection]] = {}
        self._sweeper: IDelayedCall | None = None
        self._closing: list[Deferred[None]] = []

    def factory(self, key: Hashable) -> Factory:
        return _ConnectionFactory(self, key)

    def take(self, key: Hashable) -> UpstreamConnection | None:
        """The most recently used idle connection to ``key``, if any is still fresh."""
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = self._clock.seconds() - self.idle_timeout
        while idle:
            connection = idle.pop()
            if not connection.lost and connection.idle_since >= oldest:
                return connection
            connection.expire()
        return None

    def release(self, connection: UpstreamConnection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle or self.max_idle <= 0 or self._closing:
            connection.expire()
            return
        connection.idle_since = self._clock.seconds()
        idle.append(connection)
        if self._sweeper is None and self.idle_timeout > 0:
            self._sweeper = self._clock.callLater(self.idle_timeout, self._sweep)

    def forget(self, connection: UpstreamConnection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        if not any(self._idle.values()):
            self._idle.clear()
            if self._closing:
                closing, self._closing = self._closing, []
                for d in closing:
                    d.callback(None)

    def _sweep(self) -> None:
        self._sweeper = None
        oldest = self._clock.seconds() - self.idle_timeout
        for idle in list(self._idle.values()):
            for connection in [c for c in idle if c.idle_since < oldest]:
                idle.remove(connection)
                connection.expire()
        if any(self._idle.values()) and self.idle_timeout > 0:
            self._sweeper = self._clock.callLater(self.idle_timeout / 2, self._sweep)

    def close(self) -> Deferred[None]:
        """Close every idle connection; fires once they are gone."""
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        connections = [c for idle in self._idle.values() for c in idle if not c.lost]
        if not connections:
            self._idle.clear()
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closing.append(d)
        for connection in connections:
            connection.expire()
        return d

    def connect(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[UpstreamConnection]:
        """A new connection to ``key`` through ``endpoint``."""
        return endpoint.connect(self.factory(key))  # type: ignore[return-value]  # (connect's Deferred is untyped: it fires with the protocol built)


def send_on(
    pool: ConnectionPool,
    key: Hashable,
    endpoint: IStreamClientEndpoint,
    head: bytes,
    body: bytes | IBodyProducer | None,
    head_only: bool,
    fresh: bool,
) -> tuple[Deferred[UpstreamResponse], bool]:
    """
    Send one request on an idle connection to ``key`` (unless ``fresh``) or
    a new one; returns the response's Deferred and whether the connection
    was reused.  Cancelling the Deferred aborts the connection (or the
    connection attempt).
    """
    connection = None if fresh else pool.take(key)
    if connection is not None:
        return connection.send(head, body, head_only), True
    current: list[Deferred[Any]] = []
    cancelled = False

    def cancel(_: Deferred[UpstreamResponse]) -> None:
        nonlocal cancelled
        cancelled = True
        if current:
            current[0].cancel()

    result: Deferred[UpstreamResponse] = Deferred(cancel)

    def connected(connection: UpstreamConnection) -> None:
        if cancelled:
            connection.expire()
            return
        sent = connection.send(head, body, head_only)
        current[:] = [sent]
        sent.addCallbacks(result.callback, failed)

    def failed(failure: Failure) -> None:
        if not result.called:
            result.errback(Failure(CancelledError()) if cancelled else failure)

    connecting = pool.connect(key, endpoint)
    current.append(connecting)
    connecting.addCallbacks(connected, failed)
    return result, False

