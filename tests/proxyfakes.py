"""
In-memory fakes of the proxy's two sides, shared by the unit tests of
:mod:`olladmr.proxy.exchange` and :mod:`olladmr.proxy.relay` (not a test
module itself).

Client side: :class:`FakeRequest` and its :class:`FakeClientTransport`.
Upstream side: :class:`FakeUpstreamTransport` (the response's push
producer), :func:`connection_lost` (a mid-body drop).  SSE:
:func:`sse_event` decodes one event.
"""

from __future__ import annotations

import io
import json
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from zope.interface import implementer

CHAT_PATH = b"/engines/v1/chat/completions"
"""The ``uri`` a :class:`FakeRequest` asks for unless told otherwise."""

CLIENT_IP = "192.0.2.7"
"""The address :meth:`FakeRequest.getClientAddress` reports."""


class FakeClientTransport:
    """The client connection under a request: records ``abortConnection`` and ``loseConnection``."""

    def __init__(self) -> None:
        self.aborted = 0
        self.lost = 0

    def abortConnection(self) -> None:
        self.aborted += 1

    def loseConnection(self) -> None:
        self.lost += 1


class FakeRequest:
    """
    A hand-written stand-in for ``twisted.web.server.Request`` (DummyRequest
    pulls on producers in a loop and has no channel, transport or content).

    It implements exactly what the exchange, the relay and ``write_error``
    use -- ``notifyFinish``, ``setResponseCode``, ``responseHeaders``,
    ``write``, ``finish``, ``finished``, ``registerProducer`` /
    ``unregisterProducer``, ``getClientAddress``, ``isSecure``,
    ``requestHeaders``, ``content``, ``uri``, ``channel``, ``transport``,
    ``defaultContentType`` -- with Twisted's rules for misuse: ``write``
    after ``finish`` raises, ``finish`` after the connection was lost raises,
    writes after the connection was lost are dropped (kept in ``dropped``),
    and registering a second producer raises.  :meth:`lose_client` is
    ``Request.connectionLost``: channel gone, content closed, every
    ``notifyFinish`` Deferred errbacked.
    """

    def __init__(
        self,
        body: bytes = b"",
        uri: bytes = CHAT_PATH,
        headers: dict[bytes, list[bytes]] | None = None,
        secure: bool = False,
    ) -> None:
        self.uri = uri
        self.requestHeaders = Headers(headers or {})
        self.responseHeaders = Headers()
        self.content = io.BytesIO(body)
        self.channel: object | None = object()
        self.transport = FakeClientTransport()
        self.defaultContentType: bytes | None = b"text/html"
        self.code = 200
        self.code_message: bytes | None = None
        self.written: list[bytes] = []
        self.dropped: list[bytes] = []
        self.finished = False
        self.finish_calls = 0
        self.producer: object | None = None
        self.streaming: bool | None = None
        self.unregistered = 0
        self._notifications: list[Deferred[None]] = []
        self._disconnected = False
        self._secure = secure

    # -- what the proxy uses

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", CLIENT_IP, 51000)

    def isSecure(self) -> bool:
        return self._secure

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._notifications.append(d)
        return d

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        assert not self.written, "status set after the body started"
        self.code = code
        self.code_message = message

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        if self.finished:
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        if self._disconnected:
            self.dropped.append(data)
            return
        self.written.append(data)

    def finish(self) -> None:
        self.finish_calls += 1
        if self._disconnected:
            raise RuntimeError("Request.finish called on a request after its connection was lost")
        assert not self.finished, "finish called twice"
        self.finished = True
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.callback(None)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        if self.producer is not None:
            raise ValueError("a producer is already registered")
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self) -> None:
        assert self.channel is not None, "unregisterProducer on a request whose channel is gone"
        self.producer = None
        self.unregistered += 1

    # -- what the tests use

    def lose_client(self, reason: Exception | None = None) -> None:
        """The client's connection is lost (``Request.connectionLost``)."""
        self._disconnected = True
        self.channel = None
        self.content.close()
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.errback(Failure(reason or ConnectionDone("client went away")))

    @property
    def body(self) -> bytes:
        return b"".join(self.written)

    def header(self, name: bytes) -> bytes | None:
        values = self.responseHeaders.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@implementer(IPushProducer)
class FakeUpstreamTransport:
    """The upstream response's transport (a push producer): records every producer call, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pauseProducing")

    def resumeProducing(self) -> None:
        self.calls.append("resumeProducing")

    def stopProducing(self) -> None:
        self.calls.append("stopProducing")


def connection_lost() -> ResponseFailed:
    """What Twisted's client reports when the upstream connection drops mid-body."""
    return ResponseFailed([Failure(ConnectionLost("upstream went away"))])


def sse_event(payload: bytes) -> dict[str, Any]:
    """The JSON of one ``data: ...`` SSE event."""
    assert payload.startswith(b"data: ") and payload.endswith(b"\n\n"), payload
    return cast(dict[str, Any], json.loads(payload[len(b"data: ") : -2]))

