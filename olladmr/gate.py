"""
The front gate: who may come in and how much they may cost.

:class:`Gate` runs before any route: CORS preflights, API keys (and the
admin key for ``/internal/*``), token-bucket rate limits and the
per-client cap on concurrent requests.  It answers refusals with
OpenAI-shaped errors and leaves the headers every limited response must
carry (``X-RateLimit-*``, CORS) on the request, so the proxy can put them
back after copying an upstream's headers.

``/internal/health`` is always open and never limited; ``/internal/*``
and ``/version`` are never rate limited.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from .auth import Authenticator, admin_unauthorized, unauthorized
from .config import ServerConfig
from .cors import Cors
from .ratelimit import RateLimiter, rate_limited, too_many_concurrent

HEALTH = b"/internal/health"
_INTERNAL = b"/internal/"


class Gate:
    """Owns CORS, authentication, rate limiting and per-client concurrency for one service."""

    def __init__(self, server: ServerConfig, clock: IReactorTime) -> None:
        self._clock = clock
        self.limiter: RateLimiter | None = None
        self.configure(server)

    def configure(self, server: ServerConfig) -> None:
        """Adopt a (reloaded) server section; rate-limit buckets are kept."""
        self.cors = Cors(server.cors)
        self.auth = Authenticator(server.auth)
        limits = dataclasses.replace(
            server.rate_limits, per_key_requests_per_minute=server.auth.per_key_requests_per_minute
        )
        if self.limiter is None:
            self.limiter = RateLimiter(limits, self._clock)
        else:
            self.limiter.reconfigure(limits)
        self.active = self.cors.enabled or self.auth.required or self.auth.admin_required or limits.enabled

    def start(self) -> None:
        if self.limiter is not None:
            self.limiter.start()

    def stop(self) -> None:
        if self.limiter is not None:
            self.limiter.stop()

    @property
    def forwards_credentials(self) -> bool:
        """Client credentials may go upstream only when they are not olladmr's own API keys."""
        return not self.auth.required

    def admit(self, request: Any) -> bytes | None:
        """
        Let ``request`` in (``None``), answer it here (returns the body, with
        status and headers set: a CORS preflight), or raise a ClientError.
        """
        if not self.active:
            return None
        headers: Headers = request.requestHeaders
        path: bytes = request.path
        if self.cors.enabled and headers.hasHeader(b"origin"):
            if request.method == b"OPTIONS":
                answer = self.cors.preflight(headers)
                if answer is not None:
                    status, extra = answer
                    if status >= 400:
                        raise self.cors.denied(headers)
                    request.setResponseCode(status)
                    for name, value in extra.items():
                        request.responseHeaders.setRawHeaders(name, [value])
                    return b""
            self.cors.apply(headers, request.responseHeaders)
        if path == HEALTH:
            return None
        if path.startswith(_INTERNAL):
            if self.auth.admin_required and not self.auth.check_admin(headers):
                raise admin_unauthorized()
            return None
        if path == b"/version":
            return None
        key_id = None
        if self.auth.required:
            key_id = self.auth.identify(headers)
            if key_id is None:
                raise unauthorized()
        limiter = self.limiter
        if limiter is None or not limiter.config.enabled:
            return None
        peer = request.getClientAddress()
        client = limiter.client_ip(getattr(peer, "host", "") or "", headers.getRawHeaders(b"x-forwarded-for"))
        decision = limiter.check(client, key_id)
        extra = decision.headers()
        if extra:
            request.front_headers = extra
            for name, value in extra.items():
                request.responseHeaders.setRawHeaders(name, [value])
        if not decision.allowed:
            raise rate_limited(decision)
        cap = limiter.config.max_concurrent_per_client
        if cap:
            if not limiter.acquire_concurrent(client):
                raise too_many_concurrent(cap)
            request.notifyFinish().addBoth(lambda _: limiter.release_concurrent(client))
        return None

    def decorate(self, request: Any, response_headers: Headers) -> None:
        """Put the gate's headers back after an upstream's headers were copied."""
        if not self.active:
            return
        for name, value in getattr(request, "front_headers", {}).items():
            response_headers.setRawHeaders(name, [value])
        if self.cors.enabled and request.requestHeaders.hasHeader(b"origin"):
            self.cors.apply(request.requestHeaders, response_headers)
