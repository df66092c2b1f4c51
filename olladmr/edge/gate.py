"""
The front gate: who may come in and how much they may cost.

:class:`Gate` runs before any route: CORS preflights, API keys (and the
admin key for ``/internal/*``), token-bucket rate limits and the
per-client cap on concurrent requests.  It refuses with OpenAI-shaped
:class:`~olladmr.errors.ClientError` s and otherwise returns an
:class:`Admission`: what it decided, for the layers after it to carry
(response headers every answer must have, whether client credentials may
go upstream).  Nothing downstream calls back into the gate.

``/internal/health`` needs no key and is limited only by
``health_requests_per_minute``; the rest of ``/internal/*`` and
``/version`` are never rate limited.  With admin keys set, the fleet's
management view under ``/olla/dmr`` (``/models``, ``/engines/ps``, ...)
needs one too (paths as the routes know them: DMR's aliases resolved).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from ..config.schema import Config, RateLimitConfig, ServerConfig
from ..errors import answer_error
from ..proxy.headers import add_response_headers
from .auth import Authenticator, admin_unauthorized, unauthorized
from .clientaddr import client_address
from .cors import Cors
from .ratelimit import RateLimiter, rate_limited, too_many_concurrent

HEALTH = b"/internal/health"
#: The dashboard's shell (page, script, style): no data in it, so no admin key; what it shows needs one.
UI_SHELL = frozenset({b"/internal/ui", b"/internal/ui/", b"/internal/ui/app.js", b"/internal/ui/style.css"})
_INTERNAL = b"/internal/"
#: The fleet's management view (what the ``docker model`` CLI reads): the inventory, behind the admin key when set.
MANAGEMENT = frozenset(
    {b"/olla/dmr/models", b"/olla/dmr/engines/ps", b"/olla/dmr/engines/df", b"/olla/dmr/engines/status",
     b"/olla/dmr/version"}
)
_MANAGEMENT_MODELS = b"/olla/dmr/models/"
_NO_HEADERS: dict[bytes, bytes] = {}


@dataclass(frozen=True)
class Admission:
    """
    What the gate decided about an admitted request.

    ``headers`` go on every answer to it (``X-RateLimit-*``, CORS), also
    after an upstream's headers were copied; ``forward_credentials`` is
    false while olladmr checks API keys itself (the client's key is then
    olladmr's, never the upstream's); ``preflight`` is set when the gate
    answered a CORS preflight itself (its status code; send no body).
    """

    headers: dict[bytes, bytes] = field(default_factory=lambda: _NO_HEADERS)
    forward_credentials: bool = True
    preflight: int | None = None


#: The admission of every request while the gate has nothing to check.
OPEN = Admission()
#: What a request carries before the gate has seen it: no credentials go upstream.
CLOSED = Admission(forward_credentials=False)


def share_of(limits: RateLimitConfig, processes: int) -> RateLimitConfig:
    """
    The limits one of ``processes`` processes enforces so that together
    they admit no more than ``limits`` say: each configured limit divided by
    the process count, rounded down, at least 1.  (A client whose
    connections all reach one process gets that process's share.)
    """
    if processes <= 1:
        return limits

    def part(value: int) -> int:
        return max(1, value // processes) if value > 0 else 0

    return dataclasses.replace(
        limits,
        global_requests_per_minute=part(limits.global_requests_per_minute),
        per_ip_requests_per_minute=part(limits.per_ip_requests_per_minute),
        health_requests_per_minute=part(limits.health_requests_per_minute),
        burst_size=part(limits.burst_size),
        max_concurrent_per_client=part(limits.max_concurrent_per_client),
        per_key_requests_per_minute=part(limits.per_key_requests_per_minute),
    )


class Gate(Service):
    """
    Owns CORS, authentication, rate limiting and per-client concurrency for
    one service; as a child service, it runs the rate limiter's sweep while
    the service runs.
    """

    name = "gate"

    def __init__(self, server: ServerConfig, clock: IReactorTime, share: int = 1) -> None:
        self._clock = clock
        self._share = share  # with --workers N, this process enforces 1/N of every limit
        self.limiter = RateLimiter(self._limits(server), clock)
        self._apply(server)

    def _limits(self, server: ServerConfig) -> RateLimitConfig:
        limits = dataclasses.replace(
            server.rate_limits, per_key_requests_per_minute=server.auth.per_key_requests_per_minute
        )
        return share_of(limits, self._share)

    def _apply(self, server: ServerConfig) -> None:
        self.cors = Cors(server.cors)
        self.auth = Authenticator(server.auth)
        limits = self.limiter.config
        self._open = OPEN if not self.auth.required else Admission(forward_credentials=False)
        self.active = self.cors.enabled or self.auth.required or self.auth.admin_required or limits.enabled or bool(
            limits.max_concurrent_per_client
        )

    def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded server section; rate-limit buckets are kept."""
        self.limiter.reconfigure(self._limits(config.server))
        self._apply(config.server)

    def startService(self) -> None:
        """Start the rate limiter's periodic sweep."""
        super().startService()
        self.limiter.start()

    def stopService(self) -> None:
        """Stop the sweep."""
        super().stopService()
        self.limiter.stop()

    def admit(self, request: Request) -> Admission:
        """Let ``request`` in (an :class:`Admission`) or raise the ClientError that refuses it."""
        if not self.active:
            return self._open
        headers = request.requestHeaders
        path: bytes = request.path
        extra: dict[bytes, bytes] = {}
        if self.cors.enabled and headers.hasHeader(b"origin"):
            if request.method == b"OPTIONS":
                answer = self.cors.preflight(headers)
                if answer is not None:
                    status, preflight_headers = answer
                    if status >= 400:
                        raise self.cors.denied(headers)
                    return Admission(preflight_headers, self._open.forward_credentials, status)
            extra.update(self.cors.response_headers(headers))
        if path.startswith(_INTERNAL) and path != HEALTH:
            if self.auth.admin_required and path not in UI_SHELL and not self.auth.check_admin(headers):
                raise admin_unauthorized()
            return self._admitted(extra)
        if path == b"/version":
            return self._admitted(extra)
        if self.auth.admin_required and (path in MANAGEMENT or path.startswith(_MANAGEMENT_MODELS)):
            if not self.auth.check_admin(headers):
                raise admin_unauthorized()
            return self._admitted(extra)
        limiter = self.limiter
        health = path == HEALTH
        key_id = None
        if self.auth.required and not health:
            key_id = self.auth.identify(headers)
            if key_id is None:
                raise unauthorized()
        if not limiter.config.enabled and not limiter.config.max_concurrent_per_client:
            return self._admitted(extra)
        peer = request.getClientAddress()
        client = client_address(getattr(peer, "host", "") or "", headers.getRawHeaders(b"x-forwarded-for"), limiter.config)
        if limiter.config.enabled:
            decision = limiter.check(client, key_id, health=health)
            limit_headers = decision.headers()
            if not decision.allowed:
                error = rate_limited(decision)
                error.headers = {**extra, **error.headers}
                raise error
            extra.update(limit_headers)
        cap = limiter.config.max_concurrent_per_client
        if cap and not health:
            if not limiter.acquire_concurrent(client):
                error = too_many_concurrent(cap)
                error.headers = {**extra, **error.headers}
                raise error
            request.notifyFinish().addBoth(lambda _: limiter.release_concurrent(client))
        return self._admitted(extra)

    def _admitted(self, extra: dict[bytes, bytes]) -> Admission:
        if not extra:
            return self._open
        return Admission(extra, self._open.forward_credentials)


class GateResource(Resource):
    """
    The front door: one pass per request -- its path made canonical
    (``canonical``: DMR's aliases), the gate's :class:`Admission` (recorded
    on the request for the routes, its headers on the answer; a CORS
    preflight answered here), then the routes.  A refusal is answered by
    :func:`~olladmr.errors.answer_error`, as every routing failure is.
    """

    isLeaf = True

    def __init__(self, gate: Gate, routes: Resource, canonical: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self._gate = gate
        self._routes = routes
        self._canonical = canonical

    def render(self, request: Any) -> Any:
        request.path = self._canonical(request.path)
        try:
            admission = self._gate.admit(request)
        except Exception:
            return answer_error(request, Failure())
        request.admission = admission
        if admission.headers:
            add_response_headers(request.responseHeaders, admission.headers)
        if admission.preflight is not None:
            request.setResponseCode(admission.preflight)
            return b""
        return self._routes.render(request)
