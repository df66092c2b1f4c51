"""Request limits on a real socket: header size (431), slow clients (408), early 413, idle connections."""

from __future__ import annotations

import json

import pytest_twisted
from conftest import config_for, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol


class Raw(Protocol):
    """Writes what it is told, collects everything, fires ``closed`` with it."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(self.data)


async def raw(daemon, first: bytes) -> Raw:
    proto = Raw()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), proto)
    proto.transport.write(first)
    return proto


def status_and_error(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


@pytest_twisted.ensureDeferred
async def test_header_block_over_limit_gets_431(daemon_factory, fake):
    """Headers larger than max_header_size are answered 431 with an OpenAI-shaped error, then closed."""
    daemon = await daemon_factory(config_for(fake, server={"request_limits": {"max_header_size": "8KB"}}))
    request = b"GET /internal/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n"
    proto = await raw(daemon, request)
    data = await within(proto.closed, 5, "the connection to close")
    assert data.count(b"HTTP/1.1") == 1  # nothing after the rejection is parsed
    status, error = status_and_error(data)
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    response, _ = await daemon.request("GET", "/internal/health", headers={"x-ok": "a" * 4000})
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_dribbling_headers_are_cut_off_with_408(daemon_factory, fake):
    """A client that never finishes its headers within read_header_timeout gets 408 and is disconnected."""
    daemon = await daemon_factory(config_for(fake, server={"read_header_timeout": "300ms"}))
    proto = await raw(daemon, b"POST /olla/dmr/engines/v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    status, error = status_and_error(await within(proto.closed, 5, "the slow client to be cut off"))
    assert status == 408 and "read_header_timeout" in error["message"]


@pytest_twisted.ensureDeferred
async def test_slow_body_is_cut_off_with_408(daemon_factory, fake):
    """A body that does not arrive within server.read_timeout gets 408; nothing reaches the upstream."""
    daemon = await daemon_factory(config_for(fake, server={"read_timeout": "300ms"}))
    proto = await raw(
        daemon,
        b"POST /olla/dmr/engines/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo",
    )
    status, error = status_and_error(await within(proto.closed, 5, "the slow body to be cut off"))
    assert status == 408 and "read_timeout" in error["message"]
    assert fake.inference_requests == []


@pytest_twisted.ensureDeferred
async def test_huge_declared_body_is_refused_before_it_is_read(daemon_factory, fake):
    """A Content-Length over max_body_size gets 413 at once, without waiting for (or storing) the body."""
    daemon = await daemon_factory(config_for(fake, server={"request_limits": {"max_body_size": "1MB"}}))
    proto = await raw(
        daemon,
        b"POST /olla/dmr/engines/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n{",
    )
    await within(_until(lambda: b"\r\n\r\n" in proto.data), 5, "the 413 answer")
    status, error = status_and_error(proto.data)
    assert status == 413 and error["code"] == "request_too_large"
    proto.transport.loseConnection()
    await within(proto.closed, 5, "close")


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_limit_stops_reading(daemon_factory, fake):
    """A chunked body that grows past max_body_size is answered 413 while it is still arriving."""
    daemon = await daemon_factory(config_for(fake, server={"request_limits": {"max_body_size": "4KB"}}))
    proto = await raw(
        daemon,
        b"POST /olla/dmr/engines/v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n",
    )
    await within(_until(lambda: b"\r\n\r\n" in proto.data), 5, "the 413 answer")
    assert status_and_error(proto.data)[0] == 413
    proto.transport.loseConnection()
    await within(proto.closed, 5, "close")


def _until(predicate) -> Deferred[None]:
    from conftest import eventually

    return Deferred.fromCoroutine(eventually(predicate, 5))


@pytest_twisted.ensureDeferred
async def test_headers_over_twisteds_own_cap_but_within_the_limit_are_served(daemon_factory, fake):
    """Twisted's built-in 16 KB header cap never answers first: 40 KB of headers pass under the default 512 KB limit."""
    daemon = await daemon_factory(config_for(fake))
    response, _ = await daemon.request("GET", "/internal/health", headers={"x-big": "a" * 40000})
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_default_header_limit_answers_431_json(daemon_factory, fake):
    """Past the default max_header_size the answer is olladmr's 431 JSON, not a bare 400."""
    daemon = await daemon_factory(config_for(fake))
    proto = await raw(daemon, b"GET /internal/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (600 * 1024) + b"\r\n\r\n")
    status, error = status_and_error(await within(proto.closed, 5, "the connection to close"))
    assert status == 431 and error["code"] == "request_header_fields_too_large"
