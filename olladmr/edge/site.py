"""
The HTTP server side: a ``Site`` whose requests know their id, their
arrival time and whether their body broke the size limit, and whose
channels enforce the request limits.

Bodies are still spooled by twisted.web (memory under 100 KB, a temporary
file above); past ``max_body_size`` nothing more is kept and the request is
answered 413.  The limits live in :class:`EdgeLimits`, which reloads
reconfigure; connections read them per request.
"""

from __future__ import annotations

import io
import os
from itertools import count
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource

from .._twisted_compat import write_now
from ..config.schema import Config, ServerConfig
from ..errors import dialect_for_path, error_body
from ..proxy.headers import client_request_id
from .gate import CLOSED, Admission

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


class AccessObserver(Protocol):
    """Told about every request olladmr answered itself (proxied ones are logged by their exchange)."""

    def local_request(self, request: OllaRequest, elapsed: float) -> None: ...


class _Connection(Protocol):
    """What :meth:`OllaChannel._abort` uses of its transport (a TCP or TLS connection)."""

    connected: int

    def abortConnection(self) -> None: ...


class OllaChannel(HTTPChannel):
    """
    HTTP/1.1 server connection with olladmr's limits: header block size
    (431), time to receive the headers and the body (408), and early
    answers (413) without reading what we will not use.  A rejected
    connection answers, half-closes, discards what the client still sends
    and is aborted after a few seconds.
    """

    _header_timer: IDelayedCall | None = None
    _body_timer: IDelayedCall | None = None
    _rejected = False
    _header_bytes = 0  # of the request being received; our own count, for our 431 (Twisted's gives a bare 400)
    _in_body = False  # the request being received has a body still to come
    _request_line = b""  # of the request being received: its errors speak that route's dialect
    LINGER = 5.0

    def _olla(self) -> OllaSite | None:
        site = getattr(self, "site", None)
        return site if isinstance(site, OllaSite) else None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._size_caps()

    def _size_caps(self) -> None:
        # Twisted's own caps (a silent close for a line over MAX_LENGTH, a bare
        # 400 past totalHeadersSize, both 16 KB) must never fire before our 431,
        # and a partial line must not grow past the limit either.
        site = self._olla()
        if site is not None:
            # (our own check runs first, per line; these only bound a line still being received)
            self.MAX_LENGTH = self.totalHeadersSize = site.limits.max_header_size + 2

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        super().dataReceived(data)
        self._arm()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)  # may start on a pipelined request already received
        self._arm()

    def _arm(self) -> None:
        """
        Start the header (or body) clock of a request left part-received.
        Armed once the bytes at hand are parsed, so a request that arrives
        whole (the usual case) costs no timer at all; the clock starts when
        its first bytes were handled, as before.
        """
        if self._rejected or self.transport is None:
            return
        site = self._olla()
        if site is None:
            return
        limits = site.limits
        if self._header_bytes > 0:
            if self._header_timer is None and limits.read_header_timeout > 0:
                self._header_timer = site.clock.callLater(limits.read_header_timeout, self._too_slow, "headers")
        elif self._in_body and self._body_timer is None and limits.read_timeout > 0:
            self._body_timer = site.clock.callLater(limits.read_timeout, self._too_slow, "body")

    def lineReceived(self, line: bytes) -> None:
        if self._rejected:
            return
        site = self._olla()
        if site is not None:
            limits = site.limits
            if self._header_bytes == 0:
                self._size_caps()  # a reload may have changed the limit since the last request
                self._request_line = line  # parsed only if the request is rejected
            self._header_bytes += len(line)
            if self._header_bytes > limits.max_header_size:
                self.reject(
                    431,
                    "request_header_fields_too_large",
                    f"the request line and headers exceed {limits.max_header_size} bytes "
                    "(server.request_limits.max_header_size)",
                )
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """One header line alone is over the limit (LineReceiver would just close): 431 instead."""
        site = self._olla()
        limit = site.limits.max_header_size if site is not None else self.MAX_LENGTH
        self.reject(
            431,
            "request_header_fields_too_large",
            f"the request line and headers exceed {limit} bytes (server.request_limits.max_header_size)",
        )

    def rawDataReceived(self, data: bytes) -> None:
        if not self._rejected:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel("_header_timer")
        self._header_bytes = 0
        self._in_body = self.length != 0
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._cancel("_body_timer")
        self._in_body = False
        super().allContentReceived()

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            if timer.active():
                timer.cancel()
            setattr(self, name, None)

    def _too_slow(self, what: str) -> None:
        setattr(self, "_header_timer" if what == "headers" else "_body_timer", None)
        setting = "server.read_header_timeout" if what == "headers" else "server.read_timeout"
        self.reject(408, "request_timeout", f"the request {what} did not arrive in time ({setting})")

    def reject(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` now with an OpenAI-shaped error and end the connection politely."""
        if self._rejected or self.transport is None:
            return
        self._rejected = True
        self._cancel("_header_timer")
        self._cancel("_body_timer")
        site = self._olla()
        rid = site.new_request_id() if site is not None else b"-"
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
        if site is not None:
            site.clock.callLater(self.LINGER, self._abort)
        else:
            self._abort()
        log.info("rejected a request with {status}: {message}", status=status, message=message)

    def _abort(self) -> None:
        transport = cast("_Connection | None", self.transport)
        if transport is not None and transport.connected:
            transport.abortConnection()

    # -- writing: at once when the socket has room (see write_now), one send per response head

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):  # pairs, from older Twisted releases: sanitised as Twisted does
            pairs, headers = headers, Headers()
            for name, value in pairs:
                headers.addRawHeader(name, value)
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        extend = parts.extend
        for name, values in headers.getAllRawHeaders():
            for value in values:
                extend((name, b": ", value, b"\r\n"))
        parts.append(b"\r\n")
        write_now(self.transport, b"".join(parts))

    def write(self, data: bytes) -> None:
        write_now(self.transport, data)

    def writeSequence(self, iovec: Any) -> None:
        write_now(self.transport, b"".join(iovec))

    def readConnectionLost(self) -> None:
        # Only a transport that sees IHalfCloseableProtocol calls this, and HTTPChannel
        # (with no readConnectionLost of its own) does not declare it: end the connection.
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel("_header_timer")
        self._cancel("_body_timer")
        super().connectionLost(reason)


class OllaRequest(server.Request):
    """
    A request that carries ``request_id``, ``arrived``, ``body_too_large``,
    whether it was ``proxied``, and the gate's ``admission`` (recorded by
    the front door before any route runs; until then nothing is allowed).
    """

    request_id: str = "-"
    body_too_large = False
    proxied = False
    admission: Admission = CLOSED

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        self._olla_site: OllaSite | None = site if isinstance(site, OllaSite) else None
        self.arrived = self._olla_site.clock.seconds() if self._olla_site else 0.0
        self._body_seen = 0

    def _limit(self) -> int:
        return self._olla_site.limits.max_body_size if self._olla_site else 50 * 1024**2

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_seen += len(data)
        if self._body_seen > self._limit():
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def _refuse_body(self) -> None:
        """413 at once: the rest of the body is never read into memory or disk."""
        self.body_too_large = True
        content = getattr(self, "content", None)
        if content is not None:
            content.close()
        self.content = io.BytesIO()
        reject = getattr(self.channel, "reject", None)
        if reject is not None:
            reject(
                413,
                "request_too_large",
                f"request body is larger than the limit of {self._limit()} bytes (server.request_limits.max_body_size)",
            )

    def process(self) -> None:
        rid = client_request_id(self.requestHeaders)
        if rid is None and self._olla_site is not None:
            rid = self._olla_site.new_request_id()
        self.request_id = (rid or b"-").decode("ascii")
        self.responseHeaders.setRawHeaders(b"x-olla-request-id", [rid or b"-"])
        super().process()


class OllaSite(server.Site):
    """Serves the route tree; owns request ids and hands locally answered requests to the access log."""

    requestFactory = OllaRequest
    # plain HTTP/1.1: no HTTP/2 negotiation wrapper (HTTPFactory types ``protocol`` as that wrapper's factory)
    protocol = OllaChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self, resource: IResource, clock: IReactorTime, limits: EdgeLimits, access_log: AccessObserver | None = None
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, reactor=clock)
        self.clock = clock
        self.limits = limits
        self._access_log = access_log
        self._prefix = os.urandom(4).hex()
        self._ids = count(1)

    @property
    def timeOut(self) -> float | None:
        """The idle keep-alive timeout new connections get (``server.idle_timeout``; 0: none)."""
        return self.limits.idle_timeout or None

    @timeOut.setter
    def timeOut(self, value: float | None) -> None:
        pass  # set by HTTPFactory.__init__; the limits decide

    def new_request_id(self) -> bytes:
        """A process-unique id: a random boot prefix and a counter."""
        return f"{self._prefix}-{next(self._ids):x}".encode()

    def log(self, request: Any) -> None:
        """twisted.web's access log hook: olladmr's own event for requests it answered itself."""
        if self._access_log is not None and not getattr(request, "proxied", False):
            self._access_log.local_request(request, self.clock.seconds() - getattr(request, "arrived", 0.0))
