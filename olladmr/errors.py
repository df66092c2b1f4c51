"""
The daemon's own error answers, in the shape the client speaks.

Upstream answers are never rewritten; this module only renders errors that
olladmr itself decides on (bad input, no endpoint, timeouts, ...).  A
:class:`ClientError` is rendered in a :data:`Dialect`: OpenAI's
``{"error": {"message", "type", "code"}}`` (the default, also what the
Responses API's SDK reads) or Anthropic's ``{"type": "error", "error":
{"type", "message"}}``, so each SDK raises the right exception class.
Every error answer goes through :func:`prepare_error` (status, headers,
body), whether it is returned from a resource or written by the proxy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Literal

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

_log = Logger()


Dialect = Literal["openai", "anthropic", "ollama"]
OPENAI: Dialect = "openai"
ANTHROPIC: Dialect = "anthropic"
#: DMR's Ollama API: ``{"error": "message"}`` (what the ``ollama`` client raises its ``ResponseError`` with).
OLLAMA: Dialect = "ollama"
#: Where DMR's Ollama API lives under olladmr's prefix.
OLLAMA_PREFIX = b"/olla/dmr/api/"

#: Anthropic's error type for each status olladmr answers with (what its SDK expects in the body).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


@dataclass
class ClientError(Exception):
    """An error answer for the client: status, message, OpenAI type and code, extra headers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)

    def body(self, dialect: Dialect = OPENAI) -> bytes:
        """The JSON body of this answer in ``dialect``."""
        return error_body(self.message, self.type, self.code, dialect, self.status)


def error_body(message: str, type_: str, code: str | None, dialect: Dialect = OPENAI, status: int = 400) -> bytes:
    """An error body as compact JSON bytes: OpenAI's ``{"error": {...}}`` or Anthropic's ``{"type": "error", ...}``."""
    if dialect == ANTHROPIC:
        document: dict[str, object] = {"type": "error", "error": {"type": anthropic_type(status), "message": message}}
    elif dialect == OLLAMA:
        document = {"error": message}
    else:
        document = {"error": {"message": message, "type": type_, "code": code}}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def dialect_for_path(path: bytes) -> Dialect:
    """
    The error dialect a request path speaks: Anthropic's on the Messages
    routes, Ollama's under ``/olla/dmr/api/``, OpenAI's everywhere else
    (``path`` after DMR's aliases are resolved).
    """
    if b"/v1/messages" in path or path.startswith((b"/olla/anthropic/", b"/olla/dmr/anthropic/")):
        return ANTHROPIC
    if path.startswith(OLLAMA_PREFIX):
        return OLLAMA
    return OPENAI


def dialect_for_api(api: str) -> Dialect:
    """The error dialect of a route's API (``ProxyCall.api``)."""
    return ANTHROPIC if api == "anthropic" else OLLAMA if api == "ollama" else OPENAI


def prepare_error(request: IRequest, error: ClientError, dialect: Dialect = OPENAI) -> bytes:
    """Set ``error``'s status and headers on ``request`` and return its body (not yet written)."""
    body = error.body(dialect)
    request.setResponseCode(error.status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    for name, value in error.headers.items():
        headers.setRawHeaders(name, [value])
    return body


def answer_error(request: IRequest, failure: Failure) -> bytes:
    """
    The one place a failure met while admitting or routing a request
    becomes its answer (status, headers, body), in the route's dialect:
    a :class:`ClientError` as itself, werkzeug refusing the URL or Host as
    a 400 (or its own status), anything else as a bug -- logged with its
    traceback, answered 500 JSON, never an HTML traceback.
    """
    error = failure.value
    if not isinstance(error, ClientError):
        if isinstance(error, HTTPException):
            error = ClientError(error.code or 400, error.description or error.name, code="bad_request")
        else:
            _log.failure("internal error handling {method} {path}", failure, method=request.method, path=request.path)
            error = internal_error()
    return prepare_error(request, error, dialect_for_path(request.path))


def write_error(request: Request, error: ClientError, dialect: Dialect = OPENAI) -> None:
    """Write ``error`` as the complete response to ``request`` and finish it (unless the client is gone)."""
    if request.finished or request.channel is None:
        return
    request.write(prepare_error(request, error, dialect))
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


def not_forwarded(what: str, reads: bool = False) -> ClientError:
    """403 for a DMR management route olladmr never forwards (a write; or a read that would expose too much)."""
    why = "it is not part of the fleet's read-only view" if reads else "olladmr serves a fleet's models read-only"
    return ClientError(
        403,
        f"olladmr does not forward {what}: {why}; use each DMR directly for that",
        "permission_error",
        "management_not_forwarded",
    )


def internal_error() -> ClientError:
    """500: a bug in olladmr (the traceback goes to the log, never to the client)."""
    return ClientError(500, "internal error in olladmr (logged)", "server_error", "internal_error")
