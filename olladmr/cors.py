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

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.web.http_headers import Headers

from .errors import ClientError
from .errors import show_value as _show

if TYPE_CHECKING:  # config.py may import this module: no runtime import back
    from .config import _Section

#: The X-Olla-* headers olladmr puts on responses; exposed to browsers by default.
DEFAULT_EXPOSED_HEADERS: tuple[str, ...] = (
    "X-Olla-Request-ID",
    "X-Olla-Endpoint",
    "X-Olla-Model",
    "X-Olla-Backend-Type",
    "X-Olla-Response-Time",
    "X-Olla-Routing-Strategy",
    "X-Olla-Routing-Decision",
    "X-Olla-Routing-Reason",
)
DEFAULT_METHODS: tuple[str, ...] = ("GET", "POST", "OPTIONS")
DEFAULT_HEADERS: tuple[str, ...] = ("Authorization", "Content-Type", "X-API-Key", "X-Request-ID")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://(\[[0-9a-f:.]+\]|[^\s/?#:\[\]@]+)(:[0-9]{1,5})?")


@dataclass(frozen=True)
class CorsConfig:
    """``server.cors``: which origins may call olladmr from a browser, and how."""

    enabled: bool = False
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = DEFAULT_METHODS
    allowed_headers: tuple[str, ...] = DEFAULT_HEADERS
    exposed_headers: tuple[str, ...] = DEFAULT_EXPOSED_HEADERS
    allow_credentials: bool = False
    max_age: int = 600


def _strings(section: _Section, key: str, default: tuple[str, ...], check: re.Pattern[str], what: str) -> tuple[str, ...]:
    if not section.has(key):
        section.raw(key)
        return default
    out: list[str] = []
    for index, item in enumerate(section.sequence(key)):
        text = item.strip() if isinstance(item, str) else None
        if not text or not (text == "*" or check.fullmatch(text)):
            raise section.error(f"{key}[{index}]", f"expected {what}, got {_show(item)}")
        out.append(text)
    return tuple(out)


def _origin(section: _Section, index: int, item: object) -> str:
    text = item.strip().lower() if isinstance(item, str) else ""
    if text == "*":
        return text
    if not _ORIGIN.fullmatch(text):
        problem = 'expected an origin such as "https://app.example.com" or "*"'
        if text.count("/") > 2:
            problem = 'an origin has no path (not even a trailing "/"): expected e.g. "https://app.example.com"'
        raise section.error(f"allowed_origins[{index}]", f"{problem}, got {_show(item)}")
    return text


def _max_age(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    from .config import parse_duration  # config is loaded by now (it made the section)

    return int(parse_duration(value))


def parse_cors(section: _Section) -> CorsConfig:
    """
    Read a ``server.cors`` section into a :class:`CorsConfig`.

    Everything is validated even while ``enabled`` is false.  Refused:
    ``allow_credentials: true`` with a ``"*"`` origin (browsers would
    reject every answer) and ``enabled: true`` with no origins.
    """
    enabled = section.boolean("enabled", False)
    origins = tuple(dict.fromkeys(_origin(section, i, item) for i, item in enumerate(section.sequence("allowed_origins"))))
    methods = tuple(m.upper() for m in _strings(section, "allowed_methods", DEFAULT_METHODS, _TOKEN, "an HTTP method"))
    headers = _strings(section, "allowed_headers", DEFAULT_HEADERS, _TOKEN, "a header name")
    exposed = _strings(section, "exposed_headers", DEFAULT_EXPOSED_HEADERS, _TOKEN, "a header name")
    credentials = section.boolean("allow_credentials", False)
    max_age = section.get("max_age", 600, _max_age, 'a number of seconds or a duration such as "10m"')
    if credentials and "*" in origins:
        raise section.error(
            "allow_credentials",
            'cannot be true while allowed_origins contains "*" (browsers refuse credentials for a wildcard '
            "origin); list the origins instead",
        )
    if credentials and "*" in exposed:
        raise section.error("exposed_headers", 'cannot contain "*" while allow_credentials is true; name the headers')
    if enabled and not origins:
        raise section.error(
            "allowed_origins", 'is empty but enabled is true; list origins such as "https://app.example.com" (or "*")'
        )
    section.finish()
    return CorsConfig(
        enabled=enabled,
        allowed_origins=origins,
        allowed_methods=methods,
        allowed_headers=headers,
        exposed_headers=exposed,
        allow_credentials=credentials,
        max_age=max_age,
    )


class Cors:
    """Answers preflights and decorates responses according to a :class:`CorsConfig`."""

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

    def apply(self, request_headers: Headers, response_headers: Headers) -> None:
        """Set :meth:`response_headers` on ``response_headers``, adding ``Origin`` to any existing ``Vary``."""
        for name, value in self.response_headers(request_headers).items():
            if name == b"vary":
                value = merge_vary(response_headers.getRawHeaders(b"vary"), value)
            response_headers.setRawHeaders(name, [value])


def merge_vary(existing: list[bytes] | None, token: bytes) -> bytes:
    """A ``Vary`` value holding the ``existing`` tokens plus ``token`` (once, case-insensitively)."""
    tokens = [t.strip() for value in existing or () for t in value.split(b",") if t.strip()]
    if b"*" in tokens or token.lower() in (t.lower() for t in tokens):
        return b", ".join(tokens)
    return b", ".join([*tokens, token])


def _first(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    value = values[0].strip()
    return value or None
