"""Unit tests for ``olladmr.edge.site``: the channel's limits on a ``Clock`` and an in-memory transport."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from olladmr.config import parse_config
from olladmr.edge.channel import EdgeLimits, OllaChannel
from olladmr.edge.site import OllaSite
from olladmr.proxy.headers import ResponseHeaders


class Echo(Resource):
    """Answers every request with its method and body length, recording the requests it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, int]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.seen.append((request.method, len(body)))
        return b"ok"


def channel_for(resource: Resource, **server: Any) -> tuple[OllaChannel, StringTransport, Clock]:
    config = parse_config({"server": server, "endpoints": [{"url": "http://a:1"}]}, "t")
    clock = Clock()
    site = OllaSite(resource, clock, EdgeLimits(config.server))
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    assert isinstance(channel, OllaChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


def connect(**server: Any) -> tuple[OllaChannel, StringTransport, Clock, Echo]:
    channel, transport, clock = channel_for(resource := Echo(), **server)
    return channel, transport, clock, resource


def answer(transport: StringTransport) -> tuple[int, dict[str, Any]]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def test_headers_that_do_not_arrive_in_time_get_408() -> None:
    """read_header_timeout runs from the first byte of a request: after it, 408 JSON and a half-closed connection."""
    channel, transport, clock, resource = connect(read_header_timeout="2s")
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
    clock.advance(1.9)
    assert transport.value() == b""
    clock.advance(0.2)
    status, error = answer(transport)
    assert status == 408 and error["code"] == "request_timeout" and "read_header_timeout" in error["message"]
    assert resource.seen == []


def test_a_body_that_does_not_arrive_in_time_gets_408() -> None:
    """read_timeout bounds the body once the headers are in; a complete body in time is served."""
    channel, transport, clock, resource = connect(read_timeout="3s")
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    clock.advance(2.9)
    assert transport.value() == b""
    clock.advance(0.2)
    status, error = answer(transport)
    assert status == 408 and "read_timeout" in error["message"] and resource.seen == []


def test_a_body_in_time_is_served_and_leaves_no_timer() -> None:
    """A request that arrives whole within the timeouts is served and cancels both of its timers."""
    channel, transport, clock, resource = connect(read_timeout="3s", read_header_timeout="2s", idle_timeout=0)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n12345")
    assert resource.seen == [(b"POST", 5)] and transport.value().startswith(b"HTTP/1.1 200")
    assert clock.getDelayedCalls() == []


def test_a_whole_request_arms_no_timer_and_a_pipelined_partial_one_gets_its_clock() -> None:
    """
    A request that arrives whole never starts the header clock; the part of a
    pipelined request received with it gets one once the first is answered.
    """
    channel, transport, clock, resource = connect(read_header_timeout="2s", idle_timeout=0)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n")
    assert resource.seen == [(b"GET", 0)]
    assert [c.getTime() for c in clock.getDelayedCalls()] == [2.0]  # the second request's header clock
    clock.advance(2.1)
    assert b"HTTP/1.1 408" in transport.value() and resource.seen == [(b"GET", 0)]


def test_header_block_over_the_limit_gets_431_even_in_one_line() -> None:
    """A header line longer than max_header_size (LineReceiver's own cap would just close) is answered 431 JSON."""
    channel, transport, clock, _ = connect(request_limits={"max_header_size": "8KB"})
    channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000)
    status, error = answer(transport)
    assert status == 431 and error["code"] == "request_header_fields_too_large"


def test_headers_past_twisteds_16kb_but_within_the_limit_are_served() -> None:
    """Twisted's 16 KB totalHeadersSize never answers first: 30 KB of headers under a 64 KB limit are served."""
    channel, transport, _, resource = connect(request_limits={"max_header_size": "64KB"})
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(30))
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    assert resource.seen == [(b"GET", 0)] and transport.value().startswith(b"HTTP/1.1 200")


def test_content_length_over_the_body_limit_gets_413_before_the_body() -> None:
    """A declared body over max_body_size is refused at once, without reading it."""
    channel, transport, _, resource = connect(request_limits={"max_body_size": "1KB"})
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    status, error = answer(transport)
    assert status == 413 and error["code"] == "request_too_large" and resource.seen == []


def test_a_rejected_connection_is_aborted_after_lingering() -> None:
    """After a rejection the connection half-closes and is aborted LINGER seconds later."""
    channel, transport, clock, _ = connect(read_header_timeout="1s")
    transport.connected = True
    aborted: list[bool] = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(1)
    assert transport.value().startswith(b"HTTP/1.1 408")
    clock.advance(OllaChannel.LINGER - 0.1)
    assert aborted == []
    clock.advance(0.2)
    assert aborted == [True]


def test_request_ids_are_unique_and_honour_a_valid_client_id() -> None:
    """Each request gets a fresh X-Olla-Request-ID unless the client sent a printable X-Request-ID of at most 128 bytes."""
    channel, transport, _, _ = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc-1\r\n\r\n")
    ids = [line.split(b": ", 1)[1] for line in transport.value().split(b"\r\n") if line.lower().startswith(b"x-olla-request-id")]
    assert len(ids) == 2 and ids[1] == b"abc-1" and ids[0] != b"abc-1" and b"-" in ids[0]


class Later(Resource):
    """Holds every request open until the test answers it, recording method, path and body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Any] = []
        self.seen: list[tuple[bytes, bytes, bytes]] = []

    def render(self, request: Any) -> int:
        self.seen.append((request.method, request.path, request.content.read()))
        self.open.append(request)
        return NOT_DONE_YET

    def answer(self) -> None:
        request = self.open.pop(0)
        request.write(b"done " + request.path)
        request.finish()


def connect_later(**server: Any) -> tuple[OllaChannel, StringTransport, Later]:
    channel, transport, _ = channel_for(resource := Later(), **server)
    return channel, transport, resource


def test_pipelined_requests_wait_their_turn_and_are_answered_in_order() -> None:
    """Requests sent together are served one at a time, bodies intact, and answered in the order they came."""
    channel, transport, later = connect_later()
    channel.dataReceived(
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert later.seen == [(b"POST", b"/one", b"abc")]  # the others wait for it
    later.answer()
    assert later.seen[1:] == [(b"POST", b"/two", b"de")]
    later.answer()
    later.answer()
    assert [p for _, p, _ in later.seen] == [b"/one", b"/two", b"/three"]
    wire = transport.value()
    assert wire.index(b"done /one") < wire.index(b"done /two") < wire.index(b"done /three")


HOLD = 16 * 1024  # bytes of pipelined requests Twisted buffers before it stops reading


def test_reading_pauses_while_a_large_pipelined_body_waits() -> None:
    """More than HOLD bytes of a waiting request stop the reading until the request before it is answered."""
    channel, transport, later = connect_later()
    channel.dataReceived(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
    size = HOLD + 10_000
    channel.dataReceived(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    channel.dataReceived(b"x" * (size - 100))
    assert transport.producerState == "paused" and len(later.seen) == 1
    later.answer()
    assert transport.producerState == "producing"
    channel.dataReceived(b"x" * 100)
    assert later.seen[1][:2] == (b"POST", b"/big") and len(later.seen[1][2]) == size


def test_an_upgrade_request_keeps_its_body_and_the_connection_stays_http() -> None:
    """``Upgrade: h2c`` (curl --http2 on http://) is ignored: the body is read and later requests are plain HTTP."""
    channel, transport, later = connect_later()
    channel.dataReceived(
        b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 5\r\n\r\n123"
    )
    channel.dataReceived(b"45GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert later.seen == [(b"POST", b"/up", b"12345")]
    later.answer()
    assert later.seen[1] == (b"GET", b"/after", b"")


def test_any_token_method_is_parsed_and_versions_past_1_1_are_refused() -> None:
    """Any token is a method and reaches the resource; HTTP/2.0 in a request line is a JSON 400."""
    channel, transport, later = connect_later()
    channel.dataReceived(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    assert later.seen == [(b"BREW", b"/pot", b"")]
    channel, transport, clock, _ = connect()
    channel.dataReceived(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")
    status, error = answer(transport)
    assert status == 400 and "HTTP/2.0" in error["message"]


class FirstLater(Later):
    """Holds the first request open; answers every later one at once (as a local route does)."""

    def render(self, request: Any) -> Any:
        if not self.seen:
            return super().render(request)
        self.seen.append((request.method, request.path, request.content.read()))
        return b"now"


def test_many_bodiless_pipelined_requests_pause_the_reading_too() -> None:
    """Waiting heads count against HOLD like bodies do: a flood of GETs cannot grow memory without bound."""
    channel, transport, later = connect_later()
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b"GET /q HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 2000 + b"\r\n\r\n"
    for _ in range(HOLD // len(head) + 2):
        channel.dataReceived(head)
    assert transport.producerState == "paused" and len(later.seen) == 1


def test_a_long_pipeline_answered_at_once_does_not_recurse() -> None:
    """Hundreds of pipelined requests behind a slow one, each answered at once: all served, in order, no RecursionError."""
    resource = FirstLater()
    channel, transport, _ = channel_for(resource)
    channel.dataReceived(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n" * 400)
    assert len(resource.seen) == 1
    resource.answer()
    assert len(resource.seen) == 401 and transport.value().count(b"HTTP/1.1 200") == 401


def test_a_slow_pipelined_head_never_gets_a_408_inside_the_answer_before_it() -> None:
    """The header clock of a request behind one still being answered starts when its turn comes."""
    channel, transport, clock = channel_for(later := Later(), read_header_timeout="2s")
    channel.dataReceived(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHo")
    clock.advance(5)
    assert b"408" not in transport.value()  # the first answer is still being written
    later.answer()
    assert b"408" not in transport.value()
    clock.advance(2.1)
    wire = transport.value()
    assert wire.index(b"done /stream") < wire.index(b"HTTP/1.1 408")


def test_expect_100_continue_is_not_sent_after_a_413() -> None:
    channel, transport, _, _ = connect(request_limits={"max_body_size": "1KB"})
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413") and b"100 Continue" not in transport.value()
    channel, transport, _, resource = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"ok")
    assert resource.seen == [(b"POST", 2)]


def test_trailer_fields_never_become_request_headers() -> None:
    """A chunked body's trailers are dropped, pipelined or not (they would let a client smuggle headers past checks)."""
    seen: list[Any] = []

    class Headers_(Later):
        def render(self, request: Any) -> Any:
            seen.append(request.requestHeaders.getRawHeaders(b"authorization"))
            return super().render(request)

    channel, transport, clock = channel_for(resource := Headers_())
    chunked = (b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nab\r\n0\r\nAuthorization: Bearer smuggled\r\n\r\n")
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + chunked)
    resource.answer()
    channel.dataReceived(chunked)
    resource.answer()
    assert seen == [None, None, None] and resource.seen[1] == (b"POST", b"/c", b"ab")


def test_a_broken_body_behind_a_slow_request_gets_its_400_after_it() -> None:
    channel, transport, later = connect_later()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert b"400" not in transport.value()
    later.answer()
    wire = transport.value()
    assert wire.index(b"done /a") < wire.index(b"HTTP/1.1 400") and len(later.seen) == 1


def test_transfer_codings_other_than_chunked_are_refused() -> None:
    channel, transport, _, resource = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    status, error = answer(transport)
    assert status == 400 and "Transfer-Encoding" in error["message"] and resource.seen == []


class _Upstreamish(Resource):
    """Answers as the proxy does: upstream header lines passed through, olladmr's own headers set over them."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        headers = request.responseHeaders
        assert isinstance(headers, ResponseHeaders)
        headers.setRawHeaders(b"vary", [b"Origin"])  # as the gate sets for CORS, before the upstream answers
        headers.take_upstream([
            (b"Content-Type", b"application/json"),
            (b"X-Mixed-Case", b"kept as sent"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"X-Private", b"hop-by-hop: named by Connection"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Set-Cookie", b"s=1"),
            (b"X-Olla-Endpoint", b"spoof"),
            (b"Date", b"Tue, 01 Dec 2026 00:00:00 GMT"),
            (b"Vary", b"Accept-Encoding"),
            (b"X-Twice", b"1"),
            (b"X-Twice", b"2"),
            (b"Cache-Control", b"max-age=60"),
        ])
        headers.setRawHeaders(b"x-olla-endpoint", [b"a"])
        headers.setRawHeaders(b"cache-control", [b"no-cache"])  # olladmr's own wins over the upstream's
        headers.setRawHeaders(b"content-length", [b"2"])
        return b"{}"


def test_upstream_header_lines_pass_through_as_sent_under_olladmrs_own() -> None:
    """End-to-end upstream headers keep their spelling and order; hop-by-hop, cookies, spoofs and shadowed names go."""
    channel, transport, _ = channel_for(_Upstreamish())
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    channel.site.sends.flush()  # type: ignore[attr-defined]
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")[1:]
    names = [line.split(b":")[0].lower() for line in lines]
    assert body == b"{}"
    assert b"X-Mixed-Case: kept as sent" in lines
    assert [line for line in lines if line.startswith(b"X-Twice")] == [b"X-Twice: 1", b"X-Twice: 2"]
    assert b"connection" not in names  # (the upstream's: its connection is not the client's)
    assert b"x-private" not in names and b"keep-alive" not in names and b"set-cookie" not in names
    assert [line for line in lines if line.lower().startswith(b"x-olla-endpoint")] == [b"X-Olla-Endpoint: a"]
    assert [line for line in lines if line.lower().startswith(b"cache-control")] == [b"Cache-Control: no-cache"]
    assert [line for line in lines if line.lower().startswith(b"date")] == [b"Date: Tue, 01 Dec 2026 00:00:00 GMT"]
    assert [line for line in lines if line.lower().startswith(b"vary")] == [b"Vary: Accept-Encoding"]
    assert names.count(b"content-type") == 1


def test_response_headers_accessors_see_the_upstream_lines_under_olladmrs_own() -> None:
    headers = ResponseHeaders()
    headers.setRawHeaders(b"cache-control", [b"no-cache"])
    headers.take_upstream([(b"Cache-Control", b"max-age=1"), (b"X-Up", b"1"), (b"x-up", b"2"), (b"Content-Type", b"a/b"),
                           (b"Connection", b"x-gone"), (b"X-Gone", b"hop")])
    assert headers.getRawHeaders(b"cache-control") == [b"no-cache"]  # olladmr's own wins
    assert headers.getRawHeaders(b"X-UP") == [b"1", b"2"] and headers.getRawHeaders("x-up") == ["1", "2"]
    assert headers.getRawHeaders(b"x-gone") is None and headers.getRawHeaders(b"x-none", [b"d"]) == [b"d"]
    assert headers.hasHeader(b"content-type") and not headers.hasHeader(b"connection")
    copied = headers.copy()
    headers.removeHeader(b"x-up")
    assert not headers.hasHeader(b"x-up") and copied.getRawHeaders(b"x-up") == [b"1", b"2"]
    assert [(name.lower(), list(values)) for name, values in headers.getAllRawHeaders()] == [
        (b"cache-control", [b"no-cache"]), (b"content-type", [b"a/b"])]


def test_an_empty_own_header_shadows_the_upstream_line_everywhere() -> None:
    headers = ResponseHeaders()
    headers.take_upstream([(b"X-A", b"up")])
    headers.setRawHeaders(b"x-a", [])
    plain = Headers()
    plain.setRawHeaders(b"x-a", [])
    assert headers.getRawHeaders(b"x-a") == plain.getRawHeaders(b"x-a")  # as Twisted answers: not the upstream's
    assert headers.hasHeader(b"x-a") == plain.hasHeader(b"x-a")
    assert [values for name, values in headers.getAllRawHeaders() if name.lower() == b"x-a"] == [[]]


def test_what_twisteds_parser_refuses_is_a_400_in_the_routes_dialect_and_never_served() -> None:
    """A malformed header line, two lengths, a broken chunk: 400 JSON naming the part, the route's error shape."""
    cases = [
        (b"POST /olla/dmr/api/chat HTTP/1.1\r\nHost: x\r\nno colon\r\nContent-Length: 2\r\n\r\n{}", "header line"),
        (b"POST /olla/dmr/engines/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
         b"Content-Length: 2\r\n\r\n{}", "Content-Length"),
        (b"POST /olla/dmr/engines/v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2\r\n{}\r\nzz\r\n", "chunked"),
        (b"GET /olla/dmr/api/tags HTTP/1.1 extra\r\nHost: x\r\n\r\n", "request line"),
        (b"GET /olla/dmr/api/tags HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", "Transfer-Encoding"),
    ]
    for raw, part in cases:
        channel, transport, clock, resource = connect()
        channel.dataReceived(raw)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head, raw
        error = json.loads(body)["error"]
        if b"/api/" in raw:  # Ollama's routes: {"error": "..."}
            assert isinstance(error, str) and part in error, (raw, error)
        else:
            assert error["code"] == "invalid_request" and part in error["message"], (raw, error)
        assert resource.seen == []
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # what follows is never read
        assert resource.seen == []
        clock.advance(OllaChannel.LINGER)


def test_a_request_begun_in_the_read_that_ended_the_one_before_gets_its_header_clock() -> None:
    """The first bytes of the next request, read with the end of one answered at once, start the 408 clock."""
    channel, transport, clock, resource = connect(read_header_timeout="2s", idle_timeout=0)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /olla/dmr/api/ta")
    assert resource.seen == [(b"GET", 0)]
    answered = len(transport.value())
    clock.advance(2.1)
    head, _, body = transport.value()[answered:].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert isinstance(json.loads(body)["error"], str)  # its path so far picked Ollama's error shape


def test_empty_lines_between_requests_never_start_a_clock_and_are_skipped() -> None:
    """A CRLF split over reads, or several CRLFs, between or before requests: no 408 on an idle connection."""
    for reads in (
        [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok", b"\r", b"\n"],
        [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok\r", b"\n"],
        [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r", b"\n"],
        [b"\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n\r\n"],
    ):
        channel, transport, clock, resource = connect(read_header_timeout="2s", idle_timeout=0)
        for data in reads:
            channel.dataReceived(data)
        assert len(resource.seen) == 1, reads
        clock.advance(10)
        assert b"408" not in transport.value() and b"400" not in transport.value(), reads
        assert clock.getDelayedCalls() == [], reads
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert len(resource.seen) == 2, reads


def test_a_header_line_trickled_in_small_reads_is_served_or_refused_at_the_limit() -> None:
    """A long header line in 100-byte reads: within the limit it is served; past it, 431 (no need for its end)."""
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 30_000
    for limit, served in ((40_000, True), (20_000, False)):
        channel, transport, clock, resource = connect(request_limits={"max_header_size": limit})
        data = head + b"\r\n\r\n" if served else head
        for start in range(0, len(data), 100):
            channel.dataReceived(data[start:start + 100])
        if served:
            assert resource.seen == [(b"GET", 0)] and transport.value().startswith(b"HTTP/1.1 200")
        else:
            status, error = answer(transport)
            assert status == 431 and resource.seen == []


def test_connection_close_is_read_from_a_list() -> None:
    """``Connection: keep-alive,close`` (no space) closes after the answer; what follows is not served."""
    channel, transport, clock, resource = connect()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive,close\r\n\r\n"
                         b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resource.seen == [(b"GET", 0)] and transport.disconnecting


def test_lines_ended_by_lf_alone_are_refused_at_once() -> None:
    """``GET / HTTP/1.1\\nHost: x\\n\\n`` is a 400 at once, not a wait for a CRLF that never comes."""
    channel, transport, clock, resource = connect()
    channel.dataReceived(b"GET /olla/dmr/v1/models HTTP/1.1\nHost: x\n\n")
    status, error = answer(transport)
    assert status == 400 and "CRLF" in error["message"] and resource.seen == []
