"""
The daemon's own error answers, in the OpenAI shape.

Upstream answers are never rewritten; this module only renders errors that
olladmr itself decides on (bad input, no endpoint, timeouts, ...).  Every
error answer goes through :func:`prepare_error` (status, headers, body),
whether it is returned from a resource or written by the proxy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

from twisted.web.iweb import IRequest
from twisted.web.server import Request


@dataclass
class ClientError(Exception):
    """An error answer for the client: status, message, OpenAI type and code, extra headers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)

    def body(self) -> bytes:
        """The JSON body of this answer."""
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type_: str, code: str | None) -> bytes:
    """``{"error": {"message", "type", "code"}}`` as compact JSON bytes."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "code": code}}, separators=(",", ":")
    ).encode("utf-8")


def prepare_error(request: IRequest, error: ClientError) -> bytes:
    """Set ``error``'s status and headers on ``request`` and return its body (not yet written)."""
    body = error.body()
    request.setResponseCode(error.status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    for name, value in error.headers.items():
        headers.setRawHeaders(name, [value])
    return body


def write_error(request: Request, error: ClientError) -> None:
    """Write ``error`` as the complete response to ``request`` and finish it (unless the client is gone)."""
    if request.finished or request.channel is None:
        return
    request.write(prepare_error(request, error))
    request.finish()


def bad_request(message: str, code: str = "invalid_request") -> ClientError:
    """400."""
    return ClientError(400, message, "invalid_request_error", code)


def not_found(message: str, code: str = "not_found") -> ClientError:
    """404."""
    return ClientError(404, message, "invalid_request_error", code)


def method_not_allowed(method: str, allowed: Iterable[str], where: str | None = None) -> ClientError:
    """405 with an ``Allow`` header listing ``allowed``."""
    methods = ", ".join(allowed)
    place = f" on {where}" if where else ""
    return ClientError(
        405,
        f"method {method[:32]} is not allowed{place}; allowed: {methods}",
        "invalid_request_error",
        "method_not_allowed",
        {b"allow": methods.encode()},
    )


def too_large(limit: int) -> ClientError:
    """413 for a body over ``server.request_limits.max_body_size``."""
    return ClientError(
        413,
        f"request body is larger than the limit of {limit} bytes (server.request_limits.max_body_size)",
        "invalid_request_error",
        "request_too_large",
    )


def unavailable(message: str, code: str, retry_after: int) -> ClientError:
    """503 with ``Retry-After``."""
    return ClientError(503, message, "service_unavailable", code, {b"retry-after": b"%d" % retry_after})


def bad_gateway(message: str, code: str = "upstream_unreachable") -> ClientError:
    """502."""
    return ClientError(502, message, "upstream_error", code)


def gateway_timeout(message: str, code: str = "upstream_timeout") -> ClientError:
    """504."""
    return ClientError(504, message, "upstream_error", code)


def internal_error() -> ClientError:
    """500: a bug in olladmr (the traceback goes to the log, never to the client)."""
    return ClientError(500, "internal error in olladmr (logged)", "server_error", "internal_error")
