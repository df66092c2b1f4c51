"""
Relaying an upstream response body to the client, chunk by chunk.

:class:`ResponseRelay` is the ``IProtocol`` given to
``IResponse.deliverBody``.  It registers the upstream transport as the
client request's push producer, so a client that stops reading pauses the
upstream socket (TCP backpressure end to end), and it writes every chunk
the moment it arrives (no coalescing, no timer).  It ends the client's
response honestly: a clean finish only when the upstream finished cleanly;
otherwise an in-band SSE error event for event streams, or an aborted
connection for everything else -- never a synthesised ``[DONE]``.
"""

from __future__ import annotations

import json
from typing import Callable, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request

from .record import CLIENT_DISCONNECTED, OK, READ_TIMEOUT, REQUEST_TIMEOUT, UPSTREAM_TRUNCATED

log = Logger()


class StreamWatch:
    """
    Watches a copy of an SSE stream for how it ends: ``[DONE]``, a non-null
    ``finish_reason`` or an in-band error event.  Bytes are never changed.
    """

    __slots__ = ("done", "finished", "error", "_tail")

    def __init__(self) -> None:
        self.done = False
        self.finished = False
        self.error = False
        self._tail = b""

    def feed(self, data: bytes) -> None:
        window = self._tail + data
        if not self.done and b"data: [DONE]" in window:
            self.done = True
        if not self.finished and (b'"finish_reason":"' in window or b'"finish_reason": "' in window):
            self.finished = True
        if not self.error and (b'data: {"error"' in window or b'data:{"error"' in window):
            self.error = True
        self._tail = window[-32:]

    @property
    def complete(self) -> bool:
        """The upstream said the answer is over (or failed in-band)."""
        return self.done or self.finished or self.error

    @property
    def at_event_boundary(self) -> bool:
        return self._tail == b"" or self._tail.endswith(b"\n\n") or self._tail.endswith(b"\r\n\r\n")


class UsageTail:
    """
    Keeps the last few KB of a response body to read the upstream's
    ``usage`` object from at the end (the final SSE chunk or the JSON
    body); the relayed bytes are untouched.
    """

    __slots__ = ("_tail",)
    SIZE = 2048  # the final usage chunk (llama.cpp: usage + timings) fits; kept small per stream

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> None:
        tail = self._tail + data if len(data) < self.SIZE else data
        self._tail = tail[-self.SIZE :] if len(tail) > self.SIZE else tail

    def usage(self) -> dict[str, object] | None:
        return parse_usage(self._tail)


_DECODER = json.JSONDecoder()


def parse_usage(tail: bytes) -> dict[str, object] | None:
    """The last complete ``"usage": {...}`` object in ``tail``, if any."""
    at = tail.rfind(b'"usage"')
    while at >= 0:
        start = tail.find(b"{", at)
        if start >= 0 and tail[at + 7 : start].strip(b" \t\r\n:") == b"":
            try:
                value, _ = _DECODER.raw_decode(tail[start:].decode("utf-8", "replace"))
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
        at = tail.rfind(b'"usage"', 0, at)
    return None


def sse_error_event(message: str, code: str) -> bytes:
    """One SSE event carrying an OpenAI-shaped error."""
    payload = json.dumps(
        {"error": {"message": message, "type": "upstream_error", "code": code}}, separators=(",", ":")
    )
    return f"data: {payload}\n\n".encode()


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
    ) -> None:
        self.request = request
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
        self.bytes += len(data)
        if self._timer is not None:
            self._timer.reset(self._read_timeout)
        if self.watch is not None:
            self.watch.feed(data)
        if self.usage is not None:
            self.usage.feed(data)
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
            prefix = b"" if watch.at_event_boundary else b"\n\n"
            request.write(prefix + sse_error_event(_MESSAGES[outcome], outcome))
            request.finish()
        else:
            transport = request.transport
            if transport is not None:
                cast(ITCPTransport, transport).abortConnection()  # the client's TCP (or TLS) connection
        self._on_done(outcome, self.bytes)
