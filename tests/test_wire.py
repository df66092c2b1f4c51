"""``olladmr.proxy.wire``: the proxy path's upstream connections, driven on an in-memory transport."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from olladmr.proxy.wire import MAX_RESPONSE_HEAD, ConnectionPool, UpstreamConnection, canonical_name, request_head


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.reason = reason


def connected() -> tuple[UpstreamConnection, StringTransport, ConnectionPool, Clock]:
    clock = Clock()
    pool = ConnectionPool(clock, 4, 60.0)
    connection = UpstreamConnection(pool, "k")
    transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport, pool, clock


def answered(connection: UpstreamConnection, wire: bytes, head_only: bool = False) -> tuple[list[Any], Body]:
    got: list[Any] = []
    connection.send(b"GET / HTTP/1.1\r\n\r\n", None, head_only).addBoth(got.append)
    body = Body()
    connection.dataReceived(wire)
    if got and not isinstance(got[0], Failure):
        got[0].deliverBody(body)
    return got, body


def test_request_head_puts_host_first_canonicalises_names_and_adds_the_length() -> None:
    head = request_head(b"POST", b"/v1/x?a=1", b"h:1", [(b"content-type", b"a/b"), (b"host", b"evil"), (b"x-a", b"1")], 5)
    assert head == b"POST /v1/x?a=1 HTTP/1.1\r\nHost: h:1\r\nContent-Type: a/b\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n"
    assert canonical_name(b"x-olla-request-id") == b"X-Olla-Request-Id"
    with pytest.raises(ValueError):
        request_head(b"GET", b"/", b"h", [(b"x", b"a\r\nInjected: 1")], None)


def test_a_keep_alive_answer_goes_back_to_the_pool_and_framing_headers_become_length() -> None:
    connection, transport, pool, _ = connected()
    got, body = answered(connection, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello")
    [response] = got
    assert (response.code, response.phrase, response.length) == (200, b"OK", 5)
    assert response.headers.getRawHeaders(b"content-length") is None  # framing is the length, as with Agent
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain"]
    assert body.data == b"hello" and body.reason is not None and body.reason.check(ResponseDone)
    assert pool.take("k") is connection and not transport.disconnecting


def test_the_response_keeps_its_header_lines_as_sent_and_counts_their_size() -> None:
    """pairs: end-to-end lines in order and spelling (framing out); head_size: their names and values, as the limit reads."""
    connection, _, _, _ = connected()
    got, _ = answered(
        connection,
        b"HTTP/1.1 200 OK\r\nX-Mixed: a\r\nContent-Length: 2\r\nx-mixed: b\r\n\r\nok",
    )
    [response] = got
    assert response.pairs == [(b"X-Mixed", b"a"), (b"x-mixed", b"b")]
    assert response.head_size == len(b"X-Mixed") + 1 + len(b"x-mixed") + 1
    assert response.header(b"x-mixed") == b"a" and response.header(b"content-length") is None
    assert response.headers.getRawHeaders(b"x-mixed") == [b"a", b"b"]


def test_chunked_bodies_are_decoded_and_an_interim_100_is_skipped() -> None:
    connection, _, pool, _ = connected()
    got, body = answered(
        connection,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    assert got[0].code == 200 and got[0].length is UNKNOWN_LENGTH
    assert body.data == b"abcde" and body.reason.check(ResponseDone)
    assert pool.take("k") is connection


def test_a_body_read_until_close_ends_as_potential_data_loss_and_is_not_reused() -> None:
    connection, transport, pool, _ = connected()
    got, body = answered(connection, b"HTTP/1.0 200 OK\r\n\r\npart")
    assert got[0].length is UNKNOWN_LENGTH and body.data == b"part" and body.reason is None
    connection.connectionLost(Failure(ConnectionError("closed")))
    assert body.reason.check(PotentialDataLoss) and pool.take("k") is None


def test_a_head_answer_ends_at_its_headers_and_the_connection_is_closed() -> None:
    connection, transport, pool, _ = connected()
    got, body = answered(connection, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", head_only=True)
    assert got[0].length == 99 and body.data == b"" and body.reason.check(ResponseDone)
    assert transport.disconnecting and pool.take("k") is None


def test_a_cut_body_fails_and_headers_that_never_end_are_a_bad_response() -> None:
    connection, _, _, _ = connected()
    got, body = answered(connection, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    connection.connectionLost(Failure(ConnectionError("reset")))
    assert body.data == b"abc" and body.reason.check(ResponseFailed)
    connection, transport, _, _ = connected()
    got, _ = answered(connection, b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_RESPONSE_HEAD + 10))
    assert got == [] and transport.disconnecting  # dropped before any response
    connection.connectionLost(Failure(ConnectionError("aborted")))
    assert got[0].check(ResponseNeverReceived) and "larger than" in str(got[0].value.reasons[0].value)


@pytest.mark.parametrize("line", [
    b"X-A: a\x00b", b"X-A: a\rb", b"X-A: a\nX-B: c", b"X-A: a\r\n folded", b"X A: a", b"X-A: a\x01b", b"X-A: a\x7fb",
])
def test_a_header_line_that_could_smuggle_a_line_break_is_never_a_response(line: bytes) -> None:
    """The passthrough writes upstream header lines as parsed: llhttp (strict) must refuse CR, LF, NUL and controls."""
    connection, transport, _, _ = connected()
    got, _ = answered(connection, b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")
    connection.connectionLost(Failure(ConnectionError("aborted")))
    assert len(got) == 1 and isinstance(got[0], Failure) and transport.disconnecting


def test_bytes_on_an_idle_connection_or_after_the_answer_drop_it() -> None:
    connection, transport, pool, _ = connected()
    got, body = answered(connection, b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
    assert got[0].code == 204 and body.reason.check(ResponseDone)
    connection.connectionLost(Failure(ConnectionError("aborted")))
    assert pool.take("k") is None  # the unsolicited second answer aborted it; lost connections leave the pool
    idle, _, pool, _ = connected()
    idle.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    idle.connectionLost(Failure(ConnectionError("aborted")))
    assert pool.take("k") is None


def test_stopping_the_body_abandons_the_connection() -> None:
    connection, transport, pool, _ = connected()
    got, body = answered(connection, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    body.transport.pauseProducing()
    assert transport.producerState == "paused"
    body.transport.stopProducing()
    connection.connectionLost(Failure(ConnectionError("aborted")))
    assert body.reason.check(ResponseFailed) and pool.take("k") is None


def test_idle_connections_expire_and_the_pool_keeps_at_most_max_idle() -> None:
    clock = Clock()
    pool = ConnectionPool(clock, 1, 10.0)
    first, second = UpstreamConnection(pool, "k"), UpstreamConnection(pool, "k")
    for connection in (first, second):
        connection.makeConnection(StringTransport())
        pool.release(connection)
    assert second.transport.disconnecting  # over max_idle: closed at once
    clock.advance(11)
    assert first.transport.disconnecting and pool.take("k") is None


def test_trailer_fields_of_an_upstream_answer_are_dropped() -> None:
    """Trailers after a chunked body are not kept (llhttp has no cap on them; Agent drops them too)."""
    connection, _, pool, _ = connected()
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(2000))
    got, body = answered(connection, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + trailers + b"\r\n")
    assert body.data == b"ok" and body.reason.check(ResponseDone)
    assert connection._headers == [] and got[0].headers.getRawHeaders(b"x-t1") is None


def test_an_answer_before_the_whole_body_went_up_stops_and_unregisters_the_producer() -> None:
    """An upstream that answers (413, say) while a spooled body is still being sent: the producer is stopped
    and unregistered, so the transport can close, and the connection is not reused."""
    import io

    from twisted.web.client import FileBodyProducer

    connection, transport, pool, clock = connected()
    producer = FileBodyProducer(io.BytesIO(b"x" * 10_000_000), cooperator=_NeverRun())
    got: list[Any] = []
    connection.send(b"POST / HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n", producer, False).addBoth(got.append)
    assert transport.producer is producer
    body = Body()
    connection.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    got[0].deliverBody(body)
    assert got[0].code == 413 and body.reason.check(ResponseDone)
    assert transport.producer is None and transport.disconnecting and pool.take("k") is None


class _NeverRun:
    """A cooperator whose tasks never run (the body stays unsent), with the stop Twisted's producer needs."""

    def cooperate(self, iterator: Any) -> Any:
        from twisted.internet.defer import Deferred

        class Task:
            def __init__(self) -> None:
                self.done: Deferred[None] = Deferred()

            def whenDone(self) -> Deferred[None]:
                return self.done

            def stop(self) -> None:
                pass

            def pause(self) -> None:
                pass

            def resume(self) -> None:
                pass

        return Task()
