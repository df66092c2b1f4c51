"""Raw HTTP/1.1 over TCP, and the checks shared by olladmr's fuzz and broken-upstream tests.

Not a test module: ``test_fuzz`` and ``test_broken_upstreams`` import it.

* :class:`RawHTTPClient` (via :func:`raw_exchange`) writes raw bytes to the
  daemon -- so malformed requests really go on the wire -- and parses what
  comes back into :class:`RawResponse` objects gathered in a :class:`RawResult`.
* :class:`LogWatch` collects the log events published while a test runs:
  failures and error/critical events (which fail the tests), warnings, and
  the daemon's ``olladmr.access`` events (how each request ended: its
  ``status`` and ``outcome``).
* :func:`olladmr_error_problem` and :func:`assert_daemon_healthy` are the
  checks both test modules make of olladmr's answers and state.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from conftest import Daemon, eventually
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

ANSWER_TIMEOUT = 5.0  # seconds a request may take to be answered (or its connection closed)
# A bound that only stops a test that would otherwise wait forever (an exchange that is never answered
# nor closed, a condition that never comes true); no test asserts how long anything took.
HANG_GUARD = 30.0

CHAT_BODY = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}
CHAT_PATH = "/olla/dmr/engines/v1/chat/completions"

# Log events that are expected in these tests; anything else at error/critical level, or
# carrying a failure, fails the test.  (Empty: a malformed request is no reason to log an error.)
EXPECTED_LOG_EVENTS: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# Raw HTTP/1.1 over TCP


@dataclass
class RawResponse:
    """One HTTP response as received: status, reason, headers and (up to 256 KB of) its body.

    ``complete``: the response ended as its framing says (or, with neither
    Content-Length nor chunked framing, by the server closing); ``body_bytes``
    counts every body byte received, kept or not.
    """

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False
    body_bytes: int = 0

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass
class RawResult:
    """How one raw exchange went: the responses received and how the connection ended.

    ``closed_by_server``: the daemon closed (or aborted) the connection before
    the client was done; ``hung``: neither an answer nor a close came within
    the client's ``timeout``; ``elapsed`` is informative only (printed, never
    asserted on).
    """

    responses: list[RawResponse] = field(default_factory=list)
    closed_by_server: bool = False
    hung: bool = False
    garbage: bytes | None = None  # bytes that do not parse as an HTTP response
    elapsed: float = 0.0


class RawHTTPClient(Protocol):
    """Writes ``pieces`` of raw bytes and parses whatever HTTP/1.1 responses come back.

    ``expect``: the number of responses after which the exchange is over (the
    client then aborts the connection), or ``None``: at least one, then over
    after ``quiet`` seconds without data.  ``half_close``: shut our write side
    after the last piece (for requests the server would wait on forever).
    The exchange is also over when the server closes the connection, or after
    ``timeout`` seconds (``hung``).
    """

    MAX_KEEP = 256 * 1024

    def __init__(
        self,
        pieces: list[bytes],
        head: list[bool],
        expect: int | None = 1,
        half_close: bool = False,
        timeout: float = ANSWER_TIMEOUT,
        piece_delay: float = 0.0,
        quiet: float = 0.3,
    ) -> None:
        self.pieces = pieces
        self.head = head
        self.expect = expect
        self.half_close = half_close
        self.timeout = timeout
        self.piece_delay = piece_delay
        self.quiet = quiet
        self.result = RawResult()
        self.done: defer.Deferred[RawResult] = defer.Deferred()
        self._buf = bytearray()
        self._state = "head"  # head | length | chunk-size | chunk-data | chunk-crlf | trailers | close
        self._current: RawResponse | None = None
        self._remaining = 0
        self._timer: Any = None
        self._quiet_timer: Any = None
        self._started = 0.0
        self._finished = False

    # -- lifecycle

    def connectionMade(self) -> None:
        self._started = time.monotonic()
        self._timer = reactor.callLater(self.timeout, self._hang)
        self._write_pieces(list(self.pieces))

    def _write_pieces(self, pieces: list[bytes]) -> None:
        while pieces and not self._finished:
            self.transport.write(pieces.pop(0))
            if pieces and self.piece_delay > 0:
                reactor.callLater(self.piece_delay, self._write_pieces, pieces)
                return
        if not pieces and self.half_close and not self._finished:
            self.transport.loseWriteConnection()

    def _hang(self) -> None:
        self._timer = None
        self.result.hung = True
        self._finish(abort=True)

    def _finish(self, abort: bool) -> None:
        if self._finished:
            return
        self._finished = True
        for timer in (self._timer, self._quiet_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.result.elapsed = time.monotonic() - self._started
        if self._current is not None:  # a response still being received: keep it, incomplete
            self.result.responses.append(self._current)
            self._current = None
        if abort and self.transport is not None:
            self.transport.abortConnection()
        self.done.callback(self.result)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._finished:
            return
        self.result.closed_by_server = True
        current = self._current
        if current is not None:
            if self._state == "close":
                current.complete = True
            self.result.responses.append(current)
            self._current = None
        self._finish(abort=False)

    # -- parsing

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self._buf += data
        try:
            self._parse()
        except _NotHTTP as exc:
            self.result.garbage = bytes(exc.args[0])[:200]
            self._finish(abort=True)
            return
        if self.expect is None and (self.result.responses or self._current) and not self._finished:
            if self._quiet_timer is not None and self._quiet_timer.active():
                self._quiet_timer.reset(self.quiet)
            else:
                self._quiet_timer = reactor.callLater(self.quiet, self._finish, True)

    def _consume(self, buf: bytearray) -> bool:
        """Move up to ``_remaining`` bytes of ``buf`` into the body; whether that part is now complete."""
        take = bytes(buf[: self._remaining])
        del buf[: len(take)]
        self._keep(take)
        self._remaining -= len(take)
        return self._remaining == 0

    def _keep(self, chunk: bytes) -> None:
        current = self._current
        assert current is not None
        current.body_bytes += len(chunk)
        if len(current.body) < self.MAX_KEEP:
            current.body += chunk[: self.MAX_KEEP - len(current.body)]

    def _response_done(self) -> None:
        current = self._current
        assert current is not None
        current.complete = True
        self.result.responses.append(current)
        self._current = None
        self._state = "head"
        if self.expect is not None and len(self.result.responses) >= self.expect:
            self._finish(abort=True)

    def _parse(self) -> None:
        buf = self._buf
        while not self._finished:
            if self._state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 1024 * 1024 or (buf and not b"HTTP/1."[: len(buf)].startswith(bytes(buf[:7]))):
                        raise _NotHTTP(buf)
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ", 2)
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                    raise _NotHTTP(head)
                status = int(parts[1])
                headers = []
                for line in lines[1:]:
                    name, sep, value = line.partition(b":")
                    if not sep:
                        raise _NotHTTP(head)
                    headers.append((name.strip().lower(), value.strip()))
                if 100 <= status < 200:
                    continue  # 100 Continue: the real answer follows
                self._current = response = RawResponse(status, parts[2] if len(parts) > 2 else b"", headers)
                index = len(self.result.responses)
                is_head = self.head[min(index, len(self.head) - 1)] if self.head else False
                te = (response.header(b"transfer-encoding") or b"").lower()
                length = response.header(b"content-length")
                if is_head or status in (204, 304):
                    self._response_done()
                elif b"chunked" in te:
                    self._state = "chunk-size"
                elif length is not None:
                    if not length.isdigit():
                        raise _NotHTTP(head)
                    self._remaining = int(length)
                    self._state = "length"
                    if self._remaining == 0:
                        self._response_done()
                else:
                    self._state = "close"
            elif self._state == "length":
                if not buf:
                    return
                if self._consume(buf):
                    self._response_done()
            elif self._state == "chunk-size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise _NotHTTP(line) from None
                if size == 0:
                    self._state = "trailers"
                else:
                    self._remaining = size
                    self._state = "chunk-data"
            elif self._state == "chunk-data":
                if not buf:
                    return
                if self._consume(buf):
                    self._state = "chunk-crlf"
            elif self._state == "chunk-crlf":
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise _NotHTTP(bytes(buf[:20]))
                del buf[:2]
                self._state = "chunk-size"
            elif self._state == "trailers":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if line == b"":
                    self._response_done()
            elif self._state == "close":
                if buf:
                    self._keep(bytes(buf))
                    del buf[:]
                return


class _NotHTTP(Exception):
    """Raised by :class:`RawHTTPClient`'s parser for bytes that are not an HTTP/1.x response."""


async def raw_exchange(port: int, pieces: list[bytes] | bytes, **kwargs: Any) -> RawResult:
    """Connect to 127.0.0.1:``port``, run a :class:`RawHTTPClient` and return its result."""
    if isinstance(pieces, bytes):
        pieces = [pieces]
    kwargs.setdefault("head", [False])
    client = RawHTTPClient(pieces, **kwargs)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    return await client.done


def chat_wire(port: int, stream: bool = False) -> bytes:
    """A valid chat completion request for ``ai/smollm2`` as raw bytes (``stream``: an SSE one)."""
    body = json.dumps({**CHAT_BODY, "stream": stream}).encode()
    return (b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(body)) + body)


# ---------------------------------------------------------------------------
# Log capture


class LogWatch:
    """Collects the log events published while it is installed (``with LogWatch() as logs:``).

    ``bad``: failures and error/critical events (tests assert there are none);
    ``warnings``/``warn_samples``: warn-level events, counted and sampled;
    ``access``: every ``olladmr.access`` event, i.e. how each request ended
    (``status``, ``outcome``, ``error``, ... as event keys).  With ``known``
    and ``classify`` (the fuzz's known-bug filter), a bad event ``classify``
    names is counted in ``known`` under ``"log:" + name`` instead of kept.
    """

    def __init__(self, known: Counter[str] | None = None,
                 classify: Callable[[dict[str, Any]], str | None] | None = None,
                 expected: tuple[str, ...] = EXPECTED_LOG_EVENTS) -> None:
        self.bad: list[dict[str, Any]] = []
        self.warnings: Counter[str] = Counter()
        self.known = known  # when given, known bugs are counted here instead of failing
        self.classify = classify
        self.expected = expected
        self.warn_samples: list[str] = []
        self.access: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "olladmr.access":
            self.access.append(event)
        level = event.get("log_level")
        text = str(event.get("log_format") or "")
        if any(expected in text for expected in self.expected):
            return
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            bug = self.classify(event) if self.known is not None and self.classify is not None else None
            if bug is not None:
                self.known["log:" + bug] += 1
                return
            self.bad.append(event)
        elif level == LogLevel.warn:
            self.warnings[text[:60]] += 1
            if len(self.warn_samples) < 20:
                self.warn_samples.append(formatEvent(event)[:500])

    def __enter__(self) -> LogWatch:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def access_events(self, path: str = CHAT_PATH) -> list[dict[str, Any]]:
        """The access-log events seen so far for requests to ``path`` (query string included)."""
        return [event for event in self.access if event.get("path") == path]

    async def access_event(self, index: int, path: str = CHAT_PATH) -> dict[str, Any]:
        """The ``index``-th (from 0) access-log event for ``path``, waiting for it if it is not logged yet."""
        await eventually(lambda: len(self.access_events(path)) > index, HANG_GUARD,
                         f"access-log event #{index} for {path}")
        return self.access_events(path)[index]

    def describe(self) -> str:
        out = []
        for event in self.bad[:5]:
            line = f"{event.get('log_namespace')}: {formatEvent(event)}"
            failure = event.get("log_failure")
            if failure is not None:
                line += "\n" + failure.getTraceback()
            out.append(line)
        return "\n---\n".join(out)


# ---------------------------------------------------------------------------
# Checks shared by the fuzz and the broken-upstream tests


def olladmr_error_problem(response: RawResponse) -> str | None:
    """What is wrong with an error response olladmr made itself, or ``None``."""
    if response.header(b"x-olla-request-id") is None or response.header(b"x-olla-endpoint") is not None:
        return None  # twisted.web's own 400 (before olladmr saw the request) or an upstream answer
    if response.status < 400 or not response.complete or not response.body:
        return None
    if response.status == 503 and response.body.startswith(b'{"status":"not_ready"'):
        return None  # /internal/ready's documented answer
    try:
        error = json.loads(response.body)["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
    except Exception:
        return f"olladmr's own {response.status} is not an OpenAI-shaped JSON error: {response.body[:200]!r}"
    return None


async def assert_daemon_healthy(daemon: Daemon, model: str = "ai/smollm2", text: str = "Hello, world!") -> None:
    """A normal chat works, liveness is fine, and no exchange is left in flight."""
    response, body = await daemon.post_json(CHAT_PATH, {**CHAT_BODY, "model": model})
    assert response.code == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == text
    response, body = await daemon.request("GET", "/internal/health")
    assert response.code == 200 and json.loads(body) == {"status": "healthy"}
    await eventually(lambda: not daemon.parts.inflight, 5.0, "no exchange left in flight")
    await eventually(lambda: all(ep.in_flight == 0 for ep in daemon.parts.fleet.endpoints.values()), 5.0,
                     "every endpoint slot released")
