"""A raw-socket fake upstream that breaks HTTP on purpose, for olladmr's robustness tests.

``BrokenUpstream`` listens on 127.0.0.1 (a free port) with a plain Twisted
``Protocol`` -- no twisted.web -- so it can send anything.  It answers the
health check / model list ``GET .../models`` normally (keep-alive,
``{"object":"list","data":[{"id":"ai/smollm2",...}]}``) and misbehaves only on
POSTs, as its ``mode`` says:

* ``garbage``: non-HTTP bytes, then close;
* ``close_mid_headers``: half a status line and headers, then close;
* ``close_silently``: read the request, close without a byte (what a stale
  keep-alive connection looks like to the proxy);
* ``huge_headers``: a 200 with 1 MB of header lines (about 10,000 headers),
  then a small valid JSON body;
* ``huge_header_line``: one 1 MB header line, then close;
* ``stall_headers``: read the request and never answer;
* ``endless_body``: ``Content-Length: 10**12`` and 1 KB every 20 ms
  (bounded: stops after ``endless_limit`` seconds);
* ``endless_sse``: a chunked SSE stream that never ends (same bound);
* ``stall_body``: ``Content-Length: 1000``, 100 bytes, then silence;
* ``no_content_length_then_close``: a JSON body with neither
  ``Content-Length`` nor chunked framing, delimited by closing;
* ``truncated_chunked``: a chunked SSE stream of two events, cut before the
  last chunk and ``[DONE]`` (``cut_mid_chunk``: cut in the middle of a chunk);
* ``empty_502`` / ``empty_502_chunked`` / ``empty_500``: what a real DMR answers when
  it lost a request: a 502 (or 500) with no body (``Content-Length: 0``, or an
  empty chunked body); ``text_502``: a 502 that says something (an answer);
* ``ok``: a valid chat completion (keep-alive).

``script``: modes for the next POSTs, one each, before ``mode`` applies again.

Recordings: ``posts`` (POSTs received), ``open_posts`` (POSTs being
misbehaved on whose connection is still open), ``bytes_sent`` (body bytes of
endless/stalled modes) and ``requests`` (method and path of each request).
The attributes ``url`` and ``name`` make it usable with ``config_for``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

MODES = (
    "garbage",
    "close_mid_headers",
    "close_silently",
    "huge_headers",
    "huge_header_line",
    "stall_headers",
    "endless_body",
    "endless_sse",
    "stall_body",
    "no_content_length_then_close",
    "truncated_chunked",
    "empty_502",
    "empty_502_chunked",
    "empty_500",
    "text_502",
    "ok",
)

#: The modes that answer well-formed HTTP (the connection lives on).
ANSWERS = ("ok", "empty_502", "empty_502_chunked", "empty_500", "text_502")
MAX_REQUEST_HEAD = 256 * 1024


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _delta(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1,
        "id": "chatcmpl-broken",
        "model": "ai/smollm2",
        "object": "chat.completion.chunk",
    }


COMPLETION = json.dumps(
    {
        "choices": [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": "broken but whole"}}],
        "created": 1,
        "model": "ai/smollm2",
        "object": "chat.completion",
        "usage": {"completion_tokens": 3, "prompt_tokens": 1, "total_tokens": 4},
        "id": "chatcmpl-broken",
    },
    separators=(",", ":"),
).encode()


class _Conn(Protocol):
    """One upstream connection: parses requests, answers GETs, misbehaves on POSTs."""

    def __init__(self, fake: BrokenUpstream) -> None:
        self.fake = fake
        self.buf = b""
        self.misbehaving = False
        self.closed = False
        self._calls: list[Any] = []

    # -- lifecycle

    def connectionMade(self) -> None:
        self.fake._conns.add(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.fake._conns.discard(self)
        self._end_misbehaviour()
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()

    def _end_misbehaviour(self) -> None:
        if self.misbehaving:
            self.misbehaving = False
            self.fake.open_posts -= 1

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(self.fake._reactor.callLater(delay, fn, *args))

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.transport.loseConnection()

    # -- requests

    def dataReceived(self, data: bytes) -> None:
        if self.misbehaving:
            return  # a POST is being answered; ignore anything else on this connection
        self.buf += data
        while not self.misbehaving and not self.closed:
            request = self._take_request()
            if request is None:
                if len(self.buf) > MAX_REQUEST_HEAD and b"\r\n\r\n" not in self.buf:
                    self.transport.abortConnection()
                return
            method, path = request
            self.fake.requests.append((method, path))
            if method == b"POST":
                self.fake.posts += 1
                mode = self.fake.script.pop(0) if self.fake.script else self.fake.mode
                if mode in ANSWERS:  # well-formed answers: the connection lives on
                    self._answer(mode)
                    continue
                self.misbehaving = True
                self.fake.open_posts += 1
                self.misbehave(mode)
            elif method in (b"GET", b"HEAD") and path.split(b"?")[0].endswith(b"/models"):
                body = json.dumps(
                    {
                        "object": "list",
                        "data": [{"id": m, "object": "model", "created": 1, "owned_by": "docker"} for m in self.fake.models],
                    },
                    separators=(",", ":"),
                ).encode()
                self._respond(200, b"application/json", body, head=method == b"HEAD")
            else:
                self._respond(404, b"text/plain; charset=utf-8", b"404 page not found\n", head=method == b"HEAD")

    def _take_request(self) -> tuple[bytes, bytes] | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buf[:end]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
        length = 0
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip() or b"0")
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        rest = self.buf[end + 4 :]
        if chunked:
            stop = rest.find(b"0\r\n\r\n")
            if stop < 0:
                return None
            self.buf = rest[stop + 5 :]
        else:
            if len(rest) < length:
                return None
            self.buf = rest[length:]
        return method, path

    def _respond(self, status: int, content_type: bytes, body: bytes, head: bool = False) -> None:
        reason = {200: b"OK", 404: b"Not Found"}.get(status, b"Whatever")
        self.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (status, reason, content_type, len(body))
            + (b"" if head else body)
        )

    def _answer(self, mode: str) -> None:
        if mode == "ok":
            self._respond(200, b"application/json", COMPLETION)
        elif mode == "text_502":
            self._respond(502, b"text/plain; charset=utf-8", b"upstream went away\n")
        elif mode in ("empty_502", "empty_500"):
            status = b"502 Bad Gateway" if mode == "empty_502" else b"500 Internal Server Error"
            self.write(b"HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n" % status)
        else:
            self.write(b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")

    # -- misbehaviour

    def misbehave(self, mode: str) -> None:
        getattr(self, "_" + mode)()

    def _garbage(self) -> None:
        self.write(b"\x00\x01\x02 this is not HTTP \xff\xfe\r\n\r\n" + bytes(range(256)) * 4)
        self.close()

    def _close_mid_headers(self) -> None:
        self.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Len")
        self.close()

    def _close_silently(self) -> None:
        self.close()

    def _huge_headers(self) -> None:
        lines = []
        size = 0
        index = 0
        while size < 1024 * 1024:
            line = b"X-Pad-%06d: %s\r\n" % (index, b"p" * 80)
            lines.append(line)
            size += len(line)
            index += 1
        self.write(b"HTTP/1.1 200 OK\r\n" + b"".join(lines))
        self.write(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(COMPLETION) + COMPLETION)
        self._end_misbehaviour()  # a complete (if absurd) response; the connection stays usable

    def _huge_header_line(self) -> None:
        self.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (1024 * 1024) + b"\r\n\r\n")
        self.close()

    def _stall_headers(self) -> None:
        pass  # never answer; the connection is closed by the peer or by stop()

    def _endless_body(self) -> None:
        self.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % 10**12)
        self._drip(b'{"pad":"' + b"e" * 1024, self.fake._reactor.seconds() + self.fake.endless_limit, chunked=False)

    def _endless_sse(self) -> None:
        self.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        self._drip(_sse(_delta("tick")), self.fake._reactor.seconds() + self.fake.endless_limit, chunked=True)

    def _drip(self, piece: bytes, until: float, chunked: bool) -> None:
        if self.closed:
            return
        if self.fake._reactor.seconds() >= until:
            self.close()  # bounded: never stream for longer than endless_limit
            return
        self.write(_chunk(piece) if chunked else piece)
        self.fake.bytes_sent += len(piece)
        self._later(0.02, self._drip, piece, until, chunked)

    def _stall_body(self) -> None:
        self.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b" " * 100)
        self.fake.bytes_sent += 100

    def _no_content_length_then_close(self) -> None:
        self.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + COMPLETION)
        self.close()

    def _truncated_chunked(self) -> None:
        self.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.write(_chunk(_sse(_delta("Hello"))))
        self.write(_chunk(_sse(_delta(" world"))))
        if self.fake.cut_mid_chunk:
            event = _sse(_delta("!"))
            self.write(b"%x\r\n" % len(event) + event[: len(event) // 2])
        self.close()  # no last chunk, no [DONE]


class _Factory(Factory):
    noisy = False

    def __init__(self, fake: BrokenUpstream) -> None:
        self.fake = fake

    def buildProtocol(self, addr: Any) -> _Conn:
        conn = _Conn(self.fake)
        conn.factory = self
        return conn


class BrokenUpstream:
    """A fake upstream on 127.0.0.1 that answers model lists and breaks every POST per ``mode``."""

    def __init__(self, name: str = "broken", models: tuple[str, ...] = ("ai/smollm2",), *,
                 reactor: Any = None, mode: str = "garbage") -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor: Any = reactor
        self.name = name
        self.models = list(models)
        self.mode = mode
        self.cut_mid_chunk = False
        self.script: list[str] = []
        self.endless_limit = 20.0  # seconds an endless body streams at most
        self.port = 0
        self.posts = 0
        self.open_posts = 0
        self.bytes_sent = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self._conns: set[_Conn] = set()
        self._listening: IListeningPort | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}; one of {MODES}")
        self._mode = value

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<BrokenUpstream {self.name} {self.url} mode={self.mode}>"

    async def start(self, port: int = 0) -> int:
        self._listening = self._reactor.listenTCP(port, _Factory(self), interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.port

    async def stop(self) -> None:
        """Stop listening and abort every connection."""
        port, self._listening = self._listening, None
        if port is not None:
            await port.stopListening()
        for conn in list(self._conns):
            conn.transport.abortConnection()
