"""
Unit tests of :class:`olladmr.proxy.exchange.Exchange`, one per outcome and phase.

Everything runs on a :class:`~twisted.internet.task.Clock` with in-memory
fakes: no sockets, no reactor.  The host is a real
:class:`~olladmr.proxy.proxy.Proxy` (so :class:`InFlight` and the observers
are the real ones); only the upstream HTTP client, its responses and the
client's request are fakes: the request and the upstream transport from
:mod:`proxyfakes`, the rest defined at the top of this module.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Iterator, cast

import pytest
from proxyfakes import CHAT_PATH, CLIENT_IP, FakeRequest, FakeUpstreamTransport, connection_lost, sse_event
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from olladmr.config import parse_config
from olladmr.config.schema import Config
from olladmr.failures import HEADER_TIMEOUT, UpstreamFailure
from olladmr.proxy.upstream import Body
from olladmr.fleet.models import normalise_model
from olladmr.fleet.responses import ResponseDirectory
from olladmr.fleet.sessions import SessionRouter
from olladmr.fleet.state import EndpointState, Fleet
from olladmr.proxy.affinity import ResponseAffinity
from olladmr.proxy.exchange import MAX_UPSTREAM_HEADER_BYTES, Exchange, Phase
from olladmr.proxy.headers import HeaderPairs, header_values
from olladmr.proxy.proxy import InFlight, Proxy
from olladmr.proxy.record import (
    CLIENT_DISCONNECTED,
    OK,
    READ_TIMEOUT,
    REJECTED,
    REQUEST_TIMEOUT,
    UPSTREAM_ERROR,
    UPSTREAM_TRUNCATED,
    ExchangeRecord,
    ProxyCall,
)

MODEL = "ai/smollm2"


# --------------------------------------------------------------------------- fakes


class FakeResponse:
    """
    A :class:`~olladmr.proxy.upstream.ProxiedResponse` whose body the test
    delivers by hand: :meth:`chunk` calls the body protocol's
    ``dataReceived``, :meth:`end` its ``connectionLost`` (``ResponseDone``
    unless told otherwise).
    """

    version = (b"HTTP", 1, 1)

    def __init__(
        self,
        code: int = 200,
        phrase: bytes = b"OK",
        headers: dict[bytes, list[bytes]] | None = None,
        length: int | object = UNKNOWN_LENGTH,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers(headers or {})
        self.pairs = [(name, value) for name, values in (headers or {}).items() for value in values]
        self.head_size = sum(len(name) + len(value) for name, value in self.pairs)
        self.length = length
        self.transport = FakeUpstreamTransport()
        self.protocol: Protocol | None = None

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def deliverBody(self, protocol: Protocol) -> None:
        assert self.protocol is None, "deliverBody called twice"
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def chunk(self, data: bytes) -> None:
        assert self.protocol is not None, "nobody asked for the body"
        self.protocol.dataReceived(data)

    def end(self, reason: Exception | None = None) -> None:
        assert self.protocol is not None, "nobody asked for the body"
        self.protocol.connectionLost(Failure(reason or ResponseDone()))


def json_response(body: bytes, code: int = 200, phrase: bytes = b"OK", **headers: list[bytes]) -> FakeResponse:
    """A JSON response with a known length."""
    hdrs = {b"content-type": [b"application/json"], **{k.replace("_", "-").encode(): v for k, v in headers.items()}}
    return FakeResponse(code, phrase, hdrs, len(body))


def sse_response() -> FakeResponse:
    """A 200 event stream of unknown length."""
    return FakeResponse(200, b"OK", {b"content-type": [b"text/event-stream; charset=utf-8"]})


@dataclass
class UpstreamCall:
    """One call to :meth:`FakeUpstreamClient.request`; the test fires ``deferred`` by hand."""

    endpoint: str
    method: bytes
    url: bytes
    headers: HeaderPairs
    body: Body
    fresh: bool
    deferred: Deferred[Any] = field(init=False)
    cancelled: bool = False
    header_timeout: float | None = None

    def header(self, name: bytes) -> bytes | None:
        values = header_values(self.headers, name)
        return values[0] if values else None

    def body_bytes(self) -> bytes:
        """What the body producer writes."""
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        parts: list[bytes] = []

        @implementer(IConsumer)
        class Sink:
            def write(self, data: bytes) -> None:
                parts.append(data)

            def registerProducer(self, producer: object, streaming: bool) -> None:
                pass

            def unregisterProducer(self) -> None:
                pass

        self.body.startProducing(Sink())
        return b"".join(parts)


class FakeUpstreamClient:
    """``UpstreamClient.request`` that records each call and returns a Deferred cancellable like the real one."""

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []

    def request(
        self,
        endpoint: str,
        method: bytes,
        url: bytes,
        headers: HeaderPairs,
        body: Body,
        *,
        fresh: bool = False,
        header_timeout: float | None = None,
    ) -> Deferred[Any]:
        call = UpstreamCall(endpoint, method, url, headers, body, fresh)
        call.header_timeout = header_timeout

        def cancel(_: Deferred[Any]) -> None:
            call.cancelled = True  # the real client aborts the connection; the Deferred fails with CancelledError

        call.deferred = Deferred(cancel)
        self.calls.append(call)
        return call.deferred


class Recorder:
    """Both the ``mark_offline`` callable and an exchange observer: records what it is told."""

    def __init__(self) -> None:
        self.records: list[ExchangeRecord] = []
        self.offline: list[tuple[str, str]] = []

    def __call__(self, endpoint: EndpointState, reason: str) -> None:
        self.offline.append((endpoint.name, reason))

    def exchange_done(self, record: ExchangeRecord) -> None:
        self.records.append(record)

    @property
    def record(self) -> ExchangeRecord:
        assert len(self.records) == 1, f"expected exactly one record, got {self.records}"
        return self.records[0]


@dataclass
class Harness:
    """A real Proxy over a Fleet, on a Clock, with a fake upstream client and a recorder."""

    clock: Clock
    config: Config
    fleet: Fleet
    client: FakeUpstreamClient
    inflight: InFlight
    recorder: Recorder
    proxy: Proxy

    def ep(self, name: str) -> EndpointState:
        state = self.fleet.get(name)
        assert state is not None
        return state

    def start(
        self, request: FakeRequest | None = None, model: str | None = MODEL, request_id: str = "req-1",
        streamed: bool = False,
    ) -> FakeRequest:
        """Proxy one chat-completions request (a fresh FakeRequest unless given)."""
        request = request or FakeRequest(body=b'{"model":"ai/smollm2","messages":[]}')
        call = ProxyCall(
            method=b"POST",
            upstream_path=CHAT_PATH,
            route="chat/completions",
            model=model,
            model_key=normalise_model(model) if model is not None else None,
            arrived=self.clock.seconds(),
            request_id=request_id,
            streamed=streamed,
        )
        self.proxy.handle(cast(Any, request), call)
        return request

    def exchange(self) -> Exchange:
        (only,) = list(self.inflight)
        return only

    def assert_quiet(self) -> None:
        """Nothing left behind: no exchange in flight, no slot or queue entry held, no timer pending."""
        assert len(self.inflight) == 0
        assert [(ep.name, ep.in_flight, ep.queued) for ep in self.fleet] == [
            (ep.name, 0, 0) for ep in self.fleet
        ]
        assert self.clock.getDelayedCalls() == []


def make(*endpoints: dict[str, Any], **proxy: Any) -> Harness:
    """A harness whose endpoints (default: one, ``a``) are healthy and serve ``ai/smollm2``."""
    clock = Clock()
    docs = list(endpoints) or [endpoint("a")]
    config = parse_config({"endpoints": docs, "proxy": proxy}, "test")
    fleet = Fleet(config, clock)
    for state in fleet:
        state.status = "healthy"
        state.set_models([{"id": MODEL}])
    client = FakeUpstreamClient()
    inflight = InFlight()
    recorder = Recorder()
    affinity = ResponseAffinity(ResponseDirectory(clock), cast(Any, client), clock)
    host = Proxy(
        fleet, cast(Any, client), clock, config, inflight=inflight, responses=affinity,
        sessions=SessionRouter(clock, config), mark_offline=recorder,
        observers=[recorder],
    )
    return Harness(clock, config, fleet, client, inflight, recorder, host)


def endpoint(name: str, priority: int = 100, **more: Any) -> dict[str, Any]:
    """An endpoint mapping as the config file would hold it."""
    return {"name": name, "url": f"http://{name}.test:1", "priority": priority, **more}


@implementer(ILogObserver)
class FailureLog:
    """Collects every Failure logged (``log.failure``, unhandled errors in garbage Deferreds) while installed."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event:
            self.failures.append(event["log_failure"])


@pytest.fixture(scope="module")
def module_failures() -> Iterator[FailureLog]:
    """Installed for the whole module; one garbage collection at the end surfaces unhandled errors in Deferreds."""
    log = FailureLog()
    globalLogPublisher.addObserver(log)
    try:
        yield log
        gc.collect()  # once per module: a collection per test would cost more than the tests
    finally:
        globalLogPublisher.removeObserver(log)
    assert log.failures == [], [f.getTraceback() for f in log.failures]


@pytest.fixture(autouse=True)
def logged_failures(module_failures: FailureLog) -> Iterator[list[Failure]]:
    """The Failures logged during this test (a live list); there must be none unless the test clears them."""
    assert module_failures.failures == []
    yield module_failures.failures
    failures, module_failures.failures[:] = list(module_failures.failures), []
    assert failures == [], [f.getTraceback() for f in failures]


CHUNK_1 = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
CHUNK_2 = b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}\n\n'
LAST = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
OK_BODY = (
    b'{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}'
)


# --------------------------------------------------------------------------- 1. success


def test_success_relays_the_json_body_with_olla_headers_and_records_usage() -> None:
    """A 200 JSON answer reaches the client byte for byte, chunk by chunk, with Content-Length and X-Olla-* headers, and its usage lands in the record."""
    h = make(request_timeout="60s")
    request = FakeRequest(
        body=b'{"model":"ai/smollm2","messages":[]}',
        headers={b"content-type": [b"application/json"], b"authorization": [b"Bearer client-secret"]},
    )
    h.start(request)
    assert h.exchange().phase is Phase.SENDING
    assert h.ep("a").in_flight == 1
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [60.0]  # the request deadline
    (call,) = h.client.calls
    assert (call.endpoint, call.method, call.url, call.fresh) == ("a", b"POST", b"http://a.test:1" + CHAT_PATH, False)
    assert call.header(b"x-olla-request-id") == b"req-1"
    assert call.header(b"x-forwarded-for") == CLIENT_IP.encode()
    assert call.header(b"authorization") is None  # client credentials stay with the proxy
    assert call.body_bytes() == b'{"model":"ai/smollm2","messages":[]}'

    h.clock.advance(0.25)
    response = json_response(OK_BODY, set_cookie=[b"track=1"], x_olla_endpoint=[b"spoofed"])
    call.deferred.callback(response)
    assert h.exchange().phase is Phase.RELAYING
    assert request.code == 200
    assert request.producer is response.transport and request.streaming is True
    assert request.header(b"content-length") == b"%d" % len(OK_BODY)
    assert request.header(b"content-type") == b"application/json"
    assert request.header(b"set-cookie") is None
    assert request.header(b"x-olla-endpoint") == b"a"
    assert request.header(b"x-olla-model") == MODEL.encode()
    assert request.header(b"x-olla-backend-type") == b"docker-model-runner"
    assert request.header(b"x-olla-response-time") == b"250ms"
    assert request.header(b"x-olla-routing-strategy") == b"model-aware"
    assert request.header(b"x-olla-routing-decision") == b"routed"
    assert request.header(b"x-olla-routing-reason") == b"model_found"
    assert request.defaultContentType is None

    h.clock.advance(0.5)
    response.chunk(OK_BODY[:40])
    assert request.written == [OK_BODY[:40]]  # written at once, not buffered
    response.chunk(OK_BODY[40:])
    assert request.written == [OK_BODY[:40], OK_BODY[40:]]
    assert h.recorder.records == []
    response.end()

    assert request.finished and request.finish_calls == 1
    assert request.body == OK_BODY
    assert request.producer is None and request.unregistered == 1
    assert request.transport.aborted == 0
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (OK, 200, 1, 0, "a")
    assert (record.bytes_sent, record.error, record.streamed) == (len(OK_BODY), None, False)
    assert record.usage == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert (record.headers_at, record.first_byte_at, record.ended) == (0.25, 0.75, 0.75)
    assert (record.method, record.path, record.route, record.client, record.model) == (
        "POST", CHAT_PATH.decode(), "chat/completions", CLIENT_IP, MODEL
    )
    ep = h.ep("a")
    assert (ep.request_count, ep.failure_count, ep.breaker.state, ep.breaker.failures) == (1, 0, "closed", 0)
    assert response.transport.calls == []
    h.assert_quiet()


def test_success_of_an_event_stream_sets_no_cache_headers_and_needs_no_content_length() -> None:
    """A complete SSE stream (ending with [DONE]) is relayed unchanged, marked no-cache, and recorded as streamed."""
    h = make()
    request = h.start()
    response = sse_response()
    h.client.calls[0].deferred.callback(response)
    assert request.header(b"cache-control") == b"no-cache"
    assert request.header(b"x-accel-buffering") == b"no"
    assert request.header(b"content-length") is None
    for part in (CHUNK_1, CHUNK_2, LAST):
        response.chunk(part)
    response.end(PotentialDataLoss())  # no Content-Length, closed by the upstream: still clean

    assert request.finished and request.written == [CHUNK_1, CHUNK_2, LAST]
    record = h.recorder.record
    assert (record.outcome, record.status, record.streamed, record.bytes_sent) == (
        OK, 200, True, len(CHUNK_1 + CHUNK_2 + LAST)
    )
    h.assert_quiet()


# --------------------------------------------------------------------------- 2. failover


def test_refused_endpoint_is_marked_offline_and_the_next_one_serves() -> None:
    """A refused connection (nothing sent) fails over to the next endpoint and tells the health monitor."""
    h = make(endpoint("a", 100), endpoint("b", 90))
    request = h.start()
    first = h.client.calls[0]
    assert first.endpoint == "a"
    first.deferred.errback(UpstreamFailure("a", "connection_refused", "connection refused", sent=False))

    assert h.recorder.offline == [("a", "connection_refused during a request")]
    assert [c.endpoint for c in h.client.calls] == ["a", "b"]
    second = h.client.calls[1]
    assert second.url == b"http://b.test:1" + CHAT_PATH and second.fresh is False
    assert second.body_bytes() == b'{"model":"ai/smollm2","messages":[]}'  # the body is sent again, whole
    assert (h.ep("a").in_flight, h.ep("b").in_flight) == (0, 1)
    response = json_response(b'{"ok":true}')
    second.deferred.callback(response)
    response.chunk(b'{"ok":true}')
    response.end()

    assert (request.code, request.body, request.header(b"x-olla-endpoint")) == (200, b'{"ok":true}', b"b")
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (OK, 200, 2, 1, "b")
    assert (record.bytes_sent, record.error) == (11, None)
    a, b = h.ep("a"), h.ep("b")
    assert (a.request_count, a.failure_count, a.breaker.failures) == (1, 1, 1)
    assert (b.request_count, b.failure_count, b.breaker.failures) == (1, 0, 0)
    h.assert_quiet()


def test_every_endpoint_refused_answers_502_naming_each() -> None:
    """When every candidate refused, the client gets 502 upstream_unreachable listing each endpoint's failure."""
    h = make(endpoint("a", 100), endpoint("b", 90))
    request = h.start()
    h.client.calls[0].deferred.errback(UpstreamFailure("a", "connection_refused", "connection refused", sent=False))
    h.client.calls[1].deferred.errback(UpstreamFailure("b", "unreachable", "no route to host", sent=False))

    assert len(h.client.calls) == 2
    assert request.code == 502 and request.finished
    error = request.json()["error"]
    assert error["code"] == "upstream_unreachable" and error["type"] == "upstream_error"
    assert error["message"] == "could not reach any DMR endpoint: a: connection refused; b: no route to host"
    assert request.header(b"x-olla-routing-decision") == b"routed"
    assert h.recorder.offline == [("a", "connection_refused during a request"), ("b", "unreachable during a request")]
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (
        UPSTREAM_ERROR, 502, 2, 2, "b"
    )
    assert record.error == error["message"]
    assert [(ep.failure_count, ep.breaker.failures) for ep in h.fleet] == [(1, 1), (1, 1)]
    h.assert_quiet()


# --------------------------------------------------------------------------- 3. stale retry


def test_reset_on_a_reused_connection_is_retried_once_on_a_fresh_one() -> None:
    """A reset on a stale pooled connection is retried on the same endpoint with fresh=True, without counting a failure."""
    h = make(endpoint("a", 100), endpoint("b", 90))
    request = h.start()
    h.client.calls[0].deferred.errback(
        UpstreamFailure("a", "connection_reset", "connection closed before any response", reused=True)
    )
    assert [(c.endpoint, c.fresh) for c in h.client.calls] == [("a", False), ("a", True)]
    assert h.ep("a").in_flight == 1  # the slot is kept for the retry
    response = json_response(b"{}")
    h.client.calls[1].deferred.callback(response)
    response.chunk(b"{}")
    response.end()

    assert (request.code, request.body, request.header(b"x-olla-endpoint")) == (200, b"{}", b"a")
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (OK, 200, 2, 0, "a")
    a = h.ep("a")
    assert (a.request_count, a.failure_count, a.breaker.failures) == (2, 0, 0)
    assert h.recorder.offline == []
    h.assert_quiet()


def test_a_second_reset_on_the_fresh_connection_is_a_502_without_failover() -> None:
    """The stale retry happens once: a reset on the fresh connection (request sent) is a 502 connection_reset, not a failover."""
    h = make(endpoint("a", 100), endpoint("b", 90))
    request = h.start()
    h.client.calls[0].deferred.errback(UpstreamFailure("a", "connection_reset", "closed", reused=True))
    h.client.calls[1].deferred.errback(UpstreamFailure("a", "connection_reset", "closed again"))

    assert [(c.endpoint, c.fresh) for c in h.client.calls] == [("a", False), ("a", True)]
    assert request.code == 502 and request.json()["error"]["code"] == "connection_reset"
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers) == (UPSTREAM_ERROR, 502, 2, 0)
    assert record.error == "endpoint a: closed again"
    assert (h.ep("a").failure_count, h.ep("b").request_count) == (1, 0)
    h.assert_quiet()


# --------------------------------------------------------------------------- 4. header timeout


def test_header_timeout_is_a_504_and_not_retried_elsewhere() -> None:
    """No response headers in time means the upstream may be working on it: 504 upstream_timeout, no failover."""
    h = make(endpoint("a", 100), endpoint("b", 90), response_header_timeout="7s")
    request = h.start()
    h.client.calls[0].deferred.errback(UpstreamFailure("a", "header_timeout", "no response headers within 7s"))

    assert len(h.client.calls) == 1
    assert request.code == 504 and request.finished
    error = request.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert error["message"] == (
        "endpoint a sent no response headers within proxy.response_header_timeout (7s)"
    )
    assert request.header(b"x-olla-routing-strategy") == b"model-aware"
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (
        UPSTREAM_ERROR, 504, 1, 0, "a"
    )
    assert record.error == error["message"]
    a = h.ep("a")
    assert (a.failure_count, a.breaker.failures) == (1, 1)
    assert h.recorder.offline == []
    h.assert_quiet()


# --------------------------------------------------------------------------- 5./6. request timeout


def test_request_timeout_before_headers_cancels_the_upstream_request() -> None:
    """proxy.request_timeout fires while waiting for headers: the attempt is cancelled and the client gets 504 request_timeout."""
    h = make(request_timeout="2s")
    request = h.start()
    (call,) = h.client.calls
    h.clock.advance(1.999)
    assert not call.cancelled and request.written == []
    h.clock.advance(0.001)

    assert call.cancelled
    assert request.code == 504 and request.finished
    error = request.json()["error"]
    assert error == {
        "message": "the request took longer than proxy.request_timeout (2s)",
        "type": "upstream_error",
        "code": "request_timeout",
    }
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (
        REQUEST_TIMEOUT, 504, 1, 0, "a"
    )
    assert (record.error, record.ended) == (error["message"], 2.0)
    a = h.ep("a")
    assert (a.request_count, a.failure_count, a.breaker.failures) == (1, 0, 0)  # our timeout says nothing about a
    h.assert_quiet()


def test_request_timeout_while_relaying_a_stream_ends_it_with_an_sse_error_event() -> None:
    """proxy.request_timeout fires mid-stream: the upstream is stopped and the client gets what came plus an error event, never [DONE]."""
    h = make(request_timeout="2s")
    request = h.start()
    h.clock.advance(0.5)
    response = sse_response()
    h.client.calls[0].deferred.callback(response)
    h.clock.advance(0.5)
    response.chunk(CHUNK_1)
    h.clock.advance(0.5)
    response.chunk(CHUNK_2)
    assert response.transport.calls == []
    h.clock.advance(0.5)

    assert response.transport.calls == ["stopProducing"]
    assert not request.finished and h.recorder.records == []  # until the upstream connection is closed
    response.end(connection_lost())

    assert request.code == 200 and request.finished and request.finish_calls == 1
    assert request.written[:2] == [CHUNK_1, CHUNK_2]
    assert len(request.written) == 3
    assert sse_event(request.written[2]) == {
        "error": {
            "message": "the request took longer than proxy.request_timeout",
            "type": "upstream_error",
            "code": "request_timeout",
        }
    }
    assert b"[DONE]" not in request.body
    assert request.transport.aborted == 0
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.endpoint) == (REQUEST_TIMEOUT, 200, 1, "a")
    assert (record.bytes_sent, record.streamed, record.first_byte_at, record.ended) == (
        len(CHUNK_1 + CHUNK_2), True, 1.0, 2.0
    )
    a = h.ep("a")
    assert (a.failure_count, a.breaker.failures) == (0, 0)
    h.assert_quiet()


def test_read_timeout_while_relaying_a_stream_ends_it_with_an_sse_error_event() -> None:
    """proxy.read_timeout of silence mid-stream stops the upstream and ends the stream with a read_timeout error event."""
    h = make(read_timeout="5s")
    request = h.start()
    response = sse_response()
    h.client.calls[0].deferred.callback(response)
    h.clock.advance(4)
    response.chunk(CHUNK_1)
    h.clock.advance(4.9)
    assert response.transport.calls == []
    h.clock.advance(0.1)
    assert response.transport.calls == ["stopProducing"]
    response.end(connection_lost())

    assert request.finished and request.written[0] == CHUNK_1 and len(request.written) == 2
    assert sse_event(request.written[1])["error"]["code"] == "read_timeout"
    record = h.recorder.record
    assert (record.outcome, record.status, record.bytes_sent) == (READ_TIMEOUT, 200, len(CHUNK_1))
    h.assert_quiet()


def test_client_leaving_after_a_request_timeout_mid_stream_still_ends_the_exchange() -> None:
    """A client that leaves between the request timeout stopping the stream and the upstream closing still gets its exchange ended and its slot freed."""
    h = make(request_timeout="2s")
    request = h.start()
    response = sse_response()
    h.client.calls[0].deferred.callback(response)
    response.chunk(CHUNK_1)
    h.clock.advance(2)
    assert response.transport.calls == ["stopProducing"]
    request.lose_client()
    response.end(connection_lost())  # must not touch the request: Twisted would raise RuntimeError on finish()

    assert request.finish_calls == 0  # nothing may finish a request whose connection is gone
    record = h.recorder.record
    assert record.outcome == REQUEST_TIMEOUT  # what stopped the stream first
    assert record.bytes_sent == len(CHUNK_1)
    h.assert_quiet()


# --------------------------------------------------------------------------- 7./8. 503 answers


def test_loading_model_503_fails_over_without_counting_a_failure() -> None:
    """A 503 "Loading model" is read, not relayed: the next endpoint answers and the loading one is not blamed."""
    h = make(endpoint("a", 100), endpoint("b", 90))
    request = h.start()
    loading_body = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
    loading = json_response(loading_body, 503, b"Service Unavailable")
    h.client.calls[0].deferred.callback(loading)
    assert h.exchange().phase is Phase.CHECKING
    loading.chunk(loading_body[:30])
    loading.chunk(loading_body[30:])
    assert len(h.client.calls) == 1
    loading.end()

    assert [c.endpoint for c in h.client.calls] == ["a", "b"]
    assert request.written == [] and request.code == 200  # nothing of the 503 reached the client
    served = json_response(OK_BODY)
    h.client.calls[1].deferred.callback(served)
    served.chunk(OK_BODY)
    served.end()

    assert (request.code, request.body, request.header(b"x-olla-endpoint")) == (200, OK_BODY, b"b")
    assert request.header(b"content-length") == b"%d" % len(OK_BODY)
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (OK, 200, 2, 1, "b")
    assert record.usage == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    a = h.ep("a")
    assert (a.request_count, a.failure_count, a.breaker.failures) == (1, 0, 0)
    assert h.recorder.offline == []
    h.assert_quiet()


@pytest.mark.parametrize("endpoints", [1, 2], ids=["alone-relayed", "with-alternative-checked"])
def test_other_503_is_passed_through_unchanged_and_counts_against_the_breaker(endpoints: int) -> None:
    """A 503 that is not "Loading model" reaches the client as is (status, headers, body), with or without another endpoint to try."""
    h = make(*[endpoint("a", 100), endpoint("b", 90)][:endpoints])
    request = h.start()
    body = b'{"error":{"message":"server overloaded","type":"unavailable_error"}}'
    busy = json_response(body, 503, b"Service Unavailable", retry_after=[b"9"])
    h.client.calls[0].deferred.callback(busy)
    busy.chunk(body[:20])
    # alone, it is relayed as it comes; with an alternative, it is read whole first
    assert request.written == ([body[:20]] if endpoints == 1 else [])
    busy.chunk(body[20:])
    busy.end()

    assert len(h.client.calls) == 1
    assert (request.code, request.code_message, request.body) == (503, b"Service Unavailable", body)
    assert request.finished and request.finish_calls == 1
    assert request.header(b"retry-after") == b"9"
    assert request.header(b"content-length") == b"%d" % len(body)
    assert request.header(b"x-olla-endpoint") == b"a"
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (OK, 503, 1, 0, "a")
    assert (record.bytes_sent, record.error, record.usage) == (len(body), None, None)
    a = h.ep("a")
    assert (a.failure_count, a.breaker.failures) == (0, 1)
    h.assert_quiet()


def test_loading_model_503_without_an_alternative_is_relayed() -> None:
    """With no other endpoint to try, a "Loading model" 503 is relayed to the client as it comes."""
    h = make()
    request = h.start()
    body = b'{"error":{"message":"Loading model"}}'
    loading = json_response(body, 503, b"Service Unavailable")
    h.client.calls[0].deferred.callback(loading)
    assert h.exchange().phase is Phase.RELAYING
    loading.chunk(body)
    loading.end()

    assert (request.code, request.body, request.finished) == (503, body, True)
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers) == (OK, 503, 1, 0)
    assert h.ep("a").breaker.failures == 1
    h.assert_quiet()


@pytest.mark.parametrize("how", ["connection-lost", "too-large"])
def test_unreadable_503_fails_over_and_counts_a_failure(how: str) -> None:
    """A 503 whose body cannot be read (connection lost, or over 64 KB) means nothing was generated: fail over, and blame the endpoint."""
    h = make(endpoint("a", 100), endpoint("b", 90))
    request = h.start()
    unavailable = FakeResponse(503, b"Service Unavailable", {b"content-type": [b"text/plain"]})
    h.client.calls[0].deferred.callback(unavailable)
    if how == "too-large":
        unavailable.chunk(b"x" * (64 * 1024 + 1))
        assert unavailable.transport.calls == ["stopProducing"]
    else:
        unavailable.chunk(b"Service Unav")
        unavailable.end(connection_lost())
    assert [c.endpoint for c in h.client.calls] == ["a", "b"]
    assert request.written == []
    served = json_response(b"{}")
    h.client.calls[1].deferred.callback(served)
    served.chunk(b"{}")
    served.end()

    assert (request.code, request.body, request.header(b"x-olla-endpoint")) == (200, b"{}", b"b")
    record = h.recorder.record
    assert (record.outcome, record.attempts, record.failovers, record.endpoint) == (OK, 2, 1, "b")
    a = h.ep("a")
    assert (a.failure_count, a.breaker.failures) == (1, 1)
    h.assert_quiet()


# --------------------------------------------------------------------------- 9. the client leaves


def test_client_leaving_while_queued_leaves_the_queue_and_not_the_slot() -> None:
    """A queued request whose client leaves is taken off the queue; the slot holder is unaffected and the slot is not handed to it."""
    h = make(endpoint("a", max_concurrent=1, queue_timeout="30s"), request_timeout="60s")
    holder = h.start(request_id="holder")
    queued = h.start(request_id="queued")
    exchanges = {e.record.request_id: e for e in h.inflight}
    assert exchanges["queued"].phase is Phase.QUEUED
    a = h.ep("a")
    assert (a.in_flight, a.queued, len(h.client.calls)) == (1, 1, 1)

    queued.lose_client()

    assert (a.in_flight, a.queued) == (1, 0)
    assert queued.written == [] and queued.dropped == [] and queued.finish_calls == 0
    (record,) = h.recorder.records
    assert (record.request_id, record.outcome, record.status, record.attempts, record.endpoint) == (
        "queued", CLIENT_DISCONNECTED, 0, 0, None
    )
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [60.0]  # the queue timer and its deadline went with it
    response = json_response(b"{}")
    h.client.calls[0].deferred.callback(response)
    response.chunk(b"{}")
    response.end()

    assert len(h.client.calls) == 1  # the freed slot went to nobody
    assert holder.finished and holder.body == b"{}"
    assert [(r.request_id, r.outcome) for r in h.recorder.records] == [("queued", CLIENT_DISCONNECTED), ("holder", OK)]
    assert (a.request_count, a.failure_count) == (1, 0)
    h.assert_quiet()


def test_client_leaving_while_sending_cancels_the_attempt_without_blaming_the_endpoint() -> None:
    """A client that leaves before the headers come cancels the upstream request; nothing is written and the breaker is untouched."""
    h = make()
    request = h.start()
    (call,) = h.client.calls
    assert h.exchange().phase is Phase.SENDING

    request.lose_client()

    assert call.cancelled
    assert request.written == [] and request.dropped == [] and request.finish_calls == 0
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (
        CLIENT_DISCONNECTED, 0, 1, 0, "a"
    )
    assert (record.bytes_sent, record.error) == (0, None)
    a = h.ep("a")
    assert (a.request_count, a.failure_count, a.breaker.failures) == (1, 0, 0)
    h.assert_quiet()


def test_client_leaving_while_checking_a_503_stops_reading_it() -> None:
    """A client that leaves while a 503 body is being inspected stops that read; no other endpoint is tried."""
    h = make(endpoint("a", 100), endpoint("b", 90))
    request = h.start()
    unavailable = json_response(b'{"error":"Loading model"}', 503, b"Service Unavailable")
    h.client.calls[0].deferred.callback(unavailable)
    unavailable.chunk(b'{"error":"Loa')
    assert h.exchange().phase is Phase.CHECKING

    request.lose_client()

    assert unavailable.transport.calls == ["stopProducing"]
    unavailable.chunk(b'ding model"}')  # late bytes and the close change nothing
    unavailable.end(connection_lost())
    assert len(h.client.calls) == 1
    assert request.written == [] and request.dropped == [] and request.finish_calls == 0
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.failovers, record.endpoint) == (
        CLIENT_DISCONNECTED, 0, 1, 0, "a"
    )
    assert [(ep.failure_count, ep.breaker.failures) for ep in h.fleet] == [(0, 0), (0, 0)]
    h.assert_quiet()


def test_client_leaving_while_relaying_stops_the_upstream_transport() -> None:
    """A client that leaves mid-stream stops the upstream; no error event is written and the outcome is client_disconnected."""
    h = make()
    request = h.start()
    response = sse_response()
    h.client.calls[0].deferred.callback(response)
    response.chunk(CHUNK_1)
    assert h.exchange().phase is Phase.RELAYING

    request.lose_client()

    assert response.transport.calls == ["stopProducing"]
    assert h.recorder.records == []  # the relay ends the exchange when the upstream connection closes
    response.end(connection_lost())
    assert request.written == [CHUNK_1] and request.dropped == [] and request.finish_calls == 0
    assert request.transport.aborted == 0
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.endpoint, record.bytes_sent) == (
        CLIENT_DISCONNECTED, 200, 1, "a", len(CHUNK_1)
    )
    assert record.usage is None
    a = h.ep("a")
    assert (a.failure_count, a.breaker.failures) == (0, 0)
    h.assert_quiet()


def test_client_leaving_after_the_response_is_ignored() -> None:
    """Once the exchange is done, the client's connection closing neither adds a record nor touches anything."""
    h = make()
    request = h.start()
    response = json_response(b"{}")
    h.client.calls[0].deferred.callback(response)
    response.chunk(b"{}")
    response.end()
    request.lose_client()

    assert [r.outcome for r in h.recorder.records] == [OK]
    assert response.transport.calls == [] and request.transport.aborted == 0
    h.assert_quiet()


# --------------------------------------------------------------------------- 10. truncated bodies


@pytest.mark.parametrize(
    "tail, prefix", [(b"", b""), (b'data: {"choices":[{"delta":{"con', b"\n\n")], ids=["at-boundary", "mid-event"]
)
def test_truncated_stream_ends_with_an_upstream_truncated_error_event(tail: bytes, prefix: bytes) -> None:
    """An event stream cut off before [DONE] is finished with an upstream_truncated error event (after a blank line if cut mid-event)."""
    h = make()
    request = h.start()
    response = sse_response()
    h.client.calls[0].deferred.callback(response)
    response.chunk(CHUNK_1)
    if tail:
        response.chunk(tail)
    response.end(connection_lost())

    assert request.finished and request.finish_calls == 1
    assert request.transport.aborted == 0
    assert request.written[: 2 if tail else 1] == ([CHUNK_1, tail] if tail else [CHUNK_1])
    event = request.written[-1]
    assert event.startswith(prefix + b"data: ")
    assert sse_event(event[len(prefix) :]) == {
        "error": {
            "message": "the upstream closed the stream before it was complete",
            "type": "upstream_error",
            "code": "upstream_truncated",
        }
    }
    assert b"[DONE]" not in request.body
    record = h.recorder.record
    assert (record.outcome, record.status, record.bytes_sent) == (UPSTREAM_TRUNCATED, 200, len(CHUNK_1 + tail))
    h.assert_quiet()


def test_truncated_json_body_aborts_the_client_connection() -> None:
    """A non-stream body cut short cannot be marked in-band, so the client connection is aborted, not finished."""
    h = make()
    request = h.start()
    response = json_response(OK_BODY)
    h.client.calls[0].deferred.callback(response)
    response.chunk(OK_BODY[:50])
    response.end(connection_lost())

    assert request.transport.aborted == 1
    assert not request.finished and request.finish_calls == 0
    assert request.written == [OK_BODY[:50]]
    record = h.recorder.record
    assert (record.outcome, record.status, record.bytes_sent, record.usage) == (UPSTREAM_TRUNCATED, 200, 50, None)
    request.lose_client()  # the abort closes the connection later: no second record
    assert len(h.recorder.records) == 1
    h.assert_quiet()


# --------------------------------------------------------------------------- 11. queue full / timeout


def test_full_queue_answers_503_queue_full_with_retry_after() -> None:
    """A request for an endpoint at max_concurrent with a full queue gets 503 queue_full and Retry-After at once."""
    h = make(endpoint("a", max_concurrent=1, queue_size=0, check_interval="3s"))
    holder = h.start(request_id="holder")
    rejected = h.start(request_id="rejected")

    assert len(h.client.calls) == 1
    assert rejected.code == 503 and rejected.finished
    assert rejected.json()["error"]["code"] == "queue_full"
    assert rejected.json()["error"]["type"] == "service_unavailable"
    assert rejected.header(b"retry-after") == b"3"
    assert rejected.header(b"x-olla-routing-decision") == b"routed"
    (record,) = h.recorder.records
    assert (record.request_id, record.outcome, record.status, record.attempts, record.endpoint) == (
        "rejected", REJECTED, 503, 0, None
    )
    assert record.error == "endpoint a is at max_concurrent=1 and its queue of 0 is full"
    assert (h.ep("a").in_flight, h.ep("a").queued) == (1, 0)

    response = json_response(b"{}")
    h.client.calls[0].deferred.callback(response)
    response.chunk(b"{}")
    response.end()
    assert holder.finished and [r.outcome for r in h.recorder.records] == [REJECTED, OK]
    h.assert_quiet()


def test_queue_timeout_answers_503_queue_timeout_with_retry_after() -> None:
    """A request that waits longer than queue_timeout for a slot gets 503 queue_timeout and Retry-After."""
    h = make(endpoint("a", max_concurrent=1, queue_size=1, queue_timeout="4s"))
    h.start(request_id="holder")
    waiting = h.start(request_id="waiting")
    assert h.ep("a").queued == 1
    h.clock.advance(3.9)
    assert waiting.written == []
    h.clock.advance(0.1)

    assert waiting.code == 503 and waiting.finished
    assert waiting.json()["error"]["code"] == "queue_timeout"
    assert waiting.header(b"retry-after") == b"4"
    (record,) = h.recorder.records
    assert (record.request_id, record.outcome, record.status, record.attempts, record.ended) == (
        "waiting", REJECTED, 503, 0, 4.0
    )
    assert (h.ep("a").in_flight, h.ep("a").queued, len(h.client.calls)) == (1, 0, 1)

    response = json_response(b"{}")
    h.client.calls[0].deferred.callback(response)
    response.chunk(b"{}")
    response.end()
    assert len(h.client.calls) == 1
    h.assert_quiet()


def test_queued_request_is_sent_when_the_slot_is_released() -> None:
    """A queued request gets the slot the moment the holder finishes, on the same endpoint."""
    h = make(endpoint("a", max_concurrent=1))
    h.start(request_id="holder")
    second = h.start(request_id="second")
    first_response = json_response(b"{}")
    h.client.calls[0].deferred.callback(first_response)
    first_response.chunk(b"{}")
    assert len(h.client.calls) == 1
    first_response.end()

    assert [c.endpoint for c in h.client.calls] == ["a", "a"]
    assert (h.ep("a").in_flight, h.ep("a").queued) == (1, 0)
    response = json_response(b"[]")
    h.client.calls[1].deferred.callback(response)
    response.chunk(b"[]")
    response.end()
    assert second.body == b"[]" and second.finished
    assert [(r.request_id, r.outcome) for r in h.recorder.records] == [("holder", OK), ("second", OK)]
    h.assert_quiet()


def test_request_timeout_of_the_slot_holder_hands_its_slot_to_the_queued_request() -> None:
    """A slot holder cut off by proxy.request_timeout frees its slot at once for the queued request, which is then sent."""
    h = make(endpoint("a", max_concurrent=1, queue_timeout="30s"), request_timeout="2s")
    h.start(request_id="holder")
    h.clock.advance(1)
    waiting = h.start(request_id="waiting")
    assert h.ep("a").queued == 1
    h.clock.advance(1)  # the holder's deadline: it was sending
    assert h.client.calls[0].cancelled
    assert len(h.client.calls) == 2  # the freed slot went to the waiting one
    h.clock.advance(1)  # the waiting one's deadline, while sending

    assert waiting.code == 504 and waiting.json()["error"]["code"] == "request_timeout"
    assert [(r.request_id, r.outcome) for r in h.recorder.records] == [
        ("holder", REQUEST_TIMEOUT), ("waiting", REQUEST_TIMEOUT)
    ]
    assert h.client.calls[1].cancelled
    h.assert_quiet()


def test_request_timeout_while_queued_behind_a_long_request() -> None:
    """A request still queued when its deadline fires gets 504 request_timeout and leaves the queue, the holder untouched."""
    h = make(endpoint("a", max_concurrent=1, queue_timeout="30s"))
    holder = h.start(request_id="holder")
    # exchanges keep the config they started with: only the next one gets a deadline
    later = {"endpoints": [endpoint("a", max_concurrent=1, queue_timeout="30s")], "proxy": {"request_timeout": "2s"}}
    h.proxy.reconfigure(parse_config(later, "test"))
    waiting = h.start(request_id="waiting")
    assert h.ep("a").queued == 1
    h.clock.advance(2)

    assert waiting.code == 504 and waiting.json()["error"]["code"] == "request_timeout"
    assert (h.ep("a").in_flight, h.ep("a").queued, len(h.client.calls)) == (1, 0, 1)
    (record,) = h.recorder.records
    assert (record.request_id, record.outcome, record.status, record.attempts) == ("waiting", REQUEST_TIMEOUT, 504, 0)
    response = json_response(b"{}")
    h.client.calls[0].deferred.callback(response)
    response.chunk(b"{}")
    response.end()
    assert holder.finished and len(h.client.calls) == 1
    h.assert_quiet()


def test_endpoint_removed_by_a_reload_while_queued_answers_503() -> None:
    """A request queued on an endpoint that a reload removes goes back to routing; with no other candidate it gets 503."""
    h = make(endpoint("a", max_concurrent=1))
    a = h.ep("a")
    holder = h.start(request_id="holder")
    waiting = h.start(request_id="waiting")
    assert a.queued == 1
    h.fleet.reconfigure(parse_config({"endpoints": [endpoint("b")]}, "test"))

    assert a.removed and a.queued == 0
    assert waiting.code == 503 and waiting.json()["error"]["code"] == "no_endpoints_available"
    (record,) = h.recorder.records
    assert (record.request_id, record.outcome, record.attempts) == ("waiting", REJECTED, 0)
    response = json_response(b"{}")
    h.client.calls[0].deferred.callback(response)
    response.chunk(b"{}")
    response.end()
    assert holder.finished and len(h.client.calls) == 1
    assert (a.in_flight, a.queued) == (0, 0)
    h.assert_quiet()


# --------------------------------------------------------------------------- 12. oversized headers


@pytest.mark.parametrize("extra, status", [(0, 200), (1, 502)], ids=["at-limit", "over-limit"])
def test_upstream_headers_over_64kb_are_a_502_and_a_breaker_failure(extra: int, status: int) -> None:
    """Upstream response headers larger than 64 KB are refused with 502 upstream_headers_too_large; exactly 64 KB passes."""
    h = make()
    request = h.start()
    name = b"x-big"
    response = FakeResponse(200, b"OK", {name: [b"x" * (MAX_UPSTREAM_HEADER_BYTES - len(name) + extra)]}, 2)
    h.client.calls[0].deferred.callback(response)
    if status == 200:
        response.chunk(b"{}")
        response.end()
        assert (request.code, request.body, h.recorder.record.outcome) == (200, b"{}", OK)
        assert h.ep("a").failure_count == 0
        h.assert_quiet()
        return

    assert response.transport.calls == ["stopProducing"]  # the body is discarded, its connection closed
    assert request.code == 502 and request.finished
    error = request.json()["error"]
    assert error["code"] == "upstream_headers_too_large"
    assert error["message"] == "endpoint a sent 65537 bytes of response headers (limit 65536)"
    assert request.header(b"x-big") is None
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.endpoint) == (UPSTREAM_ERROR, 502, 1, "a")
    a = h.ep("a")
    assert (a.failure_count, a.breaker.failures) == (1, 1)
    h.assert_quiet()


# --------------------------------------------------------------------------- 13. routing


def test_unknown_model_is_a_404_and_nothing_is_sent_upstream() -> None:
    """A model no endpoint lists is answered 404 model_not_found by routing, listing the available models."""
    h = make()
    request = h.start(model="ai/llama3.2")

    assert h.client.calls == []
    assert request.code == 404 and request.finished
    error = request.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["message"] == "model 'ai/llama3.2' was not found on any endpoint; available models: ai/smollm2"
    assert request.header(b"x-olla-routing-decision") == b"rejected"
    assert request.header(b"x-olla-routing-reason") == b"model_not_found"
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.endpoint, record.error) == (
        REJECTED, 404, 0, None, error["message"]
    )
    assert h.ep("a").request_count == 0
    h.assert_quiet()


@pytest.mark.parametrize(
    "model, code", [(MODEL, "model_unavailable"), (None, "no_endpoints_available")], ids=["model", "model-less"]
)
def test_no_routable_endpoint_is_a_503_and_nothing_is_sent_upstream(model: str | None, code: str) -> None:
    """With every endpoint offline, routing answers 503 (model_unavailable, or no_endpoints_available without a model) with Retry-After."""
    h = make(endpoint("a", check_interval="7s"))
    h.ep("a").status = "offline"
    request = h.start(model=model)

    assert h.client.calls == []
    assert request.code == 503 and request.finished
    assert request.json()["error"]["code"] == code
    assert request.header(b"retry-after") == b"7"
    assert request.header(b"x-olla-routing-decision") == b"rejected"
    assert request.header(b"x-olla-routing-reason") == code.encode()
    record = h.recorder.record
    assert (record.outcome, record.status, record.attempts, record.endpoint) == (REJECTED, 503, 0, None)
    assert h.ep("a").request_count == 0
    h.assert_quiet()


# --------------------------------------------------------------------------- odds and ends


def test_unexpected_upstream_error_is_logged_and_answered_502(logged_failures: list[Failure]) -> None:
    """An exception that is not an UpstreamFailure (a bug) is logged and answered 502, and the slot is freed."""
    h = make(endpoint("a", 100), endpoint("b", 90))
    request = h.start()
    h.client.calls[0].deferred.errback(ZeroDivisionError("oops"))

    assert [f.type for f in logged_failures] == [ZeroDivisionError]
    logged_failures.clear()
    assert len(h.client.calls) == 1
    assert request.code == 502 and request.json()["error"]["message"] == "endpoint a: internal proxy error"
    record = h.recorder.record
    assert (record.outcome, record.status) == (UPSTREAM_ERROR, 502)
    assert h.ep("a").failure_count == 0
    h.assert_quiet()


def test_abort_cuts_the_client_connection() -> None:
    """InFlight.abort_all (shutdown deadline) aborts each live exchange's client connection."""
    h = make()
    request = h.start()
    assert h.inflight.abort_all() == 1
    assert request.transport.aborted == 1
    request.lose_client()
    assert h.client.calls[0].cancelled
    assert h.recorder.record.outcome == CLIENT_DISCONNECTED
    h.assert_quiet()


def test_a_streamed_request_gets_a_hang_limit_from_the_endpoints_usual_head_time() -> None:
    """Once the endpoint has a few head times with its model loaded, a streamed attempt's header timeout is
    hang_factor x their median (at least hang_after); a plain one keeps response_header_timeout; the limit expiring
    is a lost request, retried once on the same endpoint, and the client gets the second answer."""
    h = make(lost_requests={"hang_after": "1s", "hang_factor": 10})
    ep = h.ep("a")
    ep.note_served(MODEL)
    for seconds in (0.2, 0.3, 0.25, 0.4):
        ep.record_head_time(seconds)
    h.start(FakeRequest(body=b'{"model":"ai/smollm2","messages":[]}'), request_id="plain")
    assert h.client.calls[-1].header_timeout is None
    h.client.calls[-1].deferred.callback(json_response(OK_BODY))
    request = h.start(FakeRequest(body=b'{"model":"ai/smollm2","messages":[],"stream":true}'), streamed=True)
    first = h.client.calls[-1]
    assert first.header_timeout == pytest.approx(3.0)  # 10 x the median 0.3 s
    h.clock.advance(3.0)
    first.deferred.errback(UpstreamFailure("a", HEADER_TIMEOUT, "no response headers within 3s"))
    second = h.client.calls[-1]
    assert second is not first and second.endpoint == "a" and second.header_timeout is None  # (once only)
    h.clock.advance(0.01)
    second.deferred.callback(json_response(OK_BODY))
    assert request.code == 200 and ep.failure_count == 1
    assert float(request.header(b"x-olla-overhead-ms")) < 1.0  # the 3 s of the hang are not olladmr's
