"""
The server side's HTTP/1.1 connection: :class:`OllaChannel` is Twisted's own
``HTTPChannel`` (its line parser, pipelining, persistence, ``Expect:
100-continue``, producers, the idle timeout) with olladmr's request limits
(:class:`EdgeLimits`: 431, 408, and 413 before reading what olladmr will not
use), its errors in the client's dialect, and its writes through the
:class:`~olladmr.sending.SendQueue`.

The site's ``buildProtocol`` builds each channel with its limits, clock,
send queue and request-id source, so the channel never looks its site up.
Of ``HTTPChannel`` it overrides public methods only: ``dataReceived``,
``lineReceived``, ``lineLengthExceeded`` and ``rawDataReceived`` (the limits
and clocks), ``allHeadersReceived`` and ``allContentReceived`` (where a
request's head and body end), ``checkPersistence`` (``Connection`` read as a
list), ``requestDone``, ``writeHeaders``, ``write``, ``writeSequence``,
``loseConnection``, ``connectionLost``, ``getPeer``, ``getHost``,
``isSecure``, and the half-close hook ``readConnectionLost``.  What it reads
or hooks of Twisted's internals goes through ``_twisted_compat``, each with
a contract test: :class:`~olladmr._twisted_compat.BadRequestHook` (Twisted's
parser refusing a request -- a malformed line, a bad ``Content-Length``, a
broken chunk -- reaches :meth:`OllaChannel.bad_request`),
:func:`~olladmr._twisted_compat.line_buffer` (the part of a line not yet
ended) and :func:`~olladmr._twisted_compat.channel_busy` (a request being
answered).  ``tests/test_architecture.py`` rejects overriding any of
``HTTPChannel``'s underscored names outside ``_twisted_compat``.

(Requests were parsed by llhttp until issue 21 measured both parsers in one
run: Twisted's cost the same CPU per request, so the simpler one stayed.)
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers

from .._twisted_compat import BadRequestHook, channel_busy, line_buffer
from ..config.schema import Config, ServerConfig
from ..errors import dialect_for_path, error_body
from ..proxy.headers import connection_tokens
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


_IDLE, _HEAD, _BODY = 0, 1, 2  # where the request being received is
_CONTINUE = b"100-continue"


class OllaChannel(BadRequestHook, HTTPChannel):
    """
    HTTP/1.1 server connection with olladmr's limits: header block size
    (431), time to receive the headers and the body (408), and early
    answers (413) without reading what we will not use.  A rejected
    connection answers, half-closes, discards what the client still sends
    and is aborted after a few seconds.  Pipelined requests are Twisted's:
    answered in order, one at a time, reading paused while more than 16 KiB
    of them wait.
    """

    __slots__ = (
        "_header_timer", "_body_timer", "_rejected", "_request_line", "_phase", "_header_bytes", "_header_lines",
        "_held", "_held_size", "_cr", "_head", "_peer", "_host", "_secure", "_edge", "_clock", "_sends", "_new_id",
    )
    LINGER = 5.0
    MAX_HEADERS = 500  # as Twisted's maxHeaders, checked first so the answer can say so

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
        self._request_line = b""  # of the request being received: its errors speak that route's dialect
        self._phase = _IDLE
        self._header_bytes = 0  # of the request being received: its request line and header lines, as sent
        self._header_lines = 0
        self._held: list[bytes] = []  # reads of a line not yet ended, handed to Twisted when it ends
        self._held_size = 0
        self._cr = False  # the last read ended with CR (its LF may start the next)
        self._head = b""  # a response head waiting for the body bytes Twisted writes right after it
        self._peer: Any = None  # the connection's addresses, asked of the transport once (getsockname is a syscall)
        self._host: Any = None
        self._secure: bool | None = None  # whether the transport is TLS (an interface adaptation: asked once)
        self.MAX_LENGTH = self.totalHeadersSize = limits.max_header_size

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

    # -- receiving: Twisted parses; olladmr counts, times and refuses

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        if self.line_mode and b"\r\n" not in data and not (self._cr and data[:1] == b"\n") and not channel_busy(self):
            # No line ends in these bytes: held here and handed over once one does.  (LineReceiver copies and
            # scans its whole buffer on every read: a long header line trickled in small reads would cost
            # quadratic time.)
            if b"\n" in data:  # (an LF not after a CR: a line's end that HTTP/1.1 does not have)
                self._refuse(400, "invalid_request", "malformed HTTP request: a line ends with LF alone, not CRLF")
                return
            self._held.append(data)
            self._held_size += len(data)
            self._cr = data[-1:] == b"\r"
            self.resetTimeout()
            if len(line_buffer(self)) + self._held_size > self.MAX_LENGTH:
                self.lineLengthExceeded(self._pending())
                return
            self._arm()
            return
        self._cr = data[-1:] == b"\r"
        if self._held:
            data = b"".join(self._held) + data
            self._held.clear()
            self._held_size = 0
        super().dataReceived(data)  # Twisted's: resets the idle timeout and parses what it can
        self._arm()

    def _pending(self) -> bytes:
        """The bytes received of a line not yet ended."""
        return line_buffer(self) + b"".join(self._held)

    def _start_head(self) -> None:
        self._phase = _HEAD
        self._header_bytes = 0
        self._header_lines = 0
        self._request_line = b""
        # No line, even one still incomplete, may be longer than the limit (LineReceiver's MAX_LENGTH);
        # Twisted's own cap on the whole head is set to ours, which lineReceived checks first.
        self.MAX_LENGTH = self.totalHeadersSize = self._edge.max_header_size

    def lineReceived(self, line: bytes) -> Any:
        if self._rejected:
            return True  # (a true value stops LineReceiver's loop over the lines at hand)
        if not line and (self._phase != _HEAD or not self._header_lines):
            self._phase = _IDLE  # an empty line before a request line: skipped, however many (Twisted skips one)
            return None
        if self._phase != _HEAD:
            self._start_head()  # a request that began in bytes read with the one before it
        if not self._header_lines:
            self._request_line = line
        elif line and line[0] not in b" \t":
            if self._header_lines > self.MAX_HEADERS:
                return self._refuse(400, "invalid_request", f"more than {self.MAX_HEADERS} request headers")
        self._header_lines += 1
        self._header_bytes += len(line) + 2
        limit = self._edge.max_header_size
        if self._header_bytes > limit:
            return self._refuse(*self._too_large(limit))
        self.MAX_LENGTH = limit - self._header_bytes  # what is left of the head, for the next line
        return super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> Any:
        if not self._header_lines:
            self._request_line = line[:8192]  # (its path picks the error's dialect)
        return self._refuse(*self._too_large(self._edge.max_header_size))

    def _too_large(self, limit: int) -> tuple[int, str, str]:
        return (431, "request_header_fields_too_large",
                f"the request line and headers exceed {limit} bytes (server.request_limits.max_header_size)")

    def rawDataReceived(self, data: bytes) -> Any:
        if self._rejected:
            return True  # nothing of a refused request's body is read (nor anything after it)
        return super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self.MAX_LENGTH = self._edge.max_header_size  # (the next request's lines)
        self._stop_header_timer()
        if self._rejected:
            return  # (Twisted's parser refused a header line, and went on to the head's end)
        request = self.requests[-1]
        headers = request.requestHeaders
        coding = headers.getRawHeaders(b"transfer-encoding")
        if coding is not None and [value.lower() for value in coding] != [b"chunked"]:
            # (Twisted accepts "identity" and reads no body: that request would be read as two)
            self._refuse(400, "invalid_request", "unsupported Transfer-Encoding (only chunked is accepted)")
            return
        expect = headers.getRawHeaders(b"expect")
        answer_continue = False
        if expect is not None:
            # Answered below, in order with what this connection still has to send (Twisted would write it
            # straight to the transport, before its answers still in the send queue, and after a 413).
            rest = [value for value in expect if value.lower() != _CONTINUE]
            answer_continue = len(rest) < len(expect) and self._request_line.endswith(b" HTTP/1.1")
            if rest:
                headers.setRawHeaders(b"expect", rest)
            else:
                headers.removeHeader(b"expect")
        self._phase = _BODY if self.length != 0 else _IDLE
        super().allHeadersReceived()  # persistence; gotLength, which may refuse the body (413)
        if answer_continue and self.length != 0 and not self._rejected:
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def allContentReceived(self) -> None:
        if self._rejected:
            return  # (a refused request's body ended in the bytes at hand: it is never served)
        self._phase = _IDLE
        self._header_lines = 0
        self._stop_body_timer()
        super().allContentReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Twisted's rule (HTTP/1.1 stays open unless the client says ``close``;
        HTTP/1.0 closes), with ``Connection`` read as the list it is: every
        value, comma-separated (Twisted reads the first value, split at spaces).
        """
        if version != b"HTTP/1.1":
            return False
        if b"close" in connection_tokens(request.requestHeaders):
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return True

    def bad_request(self) -> None:
        """Twisted's parser refused the request (a malformed line, length or chunk): a 400 in the client's dialect."""
        if self._phase == _BODY:
            message = "malformed chunked request body"
        elif self._header_lines == 1:  # (Twisted reads the request line at once, header lines one behind)
            version = self._request_line.rpartition(b" ")[2]
            if version.startswith(b"HTTP/") and version not in (b"HTTP/1.0", b"HTTP/1.1"):
                message = f"unsupported HTTP version {version.decode('ascii', 'replace')}"
            else:
                message = "malformed HTTP request line"
        else:
            message = "malformed HTTP request: a header line, Content-Length or Transfer-Encoding"
        self._refuse(400, "invalid_request", message)

    def _refuse(self, status: int, code: str, message: str) -> bool:
        self.reject(status, code, message)
        return True

    def requestDone(self, request: Any) -> None:
        self._send_head()
        super().requestDone(request)  # Twisted's: the next (pipelined) request may start, or the connection ends

    def _arm(self) -> None:
        """
        Start the header (or body) clock of a request left part-received,
        once the bytes at hand are parsed: a request that arrives whole (the
        usual case) costs no timer at all.  A request starts with its first
        byte that is not part of an empty line, also when it came in the same
        read as the end of the one before; a request read while the one
        before it is answered gets its clock when its turn comes.
        """
        if self._rejected or self.transport is None or channel_busy(self):
            return
        limits = self._edge
        phase = self._phase
        if phase == _IDLE:
            rest = self._pending().replace(b"\r\n", b"")
            if rest == b"" or rest == b"\r":
                self._stop_header_timer()
                return
            self._start_head()
            phase = _HEAD
        if phase == _HEAD:
            if self._header_timer is None and limits.read_header_timeout > 0:
                self._header_timer = self._clock.callLater(limits.read_header_timeout, self._headers_too_slow)
        else:
            self._stop_header_timer()
            if self._body_timer is None and limits.read_timeout > 0:
                self._body_timer = self._clock.callLater(limits.read_timeout, self._body_too_slow)

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
        self.reject(408, "request_timeout", "the request headers did not arrive in time (server.read_header_timeout)")

    def _body_too_slow(self) -> None:
        self._body_timer = None
        self.reject(408, "request_timeout", "the request body did not arrive in time (server.read_timeout)")

    def reject(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` now with an error in the route's dialect and end the connection politely."""
        if self._rejected or self.transport is None:
            return
        self._rejected = True
        self._stop_header_timer()
        self._stop_body_timer()
        self._flush()  # an answer to an earlier request still waiting goes first
        rid = self._new_id()
        parts = (self._request_line or self._pending()[:8192].lstrip(b"\r\n")).split(b" ")
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
