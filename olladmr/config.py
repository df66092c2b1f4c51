"""
Configuration: YAML in, immutable typed objects out.

Everything the daemon can be told lives here.  ``parse_config`` is a pure
function from a parsed YAML document to a :class:`Config`; ``load_config``
reads a file.  Every problem is reported as a :class:`ConfigError` whose text
is one line naming the file, the key path and what is wrong, e.g.::

    config.yaml: discovery.static.endpoints[1].check_interval: expected a
    duration such as "10s", got "ten"

Olla's layout (``server`` / ``proxy`` / ``discovery.static.endpoints`` /
``logging``) and the short form (a top-level ``endpoints`` list) are both
accepted.  Keys Olla knows but olladmr has no use for are accepted and listed
in :attr:`Config.ignored` so the daemon can warn about them; any other unknown
key is an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

import yaml

from .auth import AuthConfig, parse_auth
from .errors import show_value as _show
from .cors import CorsConfig, parse_cors
from .ratelimit import RateLimitConfig, parse_rate_limits

T = TypeVar("T")

DEFAULT_PORT = 40114
DEFAULT_HOST = "127.0.0.1"
ENDPOINT_TYPE = "docker-model-runner"
DEFAULT_MODELS_PATH = "/engines/v1/models"
BALANCERS = ("priority", "round-robin", "least-connections")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")

# Keys that Olla understands and olladmr deliberately ignores, per section.
# They are accepted (so an Olla file loads) and reported as ignored.
_OLLA_IGNORED: dict[str, frozenset[str]] = {
    "": frozenset({"model_registry", "translators", "engineering", "dashboard", "model_aliases"}),
    "server": frozenset({"request_logging", "write_timeout"}),
    "proxy": frozenset(
        {
            "engine",
            "profile",
            "connection_keep_alive",
            "response_timeout",
            "tls_handshake_timeout",
            "stream_buffer_size",
            "sticky_sessions",
            "max_retries",
            "retry_backoff",
            "retry",
            "profile_filter",
        }
    ),
    "discovery": frozenset({"refresh_interval", "health_check"}),
    "discovery.model_discovery": frozenset({"concurrent_workers", "retry_attempts", "retry_backoff"}),
    "endpoint": frozenset({"preserve_path", "model_filter"}),
}


class ConfigError(Exception):
    """A configuration problem: where it is and what is wrong, on one line."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return _one_line(f"{self.source}: {where}{self.problem}")


def _one_line(text: str) -> str:
    """Escape line breaks and other control characters so a message stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# --------------------------------------------------------------------------
# Value parsers


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """
    Parse a Go-style duration (``500ms``, ``10s``, ``5m``, ``1h30m``) into
    seconds.  ``0`` (number or string) means zero.  Raises ``ValueError``.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if value == 0:
        return 0.0
    if not isinstance(value, str):
        raise ValueError(value)
    text = value.strip()
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            raise ValueError(value)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError(value)
    return total


def parse_size(value: object) -> int:
    """
    Parse a byte size (``50MB``, ``512KB``, ``1GiB``, or a plain integer of
    bytes).  Units are binary (1KB = 1024 bytes), as in Olla.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    if not isinstance(value, str):
        raise ValueError(value)
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(value)
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


# --------------------------------------------------------------------------
# Typed configuration objects


@dataclass(frozen=True)
class EndpointConfig:
    """One DMR server: where it is, how to check it, how to route to it."""

    name: str
    url: str  # scheme://host[:port][/base], no trailing slash
    type: str = ENDPOINT_TYPE
    priority: int = 100
    model_url: str = DEFAULT_MODELS_PATH
    health_check_url: str = DEFAULT_MODELS_PATH
    check_interval: float = 10.0
    check_timeout: float = 5.0
    headers: tuple[tuple[str, str], ...] = ()
    max_concurrent: int = 0  # 0: no limit
    queue_size: int = 64
    queue_timeout: float = 30.0
    forward_client_auth: bool = False
    auth_header: bytes | None = field(default=None, repr=False)  # outbound credentials: never shown

    @cached_property
    def encoded_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The headers added to every upstream request (configured ones, then outbound auth)."""
        out = tuple((name.encode(), value.encode()) for name, value in self.headers)
        if self.auth_header is not None:
            out += ((b"authorization", self.auth_header),)
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
class ServerConfig:
    """The listening side: address, limits, drain time."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    shutdown_timeout: float = 30.0
    read_header_timeout: float = 10.0
    read_timeout: float = 30.0
    idle_timeout: float = 120.0
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    reload_endpoint: bool = False
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)

    @property
    def listen(self) -> str:
        """The Twisted endpoint description this section describes."""
        host = self.host.replace(":", "\\:")
        return f"tcp:{self.port}:interface={host}"


@dataclass(frozen=True)
class ProxyConfig:
    """How requests are sent upstream: balancing and the four timeouts."""

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
    source: str = "<built-in defaults>"
    ignored: tuple[str, ...] = ()

    def endpoint(self, name: str) -> EndpointConfig | None:
        """The endpoint called ``name``, if any."""
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        return None


def default_endpoint() -> EndpointConfig:
    """The seed's single local DMR endpoint, used when no file is found."""
    return EndpointConfig(name="local-dmr", url="http://localhost:12434", priority=95)


def default_config() -> Config:
    """Built-in defaults: listen on 127.0.0.1:40114, one local DMR."""
    return Config(endpoints=(default_endpoint(),))


# --------------------------------------------------------------------------
# The reader: walks a YAML mapping, remembering the key path


class _Section:
    """A mapping being read; knows its key path and which keys were used."""

    def __init__(self, data: Mapping[str, Any], path: str, source: str, ignored_set: str, sink: list[str]):
        self._data = data
        self._path = path
        self._source = source
        self._ignored = _OLLA_IGNORED.get(ignored_set, frozenset())
        self._sink = sink
        self._used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self._source, self._key(key), problem)

    def has(self, key: str) -> bool:
        return key in self._data and self._data[key] is not None

    def raw(self, key: str) -> Any:
        self._used.add(key)
        return self._data.get(key)

    def get(self, key: str, default: T, convert: Callable[[Any], T], expected: str) -> T:
        """Read ``key`` through ``convert``; a missing or null key gives ``default``."""
        value = self.raw(key)
        if value is None:
            return default
        try:
            return convert(value)
        except (ValueError, TypeError):
            raise self.error(key, f"expected {expected}, got {_show(value)}") from None

    def duration(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = self.get(key, default, parse_duration, 'a duration such as "10s"')
        if value < minimum:
            raise self.error(key, f"must be at least {_fmt_seconds(minimum)}, got {_show(self.raw(key))}")
        return value

    def integer(self, key: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.get(key, default, _strict_int, "a whole number")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self.get(key, default, _strict_bool, "true or false")

    def string(self, key: str, default: str) -> str:
        return self.get(key, default, _strict_str, "a string")

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = self.string(key, default)
        if value.lower() not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return value.lower()

    def section(self, key: str, ignored_set: str | None = None) -> _Section:
        value = self.raw(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {_show(value)}")
        return _Section(value, self._key(key), self._source, ignored_set or self._key(key), self._sink)

    def sequence(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_show(value)}")
        return value

    def finish(self) -> None:
        """Fail on unknown keys; record Olla keys that are accepted but ignored."""
        for key in self._data:
            if not isinstance(key, str):
                raise ConfigError(self._source, self._path or "(top level)", f"keys must be strings, got {key!r}")
            if key in self._used:
                continue
            if key in self._ignored:
                self._sink.append(self._key(key))
                continue
            raise self.error(key, "unknown key")


def _strict_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(value)
    return value


def _strict_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def _strict_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(value)
    return value


def _fmt_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
)


def _parse_url(section: _Section, key: str) -> str:
    raw = section.raw(key)
    if raw is None:
        raise section.error(key, "is required")
    if not isinstance(raw, str) or not raw.strip():
        raise section.error(key, f"expected a URL such as \"http://localhost:12434\", got {_show(raw)}")
    text = raw.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise section.error(key, f"not a valid URL ({exc}): {_show(raw)}") from None
    if parts.scheme not in ("http", "https"):
        raise section.error(key, f"must start with http:// or https://, got {_show(raw)}")
    if not parts.hostname:
        raise section.error(key, f"has no host: {_show(raw)}")
    if parts.username is not None or parts.password is not None:
        raise section.error(key, "must not carry credentials (user:password@); configure them elsewhere")
    if parts.query or parts.fragment:
        raise section.error(key, f"must not have a query or fragment: {_show(raw)}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _parse_path(section: _Section, key: str, default: str) -> str:
    value = section.string(key, default)
    if not value.startswith("/") or any(c in value for c in " \r\n\t#"):
        raise section.error(key, f"expected a path starting with \"/\", got {_show(value)}")
    return value


def _parse_headers(section: _Section, key: str) -> tuple[tuple[str, str], ...]:
    value = section.raw(key)
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise section.error(key, f"expected a mapping of header names to values, got {_show(value)}")
    out: list[tuple[str, str]] = []
    for name, val in value.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise section.error(where, "is not a valid header name")
        if name.lower() in _RESERVED_HEADERS or name.lower().startswith(("x-olla-", "proxy-")):
            raise section.error(where, "is managed by olladmr and cannot be set")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise section.error(where, f"expected a string, got {_show(val)}")
        sval = str(val)
        if any(c in sval for c in "\r\n\x00"):
            raise section.error(where, "must not contain line breaks")
        out.append((name, sval))
    return tuple(out)


def _parse_outbound_auth(parent: _Section, environ: Mapping[str, str]) -> bytes | None:
    """``auth: {type: bearer, token | token_file | token_env}`` -> the Authorization header value."""
    if not parent.has("auth"):
        parent.raw("auth")
        return None
    sec = parent.section("auth", "endpoint.auth")
    kind = sec.choice("type", "bearer", ("bearer",))
    sources = [key for key in ("token", "token_file", "token_env") if sec.has(key)]
    if len(sources) != 1:
        raise sec.error("token", "give exactly one of token, token_file or token_env")
    source = sources[0]
    value = sec.string(source, "")
    if source == "token_file":
        try:
            with open(value, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise sec.error(source, f"cannot read {value}: {exc.strerror or exc}") from None
    elif source == "token_env":
        token = environ.get(value, "").strip()
        if not token:
            raise sec.error(source, f"environment variable {value} is not set or empty")
    else:
        token = value.strip()
    if not token or any(c in token for c in "\r\n\x00 "):
        raise sec.error(source, "the token is empty or contains spaces or line breaks")
    sec.finish()
    assert kind == "bearer"
    return b"Bearer " + token.encode("utf-8")


def _parse_endpoint(
    item: object, path: str, source: str, sink: list[str], environ: Mapping[str, str] = os.environ
) -> EndpointConfig:
    if not isinstance(item, dict):
        raise ConfigError(source, path, f"expected a mapping with at least a url, got {_show(item)}")
    sec = _Section(item, path, source, "endpoint", sink)
    url = _parse_url(sec, "url")
    default_name = urlsplit(url).netloc
    name = sec.string("name", default_name).strip()
    if not name or any(c.isspace() or not c.isprintable() for c in name):
        raise sec.error("name", f"must be a non-empty name without spaces, got {_show(sec.raw('name'))}")
    ep_type = sec.string("type", ENDPOINT_TYPE)
    if ep_type not in (ENDPOINT_TYPE, "dmr"):
        raise sec.error("type", f'olladmr serves only "{ENDPOINT_TYPE}" endpoints, got {_show(ep_type)}')
    check_interval = sec.duration("check_interval", 10.0, minimum=0.1)
    check_timeout = sec.duration("check_timeout", min(5.0, check_interval), minimum=0.01)
    if check_timeout > check_interval:
        raise sec.error(
            "check_timeout",
            f"must not be longer than check_interval ({_fmt_seconds(check_interval)}), got {_show(sec.raw('check_timeout'))}",
        )
    endpoint = EndpointConfig(
        name=name,
        url=url,
        type=ENDPOINT_TYPE,
        priority=sec.integer("priority", 100, minimum=0),
        model_url=_parse_path(sec, "model_url", DEFAULT_MODELS_PATH),
        health_check_url=_parse_path(sec, "health_check_url", DEFAULT_MODELS_PATH),
        check_interval=check_interval,
        check_timeout=check_timeout,
        headers=_parse_headers(sec, "headers"),
        max_concurrent=sec.integer("max_concurrent", 0, minimum=0),
        queue_size=sec.integer("queue_size", 64, minimum=0),
        queue_timeout=sec.duration("queue_timeout", 30.0),
        forward_client_auth=sec.boolean("forward_client_auth", False),
        auth_header=_parse_outbound_auth(sec, environ),
    )
    sec.finish()
    return endpoint


def _parse_endpoints(
    items: Iterable[object], path: str, source: str, sink: list[str], environ: Mapping[str, str] = os.environ
) -> tuple[EndpointConfig, ...]:
    endpoints: list[EndpointConfig] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        ep = _parse_endpoint(item, where, source, sink, environ)
        if ep.name in seen:
            raise ConfigError(
                source, f"{where}.name", f'duplicate endpoint name "{ep.name}" (also {path}[{seen[ep.name]}])'
            )
        seen[ep.name] = index
        endpoints.append(ep)
    return tuple(endpoints)


def parse_config(document: object, source: str = "<config>", environ: Mapping[str, str] = os.environ) -> Config:
    """
    Validate a parsed YAML document into a :class:`Config`.

    An empty document gives the built-in defaults.  Raises
    :class:`ConfigError` on the first problem found.
    """
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(source, "", f"expected a mapping at the top level, got {_show(document)}")
    sink: list[str] = []
    top = _Section(document, "", source, "", sink)

    srv = top.section("server")
    limits = srv.section("request_limits")
    request_limits = RequestLimits(
        max_body_size=limits.get("max_body_size", 50 * 1024**2, parse_size, 'a size such as "50MB"'),
        max_header_size=limits.get("max_header_size", 512 * 1024, parse_size, 'a size such as "512KB"'),
    )
    limits.finish()
    if request_limits.max_header_size < 4096:
        raise limits.error("max_header_size", "must be at least 4KB")
    admin = srv.section("admin")
    reload_endpoint = admin.boolean("reload_endpoint", False)
    admin.finish()
    host = srv.string("host", DEFAULT_HOST).strip()
    if not host or any(c.isspace() for c in host):
        raise srv.error("host", f"expected an address such as \"127.0.0.1\", got {_show(srv.raw('host'))}")
    if host == "localhost":
        host = DEFAULT_HOST
    server = ServerConfig(
        host=host,
        port=srv.integer("port", DEFAULT_PORT, minimum=0, maximum=65535),
        shutdown_timeout=srv.duration("shutdown_timeout", 30.0),
        read_header_timeout=srv.duration("read_header_timeout", 10.0),
        read_timeout=srv.duration("read_timeout", 30.0),
        idle_timeout=srv.duration("idle_timeout", 120.0),
        request_limits=request_limits,
        reload_endpoint=reload_endpoint,
        rate_limits=parse_rate_limits(srv.section("rate_limits")),
        auth=parse_auth(srv.section("auth"), environ),
        cors=parse_cors(srv.section("cors")),
    )
    srv.finish()

    prx = top.section("proxy")
    proxy = ProxyConfig(
        load_balancer=prx.choice("load_balancer", "priority", BALANCERS),
        connection_timeout=prx.duration("connection_timeout", 10.0, minimum=0.001),
        response_header_timeout=prx.duration("response_header_timeout", 300.0, minimum=0.001),
        read_timeout=prx.duration("read_timeout", 600.0),
        request_timeout=prx.duration("request_timeout", 0.0),
        idle_connection_timeout=prx.duration("idle_connection_timeout", 30.0, minimum=0.1),
        max_idle_connections=prx.integer("max_idle_connections", 32, minimum=0),
        breaker_failures=prx.integer("breaker_failures", 5, minimum=1),
        breaker_cooldown=prx.duration("breaker_cooldown", 30.0, minimum=0.1),
        busy_threshold=prx.duration("busy_threshold", 5.0, minimum=0.001),
    )
    prx.finish()

    disc = top.section("discovery")
    disc_type = disc.string("type", "static")
    if disc_type != "static":
        raise disc.error("type", f'only "static" discovery is supported, got {_show(disc_type)}')
    static = disc.section("static")
    endpoints = _parse_endpoints(static.sequence("endpoints"), "discovery.static.endpoints", source, sink, environ)
    static.finish()
    md = disc.section("model_discovery", "discovery.model_discovery")
    md.boolean("enabled", True)
    model_discovery_interval = md.duration("interval", 300.0, minimum=1.0)
    md.duration("timeout", 30.0)
    md.finish()
    disc.finish()

    short = top.sequence("endpoints")
    if short:
        if endpoints:
            raise top.error("endpoints", "give endpoints either here or under discovery.static.endpoints, not both")
        endpoints = _parse_endpoints(short, "endpoints", source, sink, environ)

    log = top.section("logging")
    logging = LoggingConfig(
        level=log.choice("level", "info", LOG_LEVELS + ("warning",)).replace("warning", "warn"),
        format=log.choice("format", "text", LOG_FORMATS),
    )
    if log.has("output"):
        output = log.string("output", "stdout")
        if output not in ("stdout", "stderr"):
            raise log.error("output", f'expected stdout or stderr, got {_show(output)}')
    log.finish()

    top.finish()
    if not endpoints:
        endpoints = (default_endpoint(),)
    return Config(
        server=server,
        proxy=proxy,
        endpoints=endpoints,
        logging=logging,
        model_discovery_interval=model_discovery_interval,
        source=source,
        ignored=tuple(sink),
    )


def load_config(path: str, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate the YAML file at ``path``."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read file: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(path, where, f"invalid YAML: {problem}") from None
    return parse_config(document, source=path, environ=environ)


SEARCH_PATH = ("./config.yaml", "/etc/olladmr/config.yaml")


def find_config(explicit: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """
    The config file to use: ``--config``, then ``$OLLA_CONFIG_FILE``, then
    ``./config.yaml``, then ``/etc/olladmr/config.yaml``; ``None`` means the
    built-in defaults.  An explicitly named file is returned even if missing
    (so that loading it reports the problem).
    """
    if explicit:
        return explicit
    from_env = environ.get("OLLA_CONFIG_FILE")
    if from_env:
        return from_env
    for candidate in SEARCH_PATH:
        if os.path.exists(candidate):
            return candidate
    return None


def resolve_config(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Config:
    """Find and load the configuration (or the built-in defaults)."""
    path = find_config(explicit, environ)
    if path is None:
        return default_config()
    return load_config(path)
