"""
One proxied request, from endpoint choice to the last byte.

An :class:`Exchange` is an explicit state machine over :class:`Phase`::

    ROUTING -> (QUEUED ->) SENDING -> (CHECKING ->) RELAYING -> DONE
                  ^            |           |
                  +-- failover +-----------+   (nothing sent to the client yet)

* ROUTING: the router gave candidates; the balancer picks one and a
  concurrency slot is taken (QUEUED while waiting for one).  A request
  about a stored Responses API answer is first bound to the endpoint that
  holds it (LOCATING while the owner is probed for), and never leaves it.
* SENDING: the request is out; waiting for the upstream's headers.  A
  failure that cannot have started work upstream (refused, unreachable,
  connect timeout) goes back to ROUTING for another endpoint; a reset on a
  stale pooled connection is retried once on a fresh connection.
* CHECKING: a 503 is read (64 KB at most) to tell DMR's "Loading model"
  (fail over) from any other 503 (passed through); so is a 502 or 500 of
  unknown length, to tell a lost request (empty: retried once) from an
  answer.
* RELAYING: a :class:`~olladmr.proxy.relay.ResponseRelay` owns the body.
* DONE: the record went to the observers; every later event is ignored.

Leaving DONE is impossible, and entering it (:meth:`Exchange._complete`)
cancels whatever is pending, releases the slot and stops the deadline, so
no callback has to remember what was in flight.  The client leaving moves
any phase to DONE, except RELAYING, which the relay ends itself.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol as TypingProtocol, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from .._twisted_compat import put_header
from ..bodies import read_body
from ..config.schema import Config
from ..errors import ClientError, bad_gateway, dialect_for_api, gateway_timeout, unavailable, write_error
from ..failures import HEADER_TIMEOUT, UpstreamFailure
from ..fleet.balancer import Balancer
from ..fleet.models import normalise_model
from ..fleet.routing import RoutingDecision, route
from ..fleet.prefix import CHARS_PER_TOKEN
from ..fleet.sessions import OLLA_SOURCE_NAMES, Placement, SessionRouter
from ..fleet.state import EndpointState, Fleet, QueueFull, QueueTimeout, runner_key
from .headers import ResponseHeaders, add_response_headers, copy_response_headers, upstream_request_headers
from .record import CLIENT_DISCONNECTED, OK, REJECTED, REQUEST_TIMEOUT, UPSTREAM_ERROR, ExchangeRecord, ProxyCall
from .affinity import ResponseAffinity
from .relay import (
    ANTHROPIC_STREAM,
    OLLAMA_STREAM,
    OPENAI_STREAM,
    RESPONSES_STREAM,
    ResponseIdSniffer,
    ResponseRelay,
    StreamWatch,
    UsageTail,
)
from .rewrite import rewrite_model
from .upstream import Body, ProxiedResponse, Upstream, request_body

log = Logger()

BACKEND_TYPE = b"docker-model-runner"
LOADING_MARKER = b"Loading model"
MAX_UPSTREAM_HEADER_BYTES = 64 * 1024
MAX_503_BODY = 64 * 1024
_SSE = b"text/event-stream"
_STREAMS = {"anthropic": ANTHROPIC_STREAM, "responses": RESPONSES_STREAM}
#: A real DMR's answers to a request it lost before any byte of an answer, when their body is empty.
LOST_STATUSES = (500, 502)
#: The routing reasons of a request bound to the endpoint holding its stored Responses API answer.
BOUND = ("response_affinity", "response_located")


class Phase(enum.Enum):
    """Where an exchange is; see the module docstring."""

    ROUTING = "routing"
    LOCATING = "locating"
    QUEUED = "queued"
    SENDING = "sending"
    CHECKING = "checking"
    RELAYING = "relaying"
    DONE = "done"


class ExchangeHost(TypingProtocol):
    """What an exchange needs from the proxy that runs it (:class:`~olladmr.proxy.proxy.Proxy`)."""

    fleet: Fleet

    @property
    def client(self) -> Upstream: ...

    clock: IReactorTime
    config: Config
    balancer: Balancer
    responses: ResponseAffinity
    sessions: SessionRouter

    def mark_offline(self, endpoint: EndpointState, reason: str) -> None: ...

    def started(self, exchange: Exchange) -> None: ...

    def finished(self, exchange: Exchange) -> None: ...


class Exchange:
    """Owns one client request through the proxy: routing, attempts, failover, relay, and its record."""

    __slots__ = (
        "host", "request", "call", "config", "phase", "remaining", "decision", "failures",
        "_pending", "_relay", "_slot", "_deadline", "_placement", "_prefill", "record",
        "_waited", "_wait_from", "_sent_at", "_head_at", "_lost", "_hang", "_loaded_at_send",
        "_runner_sent",
    )

    def __init__(self, host: ExchangeHost, request: Request, call: ProxyCall) -> None:
        self.host = host
        self.request = request
        self.call = call
        self.config = host.config  # the config this request started with, kept to the end
        self.phase = Phase.ROUTING
        self.remaining: list[EndpointState] = []
        self.decision: RoutingDecision | None = None
        self.failures: list[UpstreamFailure] = []
        self._pending: Deferred[Any] | None = None
        self._relay: ResponseRelay | None = None
        self._slot: EndpointState | None = None
        self._deadline: IDelayedCall | None = None
        self._placement: Placement | None = None
        self._prefill: tuple[EndpointState, int] | None = None  # the prefill work this attempt added there
        # The overhead header: the time not olladmr's own (queued, probing for a response's owner, attempts that
        # failed over), when the answering attempt was sent, when its head arrived.
        self._waited = 0.0
        self._wait_from: float | None = None
        self._sent_at = call.arrived
        self._head_at: float | None = None
        self._lost = 0  # retries of a request an upstream lost (an empty 502, a hang before headers): at most one
        self._hang: tuple[float, float] | None = None  # this attempt's hang limit and the usual head time
        self._loaded_at_send = False
        self._runner_sent = ""  # the runner (/engines/ps key) of the model at the endpoint of the latest attempt
        client = request.getClientAddress()
        self.record = ExchangeRecord(
            request_id=call.request_id,
            method=call.method.decode("latin-1"),
            path=request.uri.decode("latin-1"),
            route=call.route,
            client=getattr(client, "host", "") or "",
            model=call.model,
            arrived=call.arrived,
        )

    # -- lifecycle

    def start(self) -> None:
        """Route the request and make the first attempt."""
        try:
            self.decision = route(self.host.fleet, self.call.model, self.call.model_key, self.call.alias)
        except ClientError as error:
            self._fail(error)
            return
        self.remaining = list(self.decision.candidates)
        self.host.started(self)
        self.request.notifyFinish().addErrback(self._client_gone)
        total = self.config.proxy.request_timeout
        if total > 0:
            self._deadline = self.host.clock.callLater(total, self._request_timed_out)
        if self.call.response_id is not None:
            self._bind_response(self.call.response_id)  # that rule wins over every session key
            return
        session = self.call.session
        if session is not None:
            self._placement = self.host.sessions.place(
                session, self.remaining, self.call.model_key, self.call.route, self.decision.names
            )
            self.remaining = list(self._placement.order)
        self._next()

    def abort(self) -> None:
        """Cut this exchange off (shutdown deadline): the client connection is aborted."""
        transport = self.request.transport
        if transport is not None:
            cast(ITCPTransport, transport).abortConnection()  # the client's TCP (or TLS) connection

    def _client_gone(self, reason: Failure) -> None:
        if self.phase is Phase.DONE:
            return
        if self.phase is Phase.RELAYING and self._relay is not None:
            self._relay.stop(CLIENT_DISCONNECTED)  # the relay's end completes us
            return
        self._complete(CLIENT_DISCONNECTED)

    def _request_timed_out(self) -> None:
        self._deadline = None
        if self.phase is Phase.RELAYING and self._relay is not None:
            self._relay.stop(REQUEST_TIMEOUT)
            return
        self._fail(
            gateway_timeout(
                f"the request took longer than proxy.request_timeout ({self.config.proxy.request_timeout:g}s)",
                "request_timeout",
            ),
            outcome=REQUEST_TIMEOUT,
        )

    # -- LOCATING: a stored response's owner

    def _bind_response(self, response_id: str) -> None:
        affinity = self.host.responses
        owner = affinity.owner(response_id)
        if owner is not None:
            endpoint = self.host.fleet.get(owner)
            if endpoint is None:  # it left the configuration: whoever still has the answer must say so
                affinity.forget(response_id)
            elif not endpoint.routable:
                self._fail(
                    unavailable(
                        f"response {response_id} is held by endpoint {owner}, which is not available now "
                        f"({endpoint.status}: {endpoint.status_reason}); only it can continue this conversation",
                        "response_endpoint_unavailable",
                        max(1, int(endpoint.breaker.retry_after() or endpoint.config.check_interval)),
                    )
                )
                return
            else:
                self._pin(endpoint, "response_affinity")
                return
        self.phase = Phase.LOCATING
        self._waiting()
        d = affinity.locate(response_id, [ep for ep in self.remaining if ep.routable])
        self._pending = d
        d.addCallbacks(self._located, self._locate_failed)

    def _located(self, endpoint: EndpointState | None) -> None:
        self._pending = None
        self._waited_until_now()
        if self.phase is Phase.DONE:
            return
        if endpoint is None or not endpoint.routable:
            self._next()  # nobody holds it: the endpoint chosen answers DMR's own "not found"
            return
        self._pin(endpoint, "response_located")

    def _locate_failed(self, failure: Failure) -> None:
        self._pending = None
        self._waited_until_now()
        if self.phase is not Phase.DONE and not failure.check(CancelledError):
            self._next()

    def _pin(self, endpoint: EndpointState, reason: str) -> None:
        self.decision = RoutingDecision([endpoint], "routed", reason)
        self.remaining = [endpoint]
        self._next()

    # -- ROUTING and QUEUED

    def _next(self) -> None:
        self.phase = Phase.ROUTING
        choices = [ep for ep in self.remaining if ep.routable]
        if not choices:
            self._fail(self._exhausted())
            return
        if self._placement is not None:
            endpoint = choices[0]  # the session's order (bounded load and loaded models already weighed)
        else:
            pool = [ep for ep in choices if ep.has_free_slot] or choices
            key = self.call.model_key
            if key is not None and len(pool) > 1 and self.host.sessions.enabled:
                pool = self.host.sessions.prefer_loaded(pool, runner_key(self.call.route, key))
            endpoint = self.host.balancer.pick(pool)
        self.remaining.remove(endpoint)
        try:
            waiting = endpoint.acquire()
        except QueueFull:
            self._fail(
                unavailable(
                    f"endpoint {endpoint.name} is at max_concurrent={endpoint.config.max_concurrent} "
                    f"and its queue of {endpoint.config.queue_size} is full",
                    "queue_full",
                    max(1, int(endpoint.config.check_interval)),
                )
            )
            return
        if waiting is None:
            self._slot = endpoint
            self._send(endpoint)
            return
        self.phase = Phase.QUEUED
        self._waiting()
        self._pending = waiting
        waiting.addCallbacks(self._slot_granted, self._slot_failed, callbackArgs=(endpoint,), errbackArgs=(endpoint,))

    def _slot_granted(self, _: object, endpoint: EndpointState) -> None:
        self._pending = None
        self._waited_until_now()
        if self.phase is Phase.DONE:  # granted while we were finishing: give it back
            endpoint.release()
            return
        self._slot = endpoint
        self._send(endpoint)

    def _slot_failed(self, failure: Failure, endpoint: EndpointState) -> None:
        self._pending = None
        self._waited_until_now()
        if self.phase is Phase.DONE:
            return
        if failure.check(QueueTimeout):
            self._fail(
                unavailable(
                    f"no slot on endpoint {endpoint.name} within queue_timeout "
                    f"({endpoint.config.queue_timeout:g}s); it is at max_concurrent={endpoint.config.max_concurrent}",
                    "queue_timeout",
                    max(1, int(endpoint.config.queue_timeout)),
                )
            )
        else:  # the endpoint was removed by a reload while we waited
            self._next()

    # -- SENDING

    def _send(self, endpoint: EndpointState, fresh: bool = False) -> None:
        self.phase = Phase.SENDING
        request = self.request
        config = endpoint.config
        endpoint.record_attempt()
        key = self.call.model_key
        if key is not None:
            self._runner_sent = self._runner(endpoint, key)
            self._loaded_at_send = endpoint.model_loaded(self._runner_sent) is True
            endpoint.note_routed(self._runner_sent)  # a load starts, unless loaded
        else:
            self._loaded_at_send = False
        session = self.call.session
        if session is not None and session.blocks is not None and self.call.model_key is not None:
            self._prefilled()  # (a retry on a fresh connection: count its work once)
            self._prefill = (endpoint, self.host.sessions.sending(endpoint, self.call.model_key, session.blocks))
        self.record.attempts += 1
        self.record.endpoint = endpoint.name
        client = request.getClientAddress()
        headers = upstream_request_headers(
            request.requestHeaders,
            request_id=self.call.request_id.encode(),
            client_ip=(getattr(client, "host", "") or "unix").encode(),
            scheme=b"https" if request.isSecure() else b"http",
            endpoint_headers=config.encoded_headers,
            forward_credentials=config.forward_client_auth and self.call.forward_credentials,
        )
        url = config.url.encode() + self.call.upstream_path
        real = self.decision.names.get(endpoint.name) if self.decision is not None else None
        body: Body
        if real is not None and request.content is not None:  # a model alias: this endpoint's name for it
            request.content.seek(0)
            try:
                body = rewrite_model(request.content.read(), real, self.call.model_member)
                self.record.model = real
            except ValueError:  # routes validated it as JSON: not expected; send it as it came
                log.failure("could not rewrite the model of request {request_id}", request_id=self.call.request_id)
                body = request_body(request.content)
        else:
            body = request_body(request.content)
        self._sent_at = self.host.clock.seconds()
        self._hang = self._hang_limit(endpoint)
        d = self.host.client.request(endpoint.name, self.call.method, url, headers, body, fresh=fresh,
                                     header_timeout=self._hang[0] if self._hang is not None else None)
        self._pending = d
        d.addCallbacks(self._got_response, self._got_failure, callbackArgs=(endpoint,), errbackArgs=(endpoint, fresh))

    def _waiting(self) -> None:
        self._wait_from = self.host.clock.seconds()

    def _attempt_over(self) -> None:
        """An attempt failed over: the time since it was sent was the upstream's, not olladmr's."""
        self._waited += self.host.clock.seconds() - self._sent_at

    def _waited_until_now(self) -> None:
        if self._wait_from is not None:
            self._waited += self.host.clock.seconds() - self._wait_from
            self._wait_from = None

    def _overhead(self) -> float:
        """
        olladmr's own time on this answer so far (``X-Olla-Overhead-Ms``):
        from arrival until the answering attempt went upstream, less the
        time spent queued for a slot, probing for a stored response's owner
        and in attempts that failed over; plus the time since the upstream's
        head arrived.
        """
        now = self.host.clock.seconds()
        before = self._sent_at - self.call.arrived - self._waited
        after = now - self._head_at if self._head_at is not None else 0.0
        self.record.overhead = max(0.0, before) + after
        return self.record.overhead

    def _runner(self, endpoint: EndpointState, model_key: str) -> str:
        """The runner ``endpoint``'s ``/engines/ps`` knows this request's model by (an alias: its real model there)."""
        real = self.decision.names.get(endpoint.name) if self.decision is not None else None
        return runner_key(self.call.route, normalise_model(real) if real is not None else model_key)

    def _prefilled(self) -> None:
        """The attempt ended: its prefill no longer waits on the endpoint."""
        if self._prefill is not None:
            self.host.sessions.prefilled(*self._prefill)
            self._prefill = None

    def _first_token(self) -> None:
        """The first bytes of the answer came: the prompt's prefill is done there."""
        prefill = self._prefill
        self._prefilled()
        session = self.call.session
        if prefill is not None and session is not None and session.blocks is not None and self.call.model_key:
            self.host.sessions.cached(prefill[0], self.call.model_key, session.blocks, "first_token")

    def _got_failure(self, failure: Failure, endpoint: EndpointState, fresh: bool) -> None:
        self._pending = None
        hang, self._hang = self._hang, None
        self._prefilled()
        if self.phase is Phase.DONE or failure.check(CancelledError):
            # We cancelled it (the client left, a deadline, a hang): whatever Twisted
            # reports says nothing about the endpoint.
            return
        self._attempt_over()
        err = failure.value
        if hang is not None and isinstance(err, UpstreamFailure) and err.kind == HEADER_TIMEOUT:
            self._lost_answer(endpoint, f"sent no headers within {hang[0]:.1f}s (usually {hang[1] * 1000:.0f}ms)")
            return
        if not isinstance(err, UpstreamFailure):
            log.failure("unexpected upstream failure", failure)
            self._release()
            self._fail(bad_gateway(f"endpoint {endpoint.name}: internal proxy error"))
            return
        if err.stale_connection and not fresh:
            log.debug("{endpoint}: pooled connection was stale, retrying on a fresh one", endpoint=endpoint.name)
            self._send(endpoint, fresh=True)
            return
        self._release()
        endpoint.record_failure()
        self.failures.append(err)
        log.warn(
            "request {request_id} to {endpoint} failed: {kind}: {detail}",
            request_id=self.record.request_id,
            endpoint=endpoint.name,
            kind=err.kind,
            detail=err.detail,
        )
        if err.marks_offline:
            self.host.mark_offline(endpoint, f"{err.kind} during a request")
        if err.safe_to_retry:
            self.record.failovers += 1
            self._next()
            return
        self._fail(self._error_for(err))

    def _got_response(self, response: ProxiedResponse, endpoint: EndpointState) -> None:
        self._pending = None
        self._hang = None
        self._head_at = self.host.clock.seconds()
        if self.phase is Phase.DONE:
            response.deliverBody(_Discard())
            return
        if response.code < 300 and self._loaded_at_send and self.call.streamed:
            endpoint.record_head_time(self._head_at - self._sent_at)
        size = response.head_size
        if size > MAX_UPSTREAM_HEADER_BYTES:
            response.deliverBody(_Discard())
            self._release()
            endpoint.record_failure()
            self._fail(
                bad_gateway(
                    f"endpoint {endpoint.name} sent {size} bytes of response headers "
                    f"(limit {MAX_UPSTREAM_HEADER_BYTES})",
                    "upstream_headers_too_large",
                )
            )
            return
        if response.code == 503 and self._has_alternative():
            self._check_body(response, endpoint)
            return
        if response.code in LOST_STATUSES and self._may_retry_lost() and response.length in (0, UNKNOWN_LENGTH):
            if response.length == 0:
                response.deliverBody(_Discard())
                self._lost_answer(endpoint, f"answered an empty {response.code}")
            else:
                self._check_body(response, endpoint)  # (read it: an empty one is a lost request, any other passes)
            return
        self._relay_response(response, endpoint)

    # -- CHECKING

    def _check_body(self, response: ProxiedResponse, endpoint: EndpointState) -> None:
        # DMR builds before v1.0.11 could answer llama.cpp's 503 "Loading
        # model" while a runner starts, and a DMR that lost a request answers
        # an empty 502 or 500: nothing was generated, so trying another
        # endpoint (or, for a lost one, this one again) is safe.  Any other
        # answer is passed through.
        self.phase = Phase.CHECKING
        d = read_body(response, MAX_503_BODY)
        self._pending = d
        d.addCallbacks(
            self._got_checked_body, self._got_check_failure, callbackArgs=(response, endpoint), errbackArgs=(endpoint,)
        )

    def _got_checked_body(self, body: bytes, response: ProxiedResponse, endpoint: EndpointState) -> None:
        self._pending = None
        if self.phase is Phase.DONE:
            return
        if response.code in LOST_STATUSES and not body.strip() and self._may_retry_lost():
            self._lost_answer(endpoint, f"answered an empty {response.code}")
            return
        if response.code == 503 and LOADING_MARKER in body:
            self._attempt_over()
            self._prefilled()
            self._release()
            self.record.failovers += 1
            log.info("{endpoint} is loading the model; trying another endpoint", endpoint=endpoint.name)
            self._next()
            return
        endpoint.record_response(response.code)
        self._start_response(response, endpoint)
        self.request.write(body)
        self.request.finish()
        self.record.bytes_sent = len(body)
        self._complete(OK)

    def _got_check_failure(self, failure: Failure, endpoint: EndpointState) -> None:
        self._pending = None
        if self.phase is Phase.DONE or failure.check(CancelledError):
            return
        self._release()
        endpoint.record_failure()
        self.failures.append(
            UpstreamFailure(endpoint.name, "bad_response", f"could not read its 503 answer: {failure.getErrorMessage()}")
        )
        self.record.failovers += 1
        self._next()  # a 503 means nothing was generated: another endpoint is safe

    def _has_alternative(self) -> bool:
        return any(ep.routable for ep in self.remaining)

    # -- lost requests: an empty 502, or a hang before any header

    def _may_retry_lost(self) -> bool:
        return self.config.proxy.lost_requests.retry and self._lost == 0

    def _hang_limit(self, endpoint: EndpointState) -> tuple[float, float] | None:
        """
        How long this attempt of a streamed request may wait for headers
        before it counts as lost (far longer than this endpoint's usually
        take), with that usual time -- only while its model is loaded there
        (a cold load is not a hang) and no lost request was retried yet;
        ``None``: ``proxy.response_header_timeout`` alone.
        """
        if not self.call.streamed or not self._loaded_at_send or not self._may_retry_lost():
            return None  # (a plain answer's headers wait for the whole answer: its time says nothing of a hang)
        usual = endpoint.usual_head_time()
        if usual is None:
            return None
        settings = self.config.proxy.lost_requests
        limit = max(settings.hang_after, settings.hang_factor * usual)
        return (limit, usual) if limit < self.config.proxy.response_header_timeout else None

    def _lost_answer(self, endpoint: EndpointState, what: str) -> None:
        """
        ``endpoint`` lost the request before any byte of an answer: retry it
        once, on another endpoint that has the model, else on the same one
        (a request bound to its Responses owner has no other).
        """
        self._lost += 1
        self._attempt_over()
        self._prefilled()
        self._release()
        endpoint.record_failure()
        self.failures.append(UpstreamFailure(endpoint.name, "lost_request", what))
        self.record.failovers += 1
        log.warn("request {request_id}: endpoint {endpoint} {what}; retrying it once",
                 request_id=self.record.request_id, endpoint=endpoint.name, what=what)
        if not self._has_alternative():
            self.remaining.insert(0, endpoint)
        self._next()

    # -- RELAYING

    def _start_response(self, response: ProxiedResponse, endpoint: EndpointState) -> bool:
        """Set the status and headers (the placement's: :meth:`_placement_headers`); whether the body is SSE."""
        request = self.request
        now = self.host.clock.seconds()
        self.record.headers_at = now
        self.record.status = response.code
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        out.removeHeader(b"server")
        if isinstance(out, ResponseHeaders):
            out.take_upstream(response.pairs)  # passed through as the upstream sent them, no Headers round-trip
        else:  # (a test's plain Headers)
            copy_response_headers(response.headers, out)
        if isinstance(response.length, int):  # (else UNKNOWN_LENGTH)
            # The client takes Content-Length out of the headers; give it back.
            put_header(out, b"content-length", b"%d" % response.length)
        if self.call.response_headers:
            add_response_headers(out, self.call.response_headers)
        request.defaultContentType = None
        put_header(out, b"x-olla-endpoint", endpoint.name.encode())
        put_header(out, b"x-olla-backend-type", BACKEND_TYPE)
        real = self.decision.names.get(endpoint.name) if self.decision is not None else None
        if real is not None:
            put_header(out, b"x-olla-model", real.encode("utf-8", "replace"))
            put_header(out, b"x-olla-model-alias", (self.call.model or "").encode("utf-8", "replace"))
        elif self.call.model is not None:
            put_header(out, b"x-olla-model", self.call.model.encode("utf-8", "replace"))
        put_header(out, b"x-olla-response-time", b"%dms" % round((now - self.call.arrived) * 1000))
        put_header(out, b"x-olla-overhead-ms", b"%.3f" % (self._overhead() * 1000))
        if self.decision is not None:
            for name, value in self.decision.headers().items():
                put_header(out, name, value)
        self._placement_headers(out, response.code, endpoint)
        first = response.header(b"content-type")
        if first and first.lower().startswith(_SSE):
            put_header(out, b"cache-control", b"no-cache")
            put_header(out, b"x-accel-buffering", b"no")
            return True
        return False

    def _placement_headers(self, out: Headers, code: int, endpoint: EndpointState) -> None:
        """
        The answer is from ``endpoint``: tell the session router where this
        session was served (its pin and verdict) and say so in the headers.
        """
        session = self.call.session
        if session is not None and self._placement is not None and code < 300:
            placement = self._placement
            verdict = self.host.sessions.served(session, placement, endpoint)
            put_header(out, b"x-olla-sticky-session", verdict.encode())
            put_header(out, b"x-olla-sticky-key-source", OLLA_SOURCE_NAMES[session.source].encode())
            put_header(out, b"x-olla-placement", placement.reason.encode())
            if placement.matched is not None and session.blocks is not None:
                put_header(out, b"x-olla-prefix-match", b"%d/%d" % (
                    placement.matched.get(endpoint.name, 0) // CHARS_PER_TOKEN, session.blocks.chars // CHARS_PER_TOKEN))
            if session.session_id is not None:
                put_header(out, b"x-olla-session-id", session.session_id)
        elif self.call.affinity_reported and (session is None or code < 300):
            put_header(out, b"x-olla-sticky-session", b"disabled")
            key = self.call.model_key
            cold = key is not None and endpoint.model_loaded(self._runner_sent) is False
            put_header(out, b"x-olla-placement", b"cold" if cold else b"balance")

    def _relay_response(self, response: ProxiedResponse, endpoint: EndpointState) -> None:
        endpoint.record_response(response.code)
        if response.code < 300 and self.call.model_key is not None:
            endpoint.note_served(self._runner_sent)  # its runner is loaded there now
        is_sse = self._start_response(response, endpoint)
        api = self.call.api
        watch = StreamWatch(_STREAMS.get(api, OPENAI_STREAM)) if is_sse else None
        if self.call.ndjson and response.code == 200 and not is_sse:
            watch = StreamWatch(OLLAMA_STREAM)  # (its headers pass through as DMR sent them)
            put_header(self.request.responseHeaders, b"x-accel-buffering", b"no")
            is_sse = True
        relay = ResponseRelay(
            self.request,
            self.host.clock,
            self.config.proxy.read_timeout,
            watch,
            self._relay_done,
            endpoint.name,
            UsageTail(head=api == "anthropic") if response.code < 300 and self.call.model is not None else None,
            ResponseIdSniffer() if self.call.capture_response and response.code == 200 else None,
            self._first_token if self._prefill is not None else None,
        )
        self.record.streamed = is_sse
        self._relay = relay
        self.phase = Phase.RELAYING
        response.deliverBody(relay)

    def _relay_done(self, outcome: str, sent: int) -> None:
        self.record.bytes_sent = sent
        relay = self._relay
        if relay is not None:
            self.record.first_byte_at = relay.first_byte_at
            if relay.usage is not None:
                self.record.usage = relay.usage.usage()
            if outcome == OK and relay.sniffer is not None and relay.sniffer.found and self.record.endpoint:
                self.host.responses.remember(relay.sniffer.found, self.record.endpoint)
        session = self.call.session
        if outcome == OK and session is not None and session.blocks is not None and self._slot is not None:
            if self.call.model_key and self.record.status < 300:
                self.host.sessions.cached(self._slot, self.call.model_key, session.blocks, "finish")
        if outcome == OK and self.call.forget_response and self.call.response_id and self.record.status == 200:
            self.host.responses.forget(self.call.response_id)
        self._complete(outcome)

    # -- DONE

    def _release(self) -> None:
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def _exhausted(self) -> ClientError:
        decision = self.decision
        if self.call.response_id is not None and decision is not None and decision.reason in BOUND:
            # Bound to the one endpoint holding the stored response: another cannot continue it.
            owner = decision.candidates[0] if decision.candidates else None
            detail = "; ".join(f.detail for f in self.failures) or "not available"
            retry = max(1, int(owner.config.check_interval)) if owner is not None else 5
            return unavailable(
                f"response {self.call.response_id} is held by endpoint {owner.name if owner else '?'}, which could "
                f"not be reached ({detail}); only it can continue this conversation",
                "response_endpoint_unavailable",
                retry,
            )
        if not self.failures:
            return unavailable("no DMR endpoint is available for this request right now", "no_endpoints_available", 5)
        tried = "; ".join(f"{f.endpoint}: {f.detail}" for f in self.failures)
        if all(f.kind in ("connect_timeout", HEADER_TIMEOUT) for f in self.failures):
            return gateway_timeout(f"every endpoint timed out: {tried}", "upstream_timeout")
        return bad_gateway(f"could not reach any DMR endpoint: {tried}")

    def _error_for(self, err: UpstreamFailure) -> ClientError:
        if err.kind == HEADER_TIMEOUT:
            return gateway_timeout(
                f"endpoint {err.endpoint} sent no response headers within proxy.response_header_timeout "
                f"({self.config.proxy.response_header_timeout:g}s)",
                "upstream_timeout",
            )
        return bad_gateway(f"endpoint {err.endpoint}: {err.detail}", err.kind)

    def _fail(self, error: ClientError, outcome: str | None = None) -> None:
        """Answer ``error`` (if the client is still there) and finish."""
        if self.phase is Phase.DONE:
            return
        if self.decision is not None and error.status >= 500:
            for name, value in self.decision.headers().items():
                error.headers.setdefault(name, value)
        self.record.status = error.status
        self.record.error = error.message
        write_error(self.request, error, dialect_for_api(self.call.api))
        self._complete(outcome or (UPSTREAM_ERROR if error.status in (502, 504) else REJECTED))

    def _complete(self, outcome: str) -> None:
        """Enter DONE: cancel what is pending, free the slot, stop the deadline, hand the record over."""
        if self.phase is Phase.DONE:
            return
        self.phase = Phase.DONE
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self._prefilled()
        self._release()
        self._relay = None  # (it holds our _relay_done: no reference cycle left for the collector to find)
        self.record.outcome = outcome
        self.record.ended = self.host.clock.seconds()
        self.host.finished(self)


class _Discard(Protocol):
    """Swallows a response body we no longer want, closing its connection."""

    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()  # deliverBody's transport is an IPushProducer
