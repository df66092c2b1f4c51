"""
One proxied request, from endpoint choice to the last byte.

:class:`Proxy` holds what every exchange needs (fleet, balancer, upstream
client, clock, configuration, observers).  :class:`Exchange` owns a single
client request: it asks the router for candidates, lets the balancer pick,
waits for a concurrency slot, sends the request, fails over while that is
safe (nothing sent to the client yet, upstream cannot have started), and
hands the response to a :class:`~olladmr.streaming.ResponseRelay`.  When
the client goes away, whatever is pending upstream is cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IRequest, IResponse

from .balancer import Balancer, make_balancer
from .config import Config
from .errors import ClientError, bad_gateway, gateway_timeout, unavailable, write_error
from .fleet import EndpointState, Fleet, QueueFull, QueueTimeout
from .headers import copy_response_headers, upstream_request_headers
from .routing import RoutingDecision, route
from .streaming import CLIENT_DISCONNECTED, OK, REQUEST_TIMEOUT, ResponseRelay, StreamWatch, UsageTail
from .upstream import HEADER_TIMEOUT, UpstreamClient, UpstreamFailure, body_producer, read_body

log = Logger()

BACKEND_TYPE = b"docker-model-runner"
_LOADING_MARKER = b"Loading model"
MAX_UPSTREAM_HEADER_BYTES = 64 * 1024
_SSE = b"text/event-stream"


@dataclass
class ProxyCall:
    """What the routes layer decided about a request before it is proxied."""

    method: bytes
    upstream_path: bytes  # the DMR path with its query string
    route: str  # e.g. "chat/completions", "models"
    model: str | None = None
    model_key: str | None = None
    arrived: float = 0.0


@dataclass
class ExchangeRecord:
    """What happened to one proxied request; handed to observers when it ends."""

    request_id: str
    method: str
    path: str
    route: str
    client: str
    model: str | None
    endpoint: str | None = None
    status: int = 0
    outcome: str = OK
    bytes_sent: int = 0
    arrived: float = 0.0
    headers_at: float | None = None
    first_byte_at: float | None = None
    ended: float = 0.0
    attempts: int = 0
    failovers: int = 0
    error: str | None = None
    streamed: bool = False
    usage: dict[str, Any] | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens over generation time (streams: headers to end; otherwise until headers)."""
        tokens = (self.usage or {}).get("completion_tokens")
        if not isinstance(tokens, int) or tokens <= 0 or self.headers_at is None:
            return None
        seconds = (self.ended - self.headers_at) if self.streamed else (self.headers_at - self.arrived)
        return tokens / seconds if seconds > 0 else None

    def fields(self) -> dict[str, Any]:
        """The access-log fields of this exchange."""
        ttfb = None if self.headers_at is None else round((self.headers_at - self.arrived) * 1000, 2)
        usage = self.usage or {}
        return {
            "request_id": self.request_id,
            "client": self.client,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "endpoint": self.endpoint,
            "status": self.status,
            "bytes": self.bytes_sent,
            "ttfb_ms": ttfb,
            "total_ms": round((self.ended - self.arrived) * 1000, 2),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "attempts": self.attempts,
            "failovers": self.failovers,
            "outcome": self.outcome,
            "error": self.error,
        }


class ExchangeObserver(TypingProtocol):
    def exchange_done(self, record: ExchangeRecord) -> None: ...


class HealthHooks(TypingProtocol):
    """What the proxy tells the health monitor about real traffic."""

    def mark_offline(self, endpoint: EndpointState, reason: str) -> None: ...


class Proxy:
    """Shared machinery for exchanges: fleet, balancer, client, clock, config."""

    def __init__(self, fleet: Fleet, client: UpstreamClient, clock: IReactorTime, config: Config) -> None:
        self.fleet = fleet
        self.client = client
        self.clock = clock
        self.config = config
        self.balancer: Balancer = make_balancer(config.proxy.load_balancer)
        self.observers: list[ExchangeObserver] = []
        self.health: HealthHooks | None = None
        self.gate: Any = None  # olladmr.gate.Gate: credentials policy and response headers
        self.active: set[Exchange] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def when_idle(self) -> Deferred[None]:
        """Fires when no exchange is in flight (at once if none is)."""
        d: Deferred[None] = Deferred(lambda d: self._idle_waiters.remove(d) if d in self._idle_waiters else None)
        if not self.active:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    def configure(self, config: Config) -> None:
        """Use ``config`` for new exchanges; running ones keep what they started with."""
        if config.proxy.load_balancer != self.balancer.name:
            self.balancer = make_balancer(config.proxy.load_balancer)
        self.config = config
        self.client.configure(config.proxy)

    def handle(self, request: IRequest, call: ProxyCall) -> None:
        """Proxy ``request``; the exchange finishes it."""
        Exchange(self, request, call).start()

    def mark_offline(self, endpoint: EndpointState, reason: str) -> None:
        if self.health is not None:
            self.health.mark_offline(endpoint, reason)

    def done(self, exchange: Exchange) -> None:
        self.active.discard(exchange)
        if not self.active and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        for observer in self.observers:
            try:
                observer.exchange_done(exchange.record)
            except Exception:
                log.failure("exchange observer failed")


class Exchange:
    """One client request through the proxy: routing, attempts, relay."""

    def __init__(self, proxy: Proxy, request: IRequest, call: ProxyCall) -> None:
        self.proxy = proxy
        self.request = request
        self.call = call
        self.config = proxy.config  # the config this request started with, kept to the end
        self.remaining: list[EndpointState] = []
        self.decision: RoutingDecision | None = None
        self.failures: list[UpstreamFailure] = []
        self._pending: Deferred[Any] | None = None
        self._relay: ResponseRelay | None = None
        self._slot: EndpointState | None = None
        self._deadline: IDelayedCall | None = None
        self.gone = False
        self.completed = False
        self._cancelling = False
        client = request.getClientAddress()
        self.record = ExchangeRecord(
            request_id=request.request_id,
            method=call.method.decode("latin-1"),
            path=request.uri.decode("latin-1"),
            route=call.route,
            client=getattr(client, "host", "") or "",
            model=call.model,
            arrived=call.arrived,
        )

    # -- lifecycle

    def start(self) -> None:
        try:
            self.decision = route(self.proxy.fleet, self.call.model, self.call.model_key)
        except ClientError as error:
            self._fail(error)
            return
        self.remaining = list(self.decision.candidates)
        self.proxy.active.add(self)
        self.request.notifyFinish().addBoth(self._request_finished)
        total = self.config.proxy.request_timeout
        if total > 0:
            self._deadline = self.proxy.clock.callLater(total, self._request_timed_out)
        self._next()

    def abort(self) -> None:
        """Cut this exchange off (shutdown deadline): the client connection is aborted."""
        transport = getattr(self.request, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _request_finished(self, result: object) -> None:
        if isinstance(result, Failure) and not self.completed:
            self.gone = True
            self.record.outcome = CLIENT_DISCONNECTED
            if self._pending is not None:
                pending, self._pending = self._pending, None
                pending.cancel()
            if self._relay is not None:
                self._relay.stop(CLIENT_DISCONNECTED)
            elif not self.completed:
                self._complete(CLIENT_DISCONNECTED)

    def _request_timed_out(self) -> None:
        self._deadline = None
        if self._relay is not None:
            self._relay.stop(REQUEST_TIMEOUT)
            return
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._cancelling = True
            pending.cancel()
        self._release()
        self._fail(
            gateway_timeout(
                f"the request took longer than proxy.request_timeout ({self.config.proxy.request_timeout:g}s)",
                "request_timeout",
            ),
            outcome=REQUEST_TIMEOUT,
        )

    # -- attempts

    def _next(self) -> None:
        if self.gone or self.completed:
            return
        choices = [ep for ep in self.remaining if ep.routable]
        if not choices:
            self._fail(self._exhausted())
            return
        free = [ep for ep in choices if ep.has_free_slot]
        endpoint = self.proxy.balancer.pick(free or choices)
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
        self._pending = waiting

        def slot_granted(_: object) -> None:
            self._pending = None
            self._slot = endpoint
            self._send(endpoint)

        def slot_failed(failure: Failure) -> None:
            self._pending = None
            if failure.check(CancelledError) and self.gone:
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
            else:
                self._next()

        waiting.addCallbacks(slot_granted, slot_failed)

    def _send(self, endpoint: EndpointState, fresh: bool = False) -> None:
        request = self.request
        config = endpoint.config
        endpoint.breaker.on_attempt()
        endpoint.request_count += 1
        self.record.attempts += 1
        self.record.endpoint = endpoint.name
        client = request.getClientAddress()
        headers = upstream_request_headers(
            request.requestHeaders,
            request_id=request.request_id.encode(),
            client_ip=(getattr(client, "host", "") or "unix").encode(),
            scheme=b"https" if request.isSecure() else b"http",
            endpoint_headers=config.encoded_headers,
            forward_credentials=config.forward_client_auth and (self.proxy.gate is None or self.proxy.gate.forwards_credentials),
        )
        url = config.url.encode() + self.call.upstream_path
        d = self.proxy.client.request(
            endpoint.name, self.call.method, url, headers, body_producer(request.content), fresh=fresh
        )
        self._pending = d
        d.addCallbacks(self._got_response, self._got_failure, (endpoint,), None, (endpoint, fresh))

    def _got_failure(self, failure: Failure, endpoint: EndpointState, fresh: bool) -> None:
        self._pending = None
        if failure.check(CancelledError) or self.gone or self.completed or self._cancelling:
            # We cancelled it (the client left, or a deadline): whatever Twisted
            # reports (ConnectingCancelledError, a lookup error, ...) says nothing
            # about the endpoint.
            self._release()
            if not self.completed and self.gone:
                self._complete(CLIENT_DISCONNECTED)
            return
        err = failure.value
        if not isinstance(err, UpstreamFailure):
            self._release()
            log.failure("unexpected upstream failure", failure)
            self._fail(bad_gateway(f"endpoint {endpoint.name}: internal proxy error"))
            return
        if err.stale_connection and not fresh:
            log.debug("{endpoint}: pooled connection was stale, retrying on a fresh one", endpoint=endpoint.name)
            self._send(endpoint, fresh=True)
            return
        self._release()
        endpoint.failure_count += 1
        endpoint.breaker.on_failure()
        self.failures.append(err)
        log.warn(
            "request {request_id} to {endpoint} failed: {kind}: {detail}",
            request_id=self.record.request_id,
            endpoint=endpoint.name,
            kind=err.kind,
            detail=err.detail,
        )
        if err.marks_offline:
            self.proxy.mark_offline(endpoint, f"{err.kind} during a request")
        if err.safe_to_retry:
            self.record.failovers += 1
            self._next()
            return
        self._fail(self._error_for(err))

    def _got_response(self, response: IResponse, endpoint: EndpointState) -> None:
        self._pending = None
        if self.gone or self.completed:
            response.deliverBody(_Discard())
            self._release()
            return
        size = sum(len(name) + sum(len(v) for v in values) for name, values in response.headers.getAllRawHeaders())
        if size > MAX_UPSTREAM_HEADER_BYTES:
            response.deliverBody(_Discard())
            self._release()
            endpoint.failure_count += 1
            endpoint.breaker.on_failure()
            self._fail(
                bad_gateway(f"endpoint {endpoint.name} sent {size} bytes of response headers (limit "
                            f"{MAX_UPSTREAM_HEADER_BYTES})", "upstream_headers_too_large")
            )
            return
        if response.code == 503 and self._has_alternative():
            # DMR builds before v1.0.11 could answer llama.cpp's 503 "Loading
            # model" while a runner starts: nothing was generated, so trying
            # another endpoint is safe.  Anything else is passed through.
            d = read_body(response, 64 * 1024)
            self._pending = d
            d.addCallbacks(
                self._got_503_body, self._got_failure, (response, endpoint), None, (endpoint, True)
            )
            return
        self._relay_response(response, endpoint)

    def _got_503_body(self, body: bytes, response: IResponse, endpoint: EndpointState) -> None:
        self._pending = None
        if self.gone:
            self._release()
            return
        if _LOADING_MARKER in body:
            self._release()
            self.record.failovers += 1
            log.info("{endpoint} is loading the model; trying another endpoint", endpoint=endpoint.name)
            self._next()
            return
        self._start_response(response, endpoint)
        self.request.write(body)
        self.request.finish()
        endpoint.breaker.on_failure()
        self.record.bytes_sent = len(body)
        self._complete(OK)

    def _has_alternative(self) -> bool:
        return any(ep.routable for ep in self.remaining)

    # -- the response

    def _start_response(self, response: IResponse, endpoint: EndpointState) -> bool:
        """Write status and headers; returns whether the body is an event stream."""
        request = self.request
        now = self.proxy.clock.seconds()
        self.record.headers_at = now
        self.record.status = response.code
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        out.removeHeader(b"server")
        copy_response_headers(response.headers, out)
        if response.length is not UNKNOWN_LENGTH:
            # Twisted's client takes Content-Length out of the headers; give it back.
            out.setRawHeaders(b"content-length", [b"%d" % response.length])
        if self.proxy.gate is not None:
            self.proxy.gate.decorate(request, out)
        request.defaultContentType = None
        setter = out.setRawHeaders
        setter(b"x-olla-endpoint", [endpoint.name.encode()])
        setter(b"x-olla-backend-type", [BACKEND_TYPE])
        if self.call.model is not None:
            setter(b"x-olla-model", [self.call.model.encode("utf-8", "replace")])
        setter(b"x-olla-response-time", [b"%dms" % round((now - self.call.arrived) * 1000)])
        if self.decision is not None:
            for name, value in self.decision.headers().items():
                setter(name, [value])
        content_type = response.headers.getRawHeaders(b"content-type")
        if content_type and content_type[0].lower().startswith(_SSE):
            setter(b"cache-control", [b"no-cache"])
            setter(b"x-accel-buffering", [b"no"])
            return True
        return False

    def _relay_response(self, response: IResponse, endpoint: EndpointState) -> None:
        if response.code >= 500:
            endpoint.breaker.on_failure()
        else:
            endpoint.breaker.on_success()
        is_sse = self._start_response(response, endpoint)
        relay = ResponseRelay(
            self.request,
            self.proxy.clock,
            self.config.proxy.read_timeout,
            StreamWatch() if is_sse else None,
            self._relay_done,
            endpoint.name,
            UsageTail() if response.code < 300 and self.call.model is not None else None,
        )
        self.record.streamed = is_sse
        self._relay = relay
        response.deliverBody(relay)

    def _relay_done(self, outcome: str, sent: int) -> None:
        self.record.bytes_sent = sent
        relay = self._relay
        if relay is not None:
            self.record.first_byte_at = relay.first_byte_at
            if relay.usage is not None:
                self.record.usage = relay.usage.usage()
        self._release()
        self._complete(outcome)

    # -- endings

    def _release(self) -> None:
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def _exhausted(self) -> ClientError:
        if not self.failures:
            return unavailable(
                "no DMR endpoint is available for this request right now",
                "no_endpoints_available",
                5,
            )
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
        if self.completed:
            return
        if self.decision is not None and error.status >= 500:
            for name, value in self.decision.headers().items():
                error.headers.setdefault(name, value)
        self.record.status = error.status
        self.record.error = error.message
        if not self.gone:
            write_error(self.request, error)
        self._complete(outcome or ("upstream_error" if error.status in (502, 504) else "rejected"))

    def _complete(self, outcome: str) -> None:
        if self.completed:
            return
        self.completed = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.record.outcome != CLIENT_DISCONNECTED or outcome != OK:
            self.record.outcome = outcome
        self.record.ended = self.proxy.clock.seconds()
        self.proxy.done(self)


class _Discard(Protocol):
    """Swallows a response body we no longer want, closing its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()
