"""
Reading small response bodies for olladmr's own use (a 503 to inspect, a
model list), never on the relay path: capped, and cancellable (cancelling
stops the transport, so a body that never ends cannot hold a connection).
A leaf: used by the proxy and the health monitor alike.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse


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
            cast(IPushProducer, self.transport).stopProducing()  # deliverBody's transport is an IPushProducer
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


class Delivers(TypingProtocol):
    """Anything that delivers a body to a protocol: an ``IResponse``, or the proxy path's upstream response."""

    def deliverBody(self, protocol: IProtocol) -> None: ...


def read_body(response: IResponse | Delivers, limit: int) -> Deferred[bytes]:
    """Read a whole (small) response body, failing past ``limit`` bytes."""
    reader: _CappedReader

    def cancel(d: Deferred[bytes]) -> None:
        if reader.transport is not None:
            cast(IPushProducer, reader.transport).stopProducing()

    done: Deferred[bytes] = Deferred(cancel)
    reader = _CappedReader(done, limit)
    response.deliverBody(reader)
    return done
