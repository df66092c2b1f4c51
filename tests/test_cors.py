"""Unit tests for ``olladmr.edge.cors``: preflights and CORS response headers."""

from __future__ import annotations

import json
from typing import Any

from support import section
from twisted.web.http_headers import Headers

from olladmr.config.parse import parse_cors
from olladmr.config.schema import DEFAULT_EXPOSED_HEADERS, CorsConfig
from olladmr.edge.cors import Cors
from olladmr.proxy.headers import add_response_headers, merge_vary


APP = "https://app.example.com"


def cors(**values: Any) -> Cors:
    return Cors(CorsConfig(enabled=True, **values))


def preflight_headers(origin: str = APP, method: str = "POST", requested: str | None = None) -> Headers:
    h = Headers({b"origin": [origin.encode()], b"access-control-request-method": [method.encode()]})
    if requested is not None:
        h.setRawHeaders(b"access-control-request-headers", [requested.encode()])
    return h


def test_cors_off_by_default() -> None:
    """Disabled CORS answers no preflight and adds no header."""
    off = Cors(CorsConfig())
    assert off.preflight(preflight_headers()) is None
    assert off.response_headers(preflight_headers()) == {}
    assert parse_cors(section({}, "server.cors")) == CorsConfig()


def test_preflight_from_allowed_origin() -> None:
    """An allowed origin's preflight gets 204 with its origin echoed, methods, headers, max age and Vary."""
    status, h = cors(allowed_origins=(APP,), max_age=300).preflight(preflight_headers())
    assert status == 204
    assert h == {
        b"access-control-allow-origin": APP.encode(),
        b"access-control-allow-methods": b"GET, POST, OPTIONS",
        b"access-control-allow-headers": b"Authorization, Content-Type, X-API-Key, X-Request-ID",
        b"access-control-max-age": b"300",
        b"vary": b"Origin",
    }


def test_preflight_wildcard_and_credentials() -> None:
    """A "*" origin list echoes any origin; credentials add Allow-Credentials; "*" headers echo the request."""
    status, h = cors(allowed_origins=("*",), allowed_headers=("*",)).preflight(
        preflight_headers("http://localhost:3000", requested="content-type, x-custom")
    )
    assert status == 204
    assert h[b"access-control-allow-origin"] == b"http://localhost:3000"
    assert h[b"access-control-allow-headers"] == b"content-type, x-custom"
    _, h = cors(allowed_origins=(APP,), allow_credentials=True).preflight(preflight_headers())
    assert h[b"access-control-allow-credentials"] == b"true"


def test_preflight_from_disallowed_origin_is_403_json() -> None:
    """A preflight from an origin not listed is refused with 403 and a JSON error."""
    c = cors(allowed_origins=(APP,))
    request = preflight_headers("https://evil.example")
    assert c.preflight(request) == (403, {b"vary": b"Origin"})
    error = c.denied(request)
    assert error.status == 403
    assert json.loads(error.body())["error"]["code"] == "cors_origin_not_allowed"
    assert c.preflight(preflight_headers(APP + ".evil.example")) == (403, {b"vary": b"Origin"})


def test_options_without_preflight_headers_is_not_a_preflight() -> None:
    """OPTIONS without Origin or Access-Control-Request-Method is left to the routes."""
    c = cors(allowed_origins=(APP,))
    assert c.preflight(Headers({b"origin": [APP.encode()]})) is None
    assert c.preflight(Headers({b"access-control-request-method": [b"POST"]})) is None


def test_simple_request_headers() -> None:
    """An allowed origin gets Allow-Origin, Expose-Headers and Vary; others only Vary."""
    c = cors(allowed_origins=(APP,))
    h = c.response_headers(Headers({b"origin": [APP.encode()]}))
    assert h[b"access-control-allow-origin"] == APP.encode()
    assert h[b"access-control-expose-headers"] == ", ".join(DEFAULT_EXPOSED_HEADERS).encode()
    assert b"X-Olla-Request-ID" in h[b"access-control-expose-headers"]
    assert h[b"vary"] == b"Origin"
    assert b"access-control-allow-credentials" not in h
    assert c.response_headers(Headers({b"origin": [b"https://evil.example"]})) == {b"vary": b"Origin"}
    assert c.response_headers(Headers()) == {b"vary": b"Origin"}


def test_cors_headers_merge_vary() -> None:
    """CORS headers set after an upstream's keep its Vary and add Origin to it once."""
    c = cors(allowed_origins=(APP,))
    out = Headers({b"vary": [b"Accept-Encoding"]})
    add_response_headers(out, c.response_headers(Headers({b"origin": [APP.encode()]})))
    assert out.getRawHeaders(b"vary") == [b"Accept-Encoding, Origin"]
    assert merge_vary([b"origin"], b"Origin") == b"origin"
    assert merge_vary(None, b"Origin") == b"Origin"
