"""
The daemon's own error answers, in the OpenAI shape.

Upstream answers are never rewritten; this module only renders errors that
olladmr itself decides on (bad input, no endpoint, timeouts, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from twisted.web.iweb import IRequest


def show_value(value: object) -> str:
    """Render a bad configuration value the way a person wrote it: strings quoted."""
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


@dataclass
class ClientError(Exception):
    """An error answer for the client: status, message, OpenAI type and code."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type_: str, code: str | None) -> bytes:
    """``{"error": {"message", "type", "code"}}`` as compact JSON bytes."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "code": code}}, separators=(",", ":")
    ).encode("utf-8")


def write_error(request: IRequest, error: ClientError) -> None:
    """Write ``error`` as the complete response to ``request`` and finish it."""
    if getattr(request, "_disconnected", False) or request.finished:
        return
    body = error.body()
    request.setResponseCode(error.status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    for name, value in error.headers.items():
        headers.setRawHeaders(name, [value])
    request.write(body)
    request.finish()


def bad_request(message: str, code: str = "invalid_request") -> ClientError:
    return ClientError(400, message, "invalid_request_error", code)


def not_found(message: str, code: str = "not_found") -> ClientError:
    return ClientError(404, message, "invalid_request_error", code)


def too_large(limit: int) -> ClientError:
    return ClientError(
        413,
        f"request body is larger than the limit of {limit} bytes (server.request_limits.max_body_size)",
        "invalid_request_error",
        "request_too_large",
    )


def unavailable(message: str, code: str, retry_after: int) -> ClientError:
    return ClientError(503, message, "service_unavailable", code, {b"retry-after": b"%d" % retry_after})


def bad_gateway(message: str, code: str = "upstream_unreachable") -> ClientError:
    return ClientError(502, message, "upstream_error", code)


def gateway_timeout(message: str, code: str = "upstream_timeout") -> ClientError:
    return ClientError(504, message, "upstream_error", code)
