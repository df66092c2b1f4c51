"""
The server side's HTTP/1.1 connection: :class:`OllaChannel` parses requests
with llhttp (``httptools``) and enforces the request limits of
:class:`EdgeLimits` (431, 408, 413 before reading what olladmr will not use),
answers pipelined requests in order, and writes through the
:class:`~olladmr.sending.SendQueue`.

The site's ``buildProtocol`` builds each channel with its limits, clock,
send queue and request-id source, so the channel never looks its site up.
What follows a parse is Twisted's own ``HTTPChannel``
(``allHeadersReceived``, ``allContentReceived``, ``requestDone``,
persistence, ``Expect: 100-continue``, producers, the idle timeout).  Of
``HTTPChannel`` it overrides only public methods (``dataReceived``,
``requestDone``, ``writeHeaders``, ``write``, ``writeSequence``,
``loseConnection``, ``connectionLost``, ``getPeer``, ``getHost``,
``isSecure``) and the half-close hook ``readConnectionLost``: the server
reads its request line and headers, which Twisted's line parser would set,
through :func:`~olladmr._twisted_compat.set_request_line`, and asks
:func:`~olladmr._twisted_compat.channel_busy` whether a request is being
answered; ``tests/test_architecture.py`` rejects overriding any of
``HTTPChannel``'s underscored names outside ``_twisted_compat``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Protocol, cast

import httptools
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.iweb import INonQueuedRequestFactory

from .._twisted_compat import channel_busy, set_request_line
from ..config.schema import Config, ServerConfig
from ..errors import dialect_for_path, error_body
from ..sending import SendQueue

log = Logger()


class EdgeLimits:
    """Owns the request limits and timeouts every connection reads: sizes (413, 431) and times (408, idle)."""

    def __init__(self, server: ServerConfig) -> None:
        self._apply(server)

    def _apply(self, server: ServerConfig) -> None:
        self.max_body_size = server.request_limits.max_body_size
        self.max_header_size = server.request_limits.max_header_size
        self.read_header_timeout = server.read_header_timeout
        self.read_timeout = server.read_timeout
        self.idle_timeout = server.idle_timeout

    def reconfigure(self, config: Config) -> None:
        """Adopt reloaded limits; connections read them per request."""
        self._apply(config.server)


class _Connection(Protocol):
    """What :meth:`OllaChannel._abort` uses of its transport (a TCP or TLS connection)."""

    connected: int

    def abortConnection(self) -> None: ...


_IDLE, _HEAD, _BODY = 0, 1, 2  # where the request being parsed is
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSIONS = frozenset({b"HTTP/1.0", b"HTTP/1.1"})  # as Twisted: later versions have no request line
_LLHTTP_METHODS: dict[bytes, bool] = {}
_COMMON_METHODS = (b"POST ", b"GET ", b"HEAD ", b"OPTIONS ", b"DELETE ", b"PUT ")


class _Probe:
    def on_headers_complete(self) -> None:
        pass


def llhttp_knows(method: bytes) -> bool:
    """Whether llhttp parses ``method`` (it knows a fixed list; HTTP allows any token)."""
    known = _LLHTTP_METHODS.get(method)
    if known is None:
        try:
            httptools.HttpRequestParser(_Probe()).feed_data(method + b" / HTTP/1.1\r\n\r\n")
            known = True
        except httptools.HttpParserUpgrade:
            known = True  # CONNECT
        except httptools.HttpParserError:
            known = False
        if len(_LLHTTP_METHODS) < 256:
            _LLHTTP_METHODS[method] = known
    return known


class _Refused(Exception):
    """A request olladmr answers with an error instead of serving: raised from a parser callback."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Stop(Exception):
    """Stop parsing: the connection is being rejected."""


class _Waiting:
    """A request parsed while the one before it is still being answered (pipelining)."""

    __slots__ = ("method", "path", "version", "headers", "length", "chunks", "size", "complete", "refusal")

    def __init__(self, method: bytes, path: bytes, version: bytes, headers: list[tuple[bytes, bytes]], length: int | None):
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers
        self.length = length
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.refusal: _Refused | None = None


class OllaChannel(HTTPChannel):
    """
    HTTP/1.1 server connection with olladmr's limits: header block size
    (431), time to receive the headers and the body (408), and early
    answers (413) without reading what we will not use.  A rejected
    connection answers, half-closes, discards what the client still sends
    and is aborted after a few seconds.

    Requests are parsed by llhttp (``httptools``) rather than Twisted's
    line-by-line parser; what follows the parse is Twisted's own
    (``allHeadersReceived``, ``allContentReceived``, ``requestDone``,
    persistence, ``Expect: 100-continue``, producers, the idle timeout).
    Pipelined requests are parsed ahead and answered in order, one at a
    time; reading pauses while more than :attr:`HOLD` bytes of them wait.
    """

    __slots__ = (
        "_header_timer", "_body_timer", "_rejected", "_discarding", "_request_line", "_parser", "_phase", "_url",
        "_fields", "_header_bytes", "_head_raw", "_waiting", "_held", "_paused", "_upgrade_body", "_live_body",
        "_ended", "_method", "_head", "_starting", "_peer", "_host", "_secure", "_edge", "_clock", "_sends",
        "_new_id",
    )
    LINGER = 5.0
    HOLD = 64 * 1024  # bytes of pipelined requests held before reading pauses
    MAX_HEADERS = 500  # as Twisted's maxHeaders

    def __init__(
        self, limits: EdgeLimits, clock: IReactorTime, sends: SendQueue, request_id: Callable[[], bytes]
    ) -> None:
        super().__init__()
        # (slots, not instance-dict entries: a held stream's connection costs less memory)
        self._edge = limits  # read per request: a reload changes them for every connection
        self._clock = clock
        self._sends = sends
        self._new_id = request_id  # the site's: ids for the answers the channel writes itself
        self._header_timer: IDelayedCall | None = None
        self._body_timer: IDelayedCall | None = None
        self._rejected = False
        self._discarding = False  # the last request ended the connection: what follows is ignored, as Twisted does
        self._request_line = b""  # of the request being received: its errors speak that route's dialect
        self._head = b""  # a response head waiting for the body bytes Twisted writes right after it
        self._parser = httptools.HttpRequestParser(self)
        self._phase = _IDLE
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0  # of the request being parsed: the request line and header lines, as sent
        self._head_raw = 0  # bytes received while one request's head stayed incomplete
        self._waiting: list[_Waiting] = []  # (a list: a deque costs 600 bytes on every connection)
        self._held = 0  # bytes of the waiting requests' bodies
        self._paused = False
        self._upgrade_body = 0  # body bytes of an Upgrade request, which llhttp leaves to us
        self._live_body = False  # the body being parsed goes to self.requests[-1] (not to a waiting request)
        self._ended = 0  # requests parsed to their end on this connection
        self._method = b""  # the real method of a request llhttp is parsing as GET
        self._starting = False  # requestDone is starting the waiting requests
        self._peer: Any = None  # the connection's addresses, asked of the transport once (getsockname is a syscall)
        self._host: Any = None
        self._secure: bool | None = None  # whether the transport is TLS (an interface adaptation: asked once)

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None and self.transport is not None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def getHost(self) -> Any:
        host = self._host
        if host is None and self.transport is not None:
            host = self._host = self.transport.getHost()
        return host

    def isSecure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = super().isSecure()
            if self.transport is not None:
                self._secure = secure
        return secure

    # -- receiving

    def dataReceived(self, data: bytes) -> None:
        if self._rejected or self._discarding:
            return
        self.resetTimeout()
        ended = self._ended
        try:
            self._feed(data)
        except _Stop:
            return
        except _Refused as refusal:
            self._refuse(refusal)
            return
        if self._phase == _HEAD and self._ended == ended:
            # No request ended in these bytes, so all of them (but a stray CRLF) belong to a head
            # still incomplete: llhttp holds a partial header line whole, so bound it here.
            self._head_raw += len(data)
            limits = self._edge
            if self._head_raw > limits.max_header_size:
                self._refuse(self._too_large(limits.max_header_size))
                return
        self._arm()

    def _substitute_method(self, data: bytes) -> bytes:
        """
        A request that starts these bytes with a method llhttp does not know
        (any token is HTTP) is parsed as GET and given its own method back.
        (One that starts mid-read, pipelined behind another, gets a 400.)
        """
        if data.startswith(_COMMON_METHODS):
            return data
        start = 0
        while data.startswith(b"\r\n", start):
            start += 2
        space = data.find(b" ", start, start + 64)
        if space > start:
            method = data[start:space]
            if _TOKEN.fullmatch(method) and not llhttp_knows(method):
                self._method = method
                return data[:start] + b"GET" + data[space:]
        return data

    def _feed(self, data: bytes) -> None:
        if self._phase == _IDLE:
            data = self._substitute_method(data)
        while data:
            if self._upgrade_body:
                body, data = data[: self._upgrade_body], data[self._upgrade_body :]
                self._upgrade_body -= len(body)
                self.on_body(body)
                if not self._upgrade_body:
                    self._message_done()
                continue
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as upgrade:
                # llhttp hands everything after an Upgrade request's head to the "new
                # protocol"; olladmr upgrades nothing: read its body and go on parsing HTTP.
                data = data[upgrade.args[0] :]
            except httptools.HttpParserCallbackError as error:
                cause = error.__context__
                if isinstance(cause, (_Refused, _Stop)):
                    raise cause from None
                raise
            except httptools.HttpParserError as error:
                reason = str(error).strip() or "malformed request"
                raise _Refused(400, "invalid_request", f"malformed HTTP request: {reason}") from None

    def _too_large(self, limit: int) -> _Refused:
        return _Refused(
            431,
            "request_header_fields_too_large",
            f"the request line and headers exceed {limit} bytes (server.request_limits.max_header_size)",
        )

    def on_message_begin(self) -> None:
        if self._rejected:
            raise _Stop()
        if not self.persistent:
            self._discarding = True  # Twisted drops whatever follows a request that closes the connection
            raise _Stop()
        self._phase = _HEAD
        self._url = b""
        self._fields = []
        self._header_bytes = 0
        self._head_raw = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._request_line = b"- " + self._url  # until the method is known: errors pick their dialect by path
        self._count(len(url) + 10)  # "METHOD " + " HTTP/1.1", near enough for a limit

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase != _HEAD:
            return  # a chunked body's trailer fields: dropped, as Twisted's chunked decoder drops them
        self._fields.append((name, value.strip(b" \t")))
        self._count(len(name) + len(value) + 2)
        if len(self._fields) > self.MAX_HEADERS:
            raise _Refused(400, "invalid_request", f"more than {self.MAX_HEADERS} request headers")

    def _count(self, size: int) -> None:
        self._header_bytes += size
        limits = self._edge
        if self._header_bytes > limits.max_header_size:
            raise self._too_large(limits.max_header_size)

    def on_headers_complete(self) -> None:
        parser = self._parser
        method = self._method or parser.get_method()
        self._method = b""
        version = b"HTTP/" + parser.get_http_version().encode("ascii")
        if version not in _VERSIONS:
            raise _Refused(400, "invalid_request", f"unsupported HTTP version {version.decode('ascii')}")
        self._request_line = method + b" " + self._url
        length: int | None = 0
        chunked = False
        for name, value in self._fields:
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)  # llhttp accepted it: digits only, and only one
            elif lname == b"transfer-encoding":
                if value.lower() != b"chunked":  # as Twisted: no other transfer coding is undone here
                    raise _Refused(400, "invalid_request", "unsupported Transfer-Encoding (only chunked is accepted)")
                chunked = True
        if chunked:
            length = None
        if parser.should_upgrade():
            if chunked:
                raise _Refused(400, "invalid_request", "an Upgrade request with a chunked body is not supported")
            self._upgrade_body = length or 0
        self._phase = _BODY if length != 0 else _IDLE
        fields, self._fields = self._fields, []
        if channel_busy(self) or self._waiting:
            waiting = _Waiting(method, self._url, version, fields, length)
            waiting.size = self._header_bytes + 256  # what the record itself costs, near enough
            self._waiting.append(waiting)
            self._held += waiting.size
            self._live_body = False
            self._hold_back()
            return
        self._live_body = True
        self._begin(method, self._url, version, fields, length)

    def _begin(
        self, method: bytes, path: bytes, version: bytes, fields: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        """Hand a parsed head to Twisted's request machinery (what HTTPChannel.lineReceived and headerReceived do)."""
        if INonQueuedRequestFactory.providedBy(self.requestFactory):
            request = self.requestFactory(self)
        else:
            request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        add = request.requestHeaders.addRawHeader
        expect = False
        for name, value in fields:
            if name.lower() == b"expect" and value.lower() == b"100-continue":
                expect = True  # answered below, in order with what this connection still has to send
                continue
            add(name, value)
        set_request_line(self, method, path, version)
        self.length = length
        self._request_line = method + b" " + path
        self.allHeadersReceived()
        if expect and version == b"HTTP/1.1" and length != 0 and not self._rejected:
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._rejected:
            raise _Stop()
        if self._live_body:
            self.requests[-1].handleContentChunk(body)
            if self._rejected:
                raise _Stop()
            return
        waiting = self._waiting[-1]
        waiting.chunks.append(body)
        waiting.size += len(body)
        self._held += len(body)
        self._hold_back()

    def _hold_back(self) -> None:
        """Stop reading while too much of the waiting requests is held (again, if Twisted resumed it meanwhile)."""
        if self._held > self.HOLD and self.transport is not None:
            self._paused = True
            cast(IPushProducer, self.transport).pauseProducing()  # (a TCP or TLS connection)

    def on_message_complete(self) -> None:
        if self._upgrade_body:
            return  # its body follows, read by _feed
        self._message_done()

    def _message_done(self) -> None:
        self._phase = _IDLE
        self._ended += 1
        if self._live_body:
            self._live_body = False
            self._stop_body_timer()
            self.allContentReceived()
            if self._rejected:
                raise _Stop()
        elif self._waiting:
            self._waiting[-1].complete = True

    def _refuse(self, refusal: _Refused) -> None:
        """Answer ``refusal`` now, or after the requests still being answered (never in the middle of one)."""
        if channel_busy(self) or self._waiting:
            if self._waiting and not self._waiting[-1].complete:
                broken = self._waiting.pop()  # the refusal is that request's answer: its body will never end
                self._held -= broken.size
            head = _Waiting(b"", b"", b"", [], 0)
            head.refusal = refusal
            head.complete = True
            self._waiting.append(head)
            self._discarding = True  # nothing after a refused request is read
            return
        self.reject(refusal.status, refusal.code, refusal.message)

    def requestDone(self, request: Any) -> None:
        self._send_head()
        super().requestDone(request)  # Twisted's: the next request may start, or the connection ends
        if self.transport is None or self._rejected or self._starting:
            return  # (a waiting request answered at once, inside the loop below: the loop goes on)
        self._starting = True
        try:
            self._start_waiting()
        finally:
            self._starting = False
        if self._paused and self._held <= self.HOLD and self.transport is not None:
            self._paused = False
            cast(IPushProducer, self.transport).resumeProducing()
        self._hold_back()  # Twisted's requestDone resumed reading: not while too much waits
        self._arm()

    def _start_waiting(self) -> None:
        """Start the waiting (pipelined) requests in order, for as long as each is answered at once."""
        while self._waiting and not channel_busy(self) and self.persistent and not self._rejected:
            waiting = self._waiting.pop(0)
            self._held -= waiting.size
            if waiting.refusal is not None:
                self._waiting.clear()
                self.reject(waiting.refusal.status, waiting.refusal.code, waiting.refusal.message)
                return
            self._begin(waiting.method, waiting.path, waiting.version, waiting.headers, waiting.length)
            for chunk in waiting.chunks:
                if self._rejected:
                    return
                self.requests[-1].handleContentChunk(chunk)
            if self._rejected:
                return
            if not waiting.complete:
                self._live_body = True  # the rest of its body is still to come, straight to it
                return
            self.allContentReceived()

    def _arm(self) -> None:
        """
        Start the header (or body) clock of a request left part-received.
        Armed once the bytes at hand are parsed, so a request that arrives
        whole (the usual case) costs no timer at all; the clock starts when
        its first bytes were handled, as before.
        """
        if self._rejected or self.transport is None:
            return
        limits = self._edge
        if self._phase == _HEAD and not channel_busy(self) and not self._waiting:
            # (a head behind requests still being answered gets its clock when its turn comes)
            if self._header_timer is None and limits.read_header_timeout > 0:
                self._header_timer = self._clock.callLater(limits.read_header_timeout, self._headers_too_slow)
        elif self._phase == _BODY and self._live_body:
            if self._body_timer is None and limits.read_timeout > 0:
                self._body_timer = self._clock.callLater(limits.read_timeout, self._body_too_slow)
        if self._phase != _HEAD:
            self._stop_header_timer()

    def _stop_header_timer(self) -> None:
        timer, self._header_timer = self._header_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _stop_body_timer(self) -> None:
        timer, self._body_timer = self._body_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(_Refused(408, "request_timeout",
                              "the request headers did not arrive in time (server.read_header_timeout)"))

    def _body_too_slow(self) -> None:
        self._body_timer = None
        self._refuse(_Refused(408, "request_timeout", "the request body did not arrive in time (server.read_timeout)"))

    def reject(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` now with an OpenAI-shaped error and end the connection politely."""
        if self._rejected or self.transport is None:
            return
        self._rejected = True
        self._stop_header_timer()
        self._stop_body_timer()
        self._flush()  # an answer to an earlier (pipelined) request still waiting goes first
        rid = self._new_id()
        parts = self._request_line.split(b" ")
        target = parts[1].partition(b"?")[0] if len(parts) > 1 else b""
        body = error_body(message, "invalid_request_error", code, dialect_for_path(target), status)
        phrase = RESPONSES.get(status) or (b"Request Header Fields Too Large" if status == 431 else b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\nx-olla-request-id: %s\r\n\r\n%s" % (status, phrase, len(body), rid, body)
        )
        self.setTimeout(None)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:
            self.transport.loseConnection()
        self._clock.callLater(self.LINGER, self._abort)
        log.info("rejected a request with {status}: {message}", status=status, message=message)

    def _abort(self) -> None:
        transport = cast("_Connection | None", self.transport)
        if transport is not None and transport.connected:
            transport.abortConnection()

    # -- writing: through the SendQueue (see olladmr.sending); a response's head goes with its first bytes

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):  # pairs, from older Twisted releases: sanitised as Twisted does
            pairs, headers = headers, Headers()
            for name, value in pairs:
                headers.addRawHeader(name, value)
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        extend = parts.extend
        for name, values in headers.getAllRawHeaders():  # (a ResponseHeaders: the upstream's lines too)
            for value in values:
                extend((name, b": ", value, b"\r\n"))
        parts.append(b"\r\n")
        # Request.write writes the body (or chunk) next, in the same call; a head written
        # alone (an empty body, a HEAD request) goes out from requestDone, or before a close.
        self._head = b"".join(parts)

    def write(self, data: bytes) -> None:
        head = self._head
        if head:
            self._head = b""
            if len(data) > 65536:
                self._send(head)  # (not copied into one buffer with a large chunk)
            else:
                data = head + data
        self._send(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def loseConnection(self) -> None:
        self._flush()  # Twisted closes once its own buffer is empty: ours goes into it first
        super().loseConnection()

    def _send_head(self) -> None:
        head, self._head = self._head, b""
        if head:
            self._send(head)

    def _flush(self) -> None:
        self._send_head()
        if self.transport is not None:
            self._sends.flush_one(self.transport)

    def _send(self, data: bytes) -> None:
        self._sends.write(self.transport, data)

    def readConnectionLost(self) -> None:
        # Only a transport that sees IHalfCloseableProtocol calls this, and HTTPChannel
        # (with no readConnectionLost of its own) does not declare it: end the connection.
        if self.transport is not None:
            self._flush()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_header_timer()
        self._stop_body_timer()
        super().connectionLost(reason)



_DATE: list[Any] = [0, b""]  # (second, its HTTP date)


def http_date(clock: IReactorTime) -> bytes:
    """The clock's now as an HTTP ``Date`` value, formatted at most once a second (Twisted formats it per request)."""
    now = int(clock.seconds())
    if _DATE[0] != now:
        _DATE[0], _DATE[1] = now, datetimeToString(now)
    return cast(bytes, _DATE[1])
