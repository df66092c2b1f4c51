"""
What the routes decided about a request (:class:`ProxyCall`) and what
happened to it (:class:`ExchangeRecord`, handed to observers at the end),
with the outcome names both use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..fleet.aliases import Alias
from ..fleet.sessions import SessionKey

OK = "ok"
CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_TRUNCATED = "upstream_truncated"
READ_TIMEOUT = "read_timeout"
REQUEST_TIMEOUT = "request_timeout"
UPSTREAM_ERROR = "upstream_error"
REJECTED = "rejected"

_NO_HEADERS: dict[bytes, bytes] = {}


@dataclass(slots=True)
class ProxyCall:
    """
    What the routes layer (and the gate before it) decided about a request
    before it is proxied: where it goes upstream, for which model, and what
    the gate wants on the answer.
    """

    method: bytes
    upstream_path: bytes  # the DMR path with its query string
    route: str  # e.g. "chat/completions", "models"
    model: str | None = None
    model_key: str | None = None
    arrived: float = 0.0
    request_id: str = "-"
    response_headers: dict[bytes, bytes] = field(default_factory=lambda: _NO_HEADERS)  # the gate's (rate limits, CORS)
    forward_credentials: bool = True  # False while olladmr checks API keys itself
    api: str = "openai"  # "openai", "anthropic", "responses" or "ollama": error shapes and how its streams end
    model_member: str = "model"  # the body member naming the model (DMR's Ollama API reads "name" first)
    streamed: bool = False  # the client asked for a stream (only its head time says whether an upstream hangs)
    ndjson: bool = False  # an Ollama API stream (one JSON object a line, labelled application/json by DMR)
    alias: Alias | None = None  # the model is an alias of these real models
    response_id: str | None = None  # bound to the endpoint holding this stored Responses API answer
    capture_response: bool = False  # a Responses API create: remember where its answer is stored
    forget_response: bool = False  # a DELETE of response_id: forget it once deleted
    session: SessionKey | None = None  # KV-cache affinity: the conversation's key
    affinity_reported: bool = False  # answer X-Olla-Sticky-Session (disabled) even without a key


@dataclass(slots=True)
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
    overhead: float | None = None  # olladmr's own time (seconds) before the request went upstream and after its head
    ended: float = 0.0
    attempts: int = 0
    failovers: int = 0
    error: str | None = None
    streamed: bool = False
    usage: dict[str, Any] | None = None

    @property
    def ttfb(self) -> float | None:
        """Seconds from arrival to the upstream's response headers, if they came."""
        return None if self.headers_at is None else self.headers_at - self.arrived

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens over generation time (streams: headers to end; otherwise until headers)."""
        tokens = (self.usage or {}).get("completion_tokens")
        if not isinstance(tokens, int) or tokens <= 0 or self.headers_at is None:
            return None
        seconds = (self.ended - self.headers_at) if self.streamed else (self.headers_at - self.arrived)
        return tokens / seconds if seconds > 0 else None
