"""``olladmr.sending.SendQueue``: when a turn's writes leave, and in what order, on real TCP connections."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from olladmr.sending import SendQueue



class Sink(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


async def connected_pair() -> tuple[Any, Sink, Any]:
    sink = Sink()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: sink), interface="127.0.0.1")  # type: ignore[attr-defined]
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(Protocol))
    return client.transport, sink, port


@pytest_twisted.ensureDeferred
async def test_the_first_write_of_a_turn_leaves_at_once_the_rest_together_at_its_end() -> None:
    clock = Clock()
    sends = SendQueue(clock)
    transport, sink, port = await connected_pair()
    try:
        sends.write(transport, b"first ")
        await eventually(lambda: sink.received == b"first ", what="the turn's first write, sent at once")
        sends.write(transport, b"second ")
        sends.write(transport, b"third")
        assert transport._tempDataBuffer == [] and transport.dataBuffer == b""  # held by the queue, not Twisted
        assert [call.getTime() for call in clock.getDelayedCalls()] == [0.0]
        clock.advance(0)  # the end of the turn
        await eventually(lambda: sink.received == b"first second third", what="the rest, in order")
        assert clock.getDelayedCalls() == []
        sends.write(transport, b" next turn")  # a new turn: first write at once again
        await eventually(lambda: sink.received.endswith(b" next turn"), what="the next turn's first write")
    finally:
        transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_flush_one_sends_a_connections_waiting_bytes_before_it_is_closed() -> None:
    clock = Clock()
    sends = SendQueue(clock)
    transport, sink, port = await connected_pair()
    try:
        sends.write(transport, b"a")
        sends.write(transport, b"b")
        sends.flush_one(transport)
        transport.loseConnection()
        await eventually(lambda: sink.received == b"ab", what="the waiting bytes, before the close")
        clock.advance(0)  # nothing left for the turn's end
        assert sink.received == b"ab"
    finally:
        await port.stopListening()


def test_other_transports_are_written_the_ordinary_way_at_once() -> None:
    clock = Clock()
    sends = SendQueue(clock)
    transport = StringTransport()
    sends.write(transport, b"x")
    sends.write(transport, b"")
    assert transport.value() == b"x" and clock.getDelayedCalls() == []
