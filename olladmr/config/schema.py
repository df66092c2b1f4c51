"""
The configuration's shape: frozen dataclasses, one per section.

Every feature reads its settings from these types and from nothing else
in ``olladmr.config``; parsing lives in :mod:`olladmr.config.parse`.  This
module imports nothing from olladmr.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property
from typing import Union

DEFAULT_PORT = 40114
DEFAULT_HOST = "127.0.0.1"
ENDPOINT_TYPE = "docker-model-runner"
DEFAULT_MODELS_PATH = "/engines/v1/models"
DEFAULT_PS_PATH = "/engines/ps"  # DMR's list of the models loaded right now
BALANCERS = ("priority", "round-robin", "least-connections")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")
#: The places ``proxy.affinity.key_sources`` may name for a request's session key.
AFFINITY_KEY_SOURCES = ("session_header", "prefix", "auth", "ip")
PLACEMENTS = ("cost", "hash")
CACHED_AFTER = ("finish", "first_token", "send")
MAX_AFFINITY_PREFIX_BYTES = 1024**2

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Olla's own default trusted proxies: loopback and the RFC 1918 ranges.
DEFAULT_TRUSTED_PROXY_CIDRS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr) for cidr in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)

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
DEFAULT_CORS_METHODS: tuple[str, ...] = ("GET", "POST", "OPTIONS")
DEFAULT_CORS_HEADERS: tuple[str, ...] = ("Authorization", "Content-Type", "X-API-Key", "X-Request-ID")


@dataclass(frozen=True)
class EndpointConfig:
    """One DMR server: where it is, how to check it, how to route to it."""

    name: str
    url: str  # scheme://host[:port][/base], no trailing slash
    type: str = ENDPOINT_TYPE
    priority: int = 100
    model_url: str = DEFAULT_MODELS_PATH
    health_check_url: str = DEFAULT_MODELS_PATH
    ps_url: str = DEFAULT_PS_PATH  # polled for the models loaded right now
    check_interval: float = 10.0
    check_timeout: float = 5.0
    headers: tuple[tuple[str, str], ...] = ()
    max_concurrent: int = 0  # 0: no limit
    queue_size: int = 64
    queue_timeout: float = 30.0
    forward_client_auth: bool = False
    slots: int = 4  # requests the engine runs at once (llama.cpp's parallel slots; DMR starts 4)
    cache_tokens: int = 0  # the KV/prompt cache placement assumes there; 0: proxy.affinity.cache_tokens
    auth_header: bytes | None = field(default=None, repr=False)  # outbound credentials: never shown
    auth_header_name: str = "authorization"  # X-Api-Key (or as configured) for auth type api_key

    @cached_property
    def encoded_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The headers added to every upstream request (configured ones, then outbound auth)."""
        out = tuple((name.encode(), value.encode()) for name, value in self.headers)
        if self.auth_header is not None:
            out += ((self.auth_header_name.lower().encode(), self.auth_header),)
        return out

    @property
    def display_url(self) -> str:
        """The URL as shown to operators (never carries credentials)."""
        return self.url


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on what one client request may cost."""

    max_body_size: int = 50 * 1024**2
    max_header_size: int = 512 * 1024


@dataclass(frozen=True)
class RateLimitConfig:
    """``server.rate_limits``: requests per minute per scope (0 disables a scope)."""

    global_requests_per_minute: int = 0
    per_ip_requests_per_minute: int = 0
    health_requests_per_minute: int = 0
    burst_size: int = 0  # bucket capacity; 0: one minute's worth of the bucket's rate
    cleanup_interval: float = 300.0
    trust_proxy_headers: bool = False
    trusted_proxy_cidrs: tuple[IPNetwork, ...] = DEFAULT_TRUSTED_PROXY_CIDRS
    max_concurrent_per_client: int = 0  # 0: no cap
    per_key_requests_per_minute: int = 0  # from server.auth.requests_per_minute

    def capacity(self, per_minute: int) -> int:
        """The size of a bucket that refills at ``per_minute`` requests a minute."""
        return self.burst_size if self.burst_size > 0 else per_minute

    @property
    def enabled(self) -> bool:
        """Whether any rate limit (as opposed to the concurrency cap) is on."""
        return (
            self.global_requests_per_minute > 0
            or self.per_ip_requests_per_minute > 0
            or self.health_requests_per_minute > 0
            or self.per_key_requests_per_minute > 0
        )


#: Olla's defaults, for operators who want Olla's behaviour.
OLLA_RATE_LIMITS = RateLimitConfig(
    global_requests_per_minute=1000,
    per_ip_requests_per_minute=100,
    health_requests_per_minute=1000,
    burst_size=50,
)


@dataclass(frozen=True)
class AuthConfig:
    """Accepted API and admin key digests (raw 32-byte SHA-256) and the per-key rate limit."""

    api_key_digests: tuple[bytes, ...] = ()
    admin_key_digests: tuple[bytes, ...] = ()
    per_key_requests_per_minute: int = 0


@dataclass(frozen=True)
class CorsConfig:
    """``server.cors``: which origins may call olladmr from a browser, and how."""

    enabled: bool = False
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = DEFAULT_CORS_METHODS
    allowed_headers: tuple[str, ...] = DEFAULT_CORS_HEADERS
    exposed_headers: tuple[str, ...] = DEFAULT_EXPOSED_HEADERS
    allow_credentials: bool = False
    max_age: int = 600


@dataclass(frozen=True)
class ServerConfig:
    """The listening side: address, limits, drain time, and the front gate's sections."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    shutdown_timeout: float = 30.0
    read_header_timeout: float = 10.0
    read_timeout: float = 30.0
    idle_timeout: float = 120.0
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    reload_endpoint: bool = False
    dashboard: bool = True  # server.admin.dashboard: the live page at /internal/ui/
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)

    @property
    def listen(self) -> str:
        """The Twisted endpoint description this section describes."""
        host = self.host.replace(":", "\\:")
        return f"tcp:{self.port}:interface={host}"


@dataclass(frozen=True)
class ResponseAffinityConfig:
    """``proxy.response_affinity``: how many Responses API answers' endpoints to remember, and how to find the rest."""

    max_entries: int = 100_000
    ttl: float = 3600.0  # DMR keeps a stored response one hour
    probe_timeout: float = 2.0
    max_concurrent_probes: int = 32


@dataclass(frozen=True)
class LostRequestsConfig:
    """
    ``proxy.lost_requests``: retrying, once, a request the upstream lost
    before any byte of an answer -- an empty 502, or no headers for far
    longer than that endpoint takes lately (``hang_factor`` x its recent
    median, at least ``hang_after``), its model being loaded there.
    """

    retry: bool = True
    hang_after: float = 5.0
    hang_factor: float = 20.0


@dataclass(frozen=True)
class AffinityConfig:
    """
    ``proxy.affinity`` (or Olla's ``proxy.sticky_sessions``): send a session's
    requests to the endpoint that served it before, while that endpoint is not
    overloaded (bounded load: at most ``load_factor`` times the average).
    """

    enabled: bool = True
    key_sources: tuple[str, ...] = ("session_header", "prefix")  # tried in order; each one of AFFINITY_KEY_SOURCES
    prefix_bytes: int = 1024  # at most this much of a prompt's opening is hashed for the "prefix" key
    max_sessions: int = 100_000
    idle_ttl: float = 1800.0  # a session unused this long is forgotten
    load_factor: float = 1.25
    #: "cost": a generation request goes where its prompt's cached blocks and the engine's queue make it
    #: cheapest (proxy.affinity's prefix index); "hash": the conversation key's rendezvous and pins alone.
    placement: str = "cost"
    block_chars: int = 256  # characters of canonical prompt text per hashed block
    cache_tokens: int = 131072  # what each endpoint's engine is taken to cache, unless the endpoint says
    request_tokens: int = 64  # a request's fixed cost besides its prompt, in prompt tokens (scheduling, sampling)
    move_cost: float = 1.0  # weight of the extra prefill a placement causes (it delays every request behind it)
    stay_while_free: bool = True  # a prompt stays where it is cached best while that endpoint has a free slot
    #: when a prompt sent to an endpoint counts as cached there for the next ones: "finish" (llama.cpp, DMR's
    #: engine: a busy slot's prefix is not shared), "first_token" (engines that share a prefix once computed,
    #: e.g. vLLM's prefix caching), "send" (engines that prefill one request at a time, in order)
    cached_after: str = "finish"


@dataclass(frozen=True)
class ProxyConfig:
    """How requests are sent upstream: balancing, the four timeouts, pool, breaker, affinity, lost-request retries."""

    load_balancer: str = "priority"
    connection_timeout: float = 10.0
    response_header_timeout: float = 300.0
    read_timeout: float = 600.0
    request_timeout: float = 0.0  # 0: no overall limit
    idle_connection_timeout: float = 30.0
    max_idle_connections: int = 32
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    busy_threshold: float = 5.0
    response_affinity: ResponseAffinityConfig = field(default_factory=ResponseAffinityConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    lost_requests: LostRequestsConfig = field(default_factory=LostRequestsConfig)


@dataclass(frozen=True)
class LoggingConfig:
    """Log level and format."""

    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration of one olladmr process."""

    server: ServerConfig = field(default_factory=ServerConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    endpoints: tuple[EndpointConfig, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    model_discovery_interval: float = 300.0
    #: ``model_aliases``: (alias, (real model, ...)) pairs, in file order, names as written.
    model_aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    source: str = "<built-in defaults>"
    ignored: tuple[str, ...] = ()

    def endpoint(self, name: str) -> EndpointConfig | None:
        """The endpoint called ``name``, if any."""
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        return None

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """``model_aliases`` as a mapping from each alias (as written) to its real model names, in order."""
        return dict(self.model_aliases)


def default_endpoint() -> EndpointConfig:
    """The seed's single local DMR endpoint, used when no file is found."""
    return EndpointConfig(name="local-dmr", url="http://localhost:12434", priority=95)


def default_config() -> Config:
    """Built-in defaults: listen on 127.0.0.1:40114, one local DMR."""
    return Config(endpoints=(default_endpoint(),))
