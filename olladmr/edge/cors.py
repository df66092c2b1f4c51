"""
Cross-origin requests from browsers (``server.cors``), off by default.

::

    server:
      cors:
        enabled: true
        allowed_origins: ["https://chat.example.com"]   # exact origins, or "*"
        allowed_methods: [GET, POST, OPTIONS]
        allowed_headers: [Authorization, Content-Type, X-API-Key, X-Request-ID]
        exposed_headers: [...]        # default: the X-Olla-* response headers
        allow_credentials: false      # not allowed together with "*"
        max_age: 600                  # seconds (or a duration such as "10m")

Preflights (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) are answered by the proxy itself and
never forwarded: 204 with the origin echoed for an allowed origin, 403 JSON
for any other.  Other requests from an allowed origin get
``Access-Control-Allow-Origin`` (and ``-Expose-Headers``) on their response.
Responses always carry ``Vary: Origin`` while CORS is on, since they depend
on it.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from ..config.schema import CorsConfig
from ..errors import ClientError


class Cors:
    """Owns the CORS policy of a :class:`CorsConfig`: answers preflights and names the headers responses carry."""

    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        self._any_origin = "*" in config.allowed_origins
        self._origins = frozenset(origin.encode("ascii", "replace") for origin in config.allowed_origins)
        self._methods = ", ".join(config.allowed_methods).encode("ascii")
        self._echo_headers = "*" in config.allowed_headers
        self._headers = ", ".join(config.allowed_headers).encode("ascii")
        self._exposed = ", ".join(config.exposed_headers).encode("ascii")
        self._max_age = b"%d" % config.max_age

    @property
    def enabled(self) -> bool:
        """Whether CORS is on at all."""
        return self.config.enabled

    def allows(self, origin: bytes) -> bool:
        """Whether ``origin`` (an ``Origin`` header value) may make cross-origin requests."""
        return self._any_origin or origin.lower() in self._origins

    def preflight(self, request_headers: Headers) -> tuple[int, dict[bytes, bytes]] | None:
        """
        The answer to an ``OPTIONS`` request if it is a CORS preflight:
        ``(204, headers)`` for an allowed origin, ``(403, headers)`` for any
        other (send :meth:`denied` as the body); ``None`` when CORS is off or
        the request is not a preflight (no ``Origin`` or no
        ``Access-Control-Request-Method``).  Call it for ``OPTIONS`` only.
        """
        if not self.config.enabled:
            return None
        origin = _first(request_headers, b"origin")
        if origin is None or _first(request_headers, b"access-control-request-method") is None:
            return None
        if not self.allows(origin):
            return 403, {b"vary": b"Origin"}
        headers = {
            b"access-control-allow-origin": origin,
            b"access-control-allow-methods": self._methods,
            b"access-control-allow-headers": self._headers,
            b"access-control-max-age": self._max_age,
            b"vary": b"Origin",
        }
        if self._echo_headers:
            requested = _first(request_headers, b"access-control-request-headers")
            if requested is None:
                del headers[b"access-control-allow-headers"]
            else:
                headers[b"access-control-allow-headers"] = requested
        if self.config.allow_credentials:
            headers[b"access-control-allow-credentials"] = b"true"
        return 204, headers

    def denied(self, request_headers: Headers) -> ClientError:
        """The 403 JSON answer for a preflight from an origin that is not allowed."""
        origin = (_first(request_headers, b"origin") or b"").decode("latin-1")[:200]
        return ClientError(
            403,
            f'origin "{origin}" is not allowed to make cross-origin requests (server.cors.allowed_origins)',
            "invalid_request_error",
            "cors_origin_not_allowed",
            {b"vary": b"Origin"},
        )

    def response_headers(self, request_headers: Headers) -> dict[bytes, bytes]:
        """
        Headers to add to a non-preflight response: ``Access-Control-Allow-Origin``
        and ``-Expose-Headers`` for an allowed origin; ``Vary: Origin`` whenever
        CORS is on; nothing when it is off.
        """
        if not self.config.enabled:
            return {}
        origin = _first(request_headers, b"origin")
        if origin is None or not self.allows(origin):
            return {b"vary": b"Origin"}
        headers = {b"access-control-allow-origin": origin, b"vary": b"Origin"}
        if self._exposed:
            headers[b"access-control-expose-headers"] = self._exposed
        if self.config.allow_credentials:
            headers[b"access-control-allow-credentials"] = b"true"
        return headers


def _first(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    value = values[0].strip()
    return value or None
