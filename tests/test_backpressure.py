"""Backpressure end to end: a client that stops reading pauses the upstream, and memory stays bounded."""

from __future__ import annotations

import json

import pytest_twisted
from conftest import config_for, eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

BODY_SIZE = 50 * 1024 * 1024


class SlowClient(Protocol):
    """Sends one request, then reads nothing until told to; counts what it got."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = 0
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_non_reading_client_pauses_upstream_and_bounds_memory(daemon_factory, fake):
    """With a 50 MB upstream body and a client that reads nothing, the fake gets paused and the proxy holds little."""
    daemon = await daemon_factory(config_for(fake))
    fake.big_body = BODY_SIZE
    body = json.dumps({"model": "ai/smollm2", "messages": [{"role": "user", "content": "big"}]}).encode()
    request = (
        b"POST /olla/dmr/engines/v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    client = SlowClient(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), client)
    await eventually(lambda: fake.producer_paused, 10, "the fake DMR to be paused by backpressure")
    # Let the pipeline settle: produced bytes stop moving (backpressure) or reach the end (none).
    history: list[int] = []

    def settled() -> bool:
        history.append(fake.bytes_produced)
        return history[-1] == BODY_SIZE or (len(history) > 30 and history[-30] == history[-1])

    await eventually(settled, 20, "the upstream to settle")
    produced = fake.bytes_produced
    assert produced < BODY_SIZE * 0.6, produced  # kernel socket buffers hold some; the rest waits upstream
    (exchange,) = daemon.parts.inflight
    transport = exchange.request.channel.transport
    buffered = len(transport.dataBuffer) + transport._tempDataLen
    print(f"backpressure: upstream produced {produced} of {BODY_SIZE} bytes; olladmr holds {buffered} bytes")
    assert buffered < 2 * 1024 * 1024, buffered  # what olladmr itself holds in memory for this client
    client.transport.resumeProducing()
    await eventually(lambda: client.closed.called, 30, "the whole body to arrive")
    assert client.received >= BODY_SIZE
    assert fake.bytes_produced == BODY_SIZE
