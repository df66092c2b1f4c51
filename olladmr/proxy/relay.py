"""
Relaying an upstream response body to the client, chunk by chunk.

:class:`ResponseRelay` is the ``IProtocol`` given to
``IResponse.deliverBody``.  It registers the upstream transport as the
client request's push producer, so a client that stops reading pauses the
upstream socket (TCP backpressure end to end), and it writes every chunk
the moment it arrives (no coalescing, no timer).  It ends the client's
response honestly: a clean finish only when the upstream finished cleanly;
otherwise an in-band error event for event streams (an ``{"error": ...}``
line for DMR's Ollama API streams), or an aborted connection for
everything else -- never a synthesised ``[DONE]`` or ``"done": true``.
"""

from __future__ import annotations

import json
import re
from typing import Callable, NamedTuple, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request

from .record import CLIENT_DISCONNECTED, OK, READ_TIMEOUT, REQUEST_TIMEOUT, UPSTREAM_TRUNCATED

log = Logger()


class StreamDialect(NamedTuple):
    """How one API's event streams end: the markers of a clean end, of a finished answer and of an in-band error."""

    name: str
    done: tuple[bytes, ...]
    finished: tuple[bytes, ...]
    errors: tuple[bytes, ...]


#: OpenAI chat/completions streams: ``data: [DONE]``, a non-null ``finish_reason``, ``data: {"error"...}``.
OPENAI_STREAM = StreamDialect(
    "openai",
    (b"data: [DONE]",),
    (b'"finish_reason":"', b'"finish_reason": "'),
    (b'data: {"error"', b'data:{"error"'),
)
#: Anthropic Messages streams end with ``message_stop``; failures are ``event: error``.
ANTHROPIC_STREAM = StreamDialect("anthropic", (b"event: message_stop",), (), (b"event: error",))
#: Responses API streams end with ``response.completed`` (or ``.incomplete``); failures are ``.failed`` or ``error``.
RESPONSES_STREAM = StreamDialect(
    "responses",
    (b"event: response.completed", b"event: response.incomplete"),
    (),
    (b"event: response.failed", b"event: error"),
)


#: DMR's Ollama API streams: one JSON object a line, the last with ``"done":true``; a failure is an ``error`` line.
OLLAMA_STREAM = StreamDialect("ollama", (b'"done":true', b'"done": true'), (), (b'{"error"',))


class StreamWatch:
    """
    Watches a copy of an SSE stream for how it ends, in its API's dialect:
    a clean end (``[DONE]``, ``message_stop``, ``response.completed``), a
    finished answer (a non-null ``finish_reason``) or an in-band error
    event.  Bytes are never changed.
    """

    __slots__ = ("done", "finished", "error", "dialect", "_tail", "_keep")

    def __init__(self, dialect: StreamDialect = OPENAI_STREAM) -> None:
        self.done = False
        self.finished = False
        self.error = False
        self.dialect = dialect
        self._tail = b""
        self._keep = max(len(m) for m in dialect.done + dialect.finished + dialect.errors) + 8

    def feed(self, data: bytes) -> None:
        # (plain loops: this runs for every chunk of every stream)
        window = self._tail + data if self._tail else data
        dialect = self.dialect
        if not self.done:
            for marker in dialect.done:
                if marker in window:
                    self.done = True
                    break
        if not self.finished:
            for marker in dialect.finished:
                if marker in window:
                    self.finished = True
                    break
        if not self.error:
            for marker in dialect.errors:
                if marker in window:
                    self.error = True
                    break
        self._tail = window[-self._keep :]

    @property
    def complete(self) -> bool:
        """The upstream said the answer is over (or failed in-band)."""
        return self.done or self.finished or self.error

    @property
    def at_event_boundary(self) -> bool:
        if self.dialect.name == "ollama":
            return self._tail == b"" or self._tail.endswith(b"\n")
        return self._tail == b"" or self._tail.endswith(b"\n\n") or self._tail.endswith(b"\r\n\r\n")

    def error_event(self, message: str, code: str) -> bytes:
        """The in-band error event that ends a broken stream of this dialect."""
        return sse_error_event(message, code, self.dialect)

    def ending(self, message: str, code: str) -> bytes:
        """What ends a broken stream: the error event, after whatever closes the event or line cut off mid-way."""
        if self.at_event_boundary:
            return self.error_event(message, code)
        return (b"\n" if self.dialect.name == "ollama" else b"\n\n") + self.error_event(message, code)


class UsageTail:
    """
    Keeps what of the last few KB of a response body could hold a usage
    object (and, for streams that report part of their usage up front, the
    first few KB) to read the upstream's
    ``usage`` from at the end: the final SSE chunk or the JSON body, plus
    an Anthropic ``message_start``.  The relayed bytes are untouched.

    OpenAI's ``prompt_tokens``/``completion_tokens`` and the Anthropic and
    Responses APIs' ``input_tokens``/``output_tokens`` are both reported as
    ``prompt_tokens``/``completion_tokens`` (the raw keys are kept too).
    """

    __slots__ = ("_tail", "_head", "_head_wanted")
    SIZE = 2048  # the final usage chunk (llama.cpp: usage + timings) fits; kept small per stream
    HEAD = 2048

    def __init__(self, head: bool = False) -> None:
        self._tail = b""
        self._head = b""
        self._head_wanted = head

    def feed(self, data: bytes) -> None:
        if self._head_wanted:
            self._head += data[: self.HEAD - len(self._head)]
            self._head_wanted = len(self._head) < self.HEAD
        tail = self._tail + data if len(data) < self.SIZE else data
        self._tail = usage_window(tail[-self.SIZE :] if len(tail) > self.SIZE else tail)

    def usage(self) -> dict[str, object] | None:
        """The usage the body reported (head and tail merged, the tail's values winning), normalised."""
        found = parse_usage(self._tail)
        first = parse_usage(self._head, first=True) if self._head else None
        if first is not None:
            found = {**first, **(found or {})}
        return normalise_usage(found) if found is not None else None


_MARKER = b'"usage"'


def usage_window(window: bytes) -> bytes:
    """
    What of ``window`` :func:`parse_usage` can ever read: from its first
    ``"usage"`` key on, or (with none) just the bytes a key split across
    reads could start in.  A stream that reports no usage until its last
    chunk (the usual case) keeps a few bytes, not kilobytes, while it lasts.
    """
    at = window.find(_MARKER)
    if at > 0:
        return window[at:]
    if at < 0 and len(window) >= len(_MARKER):
        return window[1 - len(_MARKER) :]
    return window


def normalise_usage(usage: dict[str, object]) -> dict[str, object]:
    """``usage`` with ``prompt_tokens``/``completion_tokens`` also set from ``input_tokens``/``output_tokens``."""
    if "input_tokens" in usage and "prompt_tokens" not in usage:
        usage["prompt_tokens"] = usage["input_tokens"]
    if "output_tokens" in usage and "completion_tokens" not in usage:
        usage["completion_tokens"] = usage["output_tokens"]
    return usage


_DECODER = json.JSONDecoder()


def parse_usage(tail: bytes, first: bool = False) -> dict[str, object] | None:
    """The last (or, with ``first``, the first) complete ``"usage": {...}`` object in ``tail``, if any."""
    at = tail.find(b'"usage"') if first else tail.rfind(b'"usage"')
    while at >= 0:
        start = tail.find(b"{", at)
        if start >= 0 and tail[at + 7 : start].strip(b" \t\r\n:") == b"":
            try:
                value, _ = _DECODER.raw_decode(tail[start:].decode("utf-8", "replace"))
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
        at = tail.find(b'"usage"', at + 7) if first else tail.rfind(b'"usage"', 0, at)
    return None


_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9]{1,64})"')


class ResponseIdSniffer:
    """Finds the response id (``resp_...``) near the start of a Responses API answer; the bytes are untouched."""

    __slots__ = ("_head", "found")
    LIMIT = 4096

    def __init__(self) -> None:
        self._head = b""
        self.found: str | None = None

    def feed(self, data: bytes) -> None:
        if self.found is not None or len(self._head) >= self.LIMIT:
            return
        self._head += data[: self.LIMIT - len(self._head)]
        match = _RESPONSE_ID.search(self._head)
        if match is not None:
            self.found = match.group(1).decode("ascii")
            self._head = b""


def sse_error_event(message: str, code: str, dialect: StreamDialect = OPENAI_STREAM) -> bytes:
    """
    One SSE event carrying an error, as the dialect's SDK reads it: OpenAI's
    ``data: {"error": ...}``, Anthropic's ``event: error`` with
    ``{"type": "error", "error": {...}}``, the Responses API's ``event: error``
    (with an ``error`` object too, so the OpenAI SDK raises).
    """
    error = {"message": message, "type": "upstream_error", "code": code}
    if dialect.name == "ollama":  # (an NDJSON line, as DMR's Ollama API ends a stream that failed)
        return json.dumps({"error": message}, separators=(",", ":")).encode() + b"\n"
    if dialect.name == "anthropic":
        payload = json.dumps({"type": "error", "error": {"type": "api_error", "message": message}}, separators=(",", ":"))
        return f"event: error\ndata: {payload}\n\n".encode()
    if dialect.name == "responses":
        document = {"type": "error", "code": code, "message": message, "param": None, "error": error}
        return f"event: error\ndata: {json.dumps(document, separators=(',', ':'))}\n\n".encode()
    return f"data: {json.dumps({'error': error}, separators=(',', ':'))}\n\n".encode()


_MESSAGES = {
    UPSTREAM_TRUNCATED: "the upstream closed the stream before it was complete",
    READ_TIMEOUT: "the upstream sent nothing for longer than proxy.read_timeout",
    REQUEST_TIMEOUT: "the request took longer than proxy.request_timeout",
}


class ResponseRelay(Protocol):
    """
    Owns the relaying of one upstream body into one client request: the
    producer registration (backpressure), the read timeout, and how the
    client's response ends.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        read_timeout: float,
        watch: StreamWatch | None,
        on_done: Callable[[str, int], None],
        endpoint: str,
        usage: UsageTail | None = None,
        sniffer: ResponseIdSniffer | None = None,
        on_first_byte: Callable[[], None] | None = None,
    ) -> None:
        self.request = request
        self._on_first_byte = on_first_byte
        self.sniffer = sniffer
        self._clock = clock
        self._read_timeout = read_timeout
        self.watch = watch
        self.usage = usage
        self._on_done = on_done
        self._endpoint = endpoint
        self.bytes = 0
        self._timer: IDelayedCall | None = None
        self._stopped: str | None = None
        self.client_gone = False
        self.first_byte_at: float | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        if self._read_timeout > 0:
            self._timer = self._clock.callLater(self._read_timeout, self.stop, READ_TIMEOUT)

    def dataReceived(self, data: bytes) -> None:
        if self.bytes == 0:
            self.first_byte_at = self._clock.seconds()
            if self._on_first_byte is not None:
                self._on_first_byte()
        self.bytes += len(data)
        if self._timer is not None:
            self._timer.reset(self._read_timeout)
        if self.watch is not None:
            self.watch.feed(data)
        if self.usage is not None:
            self.usage.feed(data)
        if self.sniffer is not None:
            self.sniffer.feed(data)
        if not self.client_gone:
            self.request.write(data)

    def stop(self, why: str) -> None:
        """Stop relaying: the client left, or a timeout fired."""
        if why == CLIENT_DISCONNECTED:
            self.client_gone = True  # even after a timeout stopped us: nothing may be written any more
        if self._stopped is not None:
            return
        self._stopped = why
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()  # deliverBody's transport is an IPushProducer

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.client_gone:
            self._on_done(self._stopped or CLIENT_DISCONNECTED, self.bytes)  # what stopped us first
            return
        request = self.request
        if request.channel is not None:
            request.unregisterProducer()
        clean = self._stopped is None and reason.check(ResponseDone, PotentialDataLoss) is not None
        watch = self.watch
        if clean and (watch is None or watch.complete):
            request.finish()
            self._on_done(OK, self.bytes)
            return
        outcome = self._stopped or UPSTREAM_TRUNCATED
        log.warn(
            "upstream {endpoint} stream ended early: {outcome} ({reason})",
            endpoint=self._endpoint,
            outcome=outcome,
            reason=reason.getErrorMessage(),
        )
        if watch is not None:
            request.write(watch.ending(_MESSAGES[outcome], outcome))
            request.finish()
        else:
            transport = request.transport
            if transport is not None:
                cast(ITCPTransport, transport).abortConnection()  # the client's TCP (or TLS) connection
        self._on_done(outcome, self.bytes)
