"""
Parsing: a YAML document in, a validated :class:`~olladmr.config.schema.Config` out.

``parse_config`` is a pure function from a parsed YAML document to a
:class:`Config`.  Every problem is raised as a
:class:`~olladmr.config.reader.ConfigError` naming the file, the key path
and what is wrong, on one line.

Olla's layout (``server`` / ``proxy`` / ``discovery.static.endpoints`` /
``logging`` / ``model_aliases``) and the short form (a top-level
``endpoints`` list) are both accepted.  Every key Olla v0.0.28 documents
loads: the ones olladmr can honour are read into the schema; the others
(:data:`OLLA_IGNORED`) are accepted with any value and listed in
:attr:`Config.ignored` so the daemon can warn about them; any other unknown
key is an error.  Every section's parser lives here, next to the others, so
the features (auth, CORS, rate limits, ...) import only the schema.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import re
import unicodedata
from collections import deque
from typing import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from ..names import normalise_model
from .reader import ConfigError, Section, count, fmt_seconds, parse_duration, parse_size, show_value
from .schema import (
    AFFINITY_KEY_SOURCES,
    CACHED_AFTER,
    PLACEMENTS,
    BALANCERS,
    DEFAULT_CORS_HEADERS,
    DEFAULT_CORS_METHODS,
    DEFAULT_EXPOSED_HEADERS,
    DEFAULT_HOST,
    DEFAULT_MODELS_PATH,
    DEFAULT_PORT,
    DEFAULT_PS_PATH,
    DEFAULT_TRUSTED_PROXY_CIDRS,
    ENDPOINT_TYPE,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_AFFINITY_PREFIX_BYTES,
    AffinityConfig,
    AuthConfig,
    Config,
    CorsConfig,
    EndpointConfig,
    IPNetwork,
    LoggingConfig,
    LostRequestsConfig,
    ProxyConfig,
    RateLimitConfig,
    RequestLimits,
    ResponseAffinityConfig,
    ServerConfig,
    default_endpoint,
)

#: The ignored-keys table entry shared by every endpoint (``discovery.static.endpoints[i]``
#: and the short form's ``endpoints[i]``).
ENDPOINT_SECTION = "discovery.static.endpoints[]"

# Keys that Olla (v0.0.28: internal/config/types.go, config/config.yaml and
# docs/content/configuration/reference.md) understands and olladmr has no use
# for, per section.  They are accepted with any value (so an Olla file loads)
# and reported in Config.ignored; the daemon warns about them once.  Every
# other Olla key is honoured (read into the schema); a key neither Olla nor
# olladmr knows is an error.
OLLA_IGNORED: dict[str, frozenset[str]] = {
    "": frozenset(
        {
            "model_registry",  # type, enable_unifier, unification.*, routing_strategy.*: one fixed strategy here
            "translators",  # translators.anthropic.*: no Anthropic translation in olladmr
            "engineering",  # show_nerdstats
            "dashboard",  # newer Olla (after v0.0.28): no dashboard here
        }
    ),
    "server": frozenset({"request_logging", "write_timeout"}),
    "server.rate_limits": frozenset({"per_endpoint"}),  # in Olla's sample file, read by nothing
    "proxy": frozenset(
        {
            "engine",
            "profile",
            "connection_keep_alive",
            "response_timeout",
            "tls_handshake_timeout",
            "stream_buffer_size",
            "max_retries",
            "retry_backoff",
            "retry",
            "profile_filter",
        }
    ),
    "discovery": frozenset({"refresh_interval", "health_check"}),
    "discovery.model_discovery": frozenset({"timeout", "concurrent_workers", "retry_attempts", "retry_backoff"}),
    ENDPOINT_SECTION: frozenset({"preserve_path", "model_filter", "tags"}),  # tags: in Olla's Lemonade guide only
}


# --------------------------------------------------------------------------
# ${VAR} placeholders (Olla's envresolver syntax, in header and credential values)

_PLACEHOLDER = re.compile(r"\$\{([^}]+)\}")


def expand_env(value: str, environ: Mapping[str, str], fail: Callable[[str], ConfigError]) -> str:
    """
    Replace ``${VAR}`` and ``${VAR:-default}`` in ``value`` from ``environ``.

    As in Olla: no bare ``$VAR``; the default applies when the variable is
    unset or empty; an unset variable without a default is an error (which
    names the variable, never the value).
    """
    if "${" not in value:
        return value
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name, sep, fallback = match.group(1).partition(":-")
        found = environ.get(name)
        if found:
            return found
        if sep:
            return fallback
        if found is None:
            missing.append(name)
        return ""

    expanded = _PLACEHOLDER.sub(substitute, value)
    if missing:
        raise fail(f"environment variable {missing[0]} is not set (and the ${{...}} placeholder has no :-default)")
    return expanded


def read_text_file(section: Section, key: str, path: str) -> str:
    """The UTF-8 text of the file ``path`` named by ``key``, or a ConfigError naming both."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise section.error(key, f'cannot read "{path}": {exc.strerror or exc}') from None
    except UnicodeDecodeError:
        raise section.error(key, f'"{path}" is not UTF-8 text') from None


# --------------------------------------------------------------------------
# Endpoints

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
)


def _parse_url(section: Section, key: str) -> str:
    raw = section.raw(key)
    if raw is None:
        raise section.error(key, "is required")
    if not isinstance(raw, str) or not raw.strip():
        raise section.error(key, f"expected a URL such as \"http://localhost:12434\", got {show_value(raw)}")
    text = raw.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise section.error(key, f"not a valid URL ({exc}): {show_value(raw)}") from None
    if parts.scheme not in ("http", "https"):
        raise section.error(key, f"must start with http:// or https://, got {show_value(raw)}")
    if not parts.hostname:
        raise section.error(key, f"has no host: {show_value(raw)}")
    if parts.username is not None or parts.password is not None:
        raise section.error(key, "must not carry credentials (user:password@); configure them elsewhere")
    if parts.query or parts.fragment:
        raise section.error(key, f"must not have a query or fragment: {show_value(raw)}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _parse_path(section: Section, key: str, default: str) -> str:
    value = section.string(key, default)
    if not value.startswith("/") or any(c in value for c in " \r\n\t#"):
        raise section.error(key, f"expected a path starting with \"/\", got {show_value(value)}")
    return value


def _parse_headers(section: Section, key: str, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    value = section.raw(key)
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise section.error(key, f"expected a mapping of header names to values, got {show_value(value)}")
    out: list[tuple[str, str]] = []
    for name, val in value.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise section.error(where, "is not a valid header name")
        if name.lower() in _RESERVED_HEADERS or name.lower().startswith(("x-olla-", "proxy-")):
            raise section.error(where, "is managed by olladmr and cannot be set")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise section.error(where, f"expected a string, got {show_value(val)}")
        sval = expand_env(str(val), environ, lambda problem: section.error(where, problem))
        if any(c in sval for c in "\r\n\x00"):
            raise section.error(where, "must not contain line breaks")
        out.append((name, sval))
    return tuple(out)


AUTH_TYPES = ("bearer", "api_key", "basic")
#: Credential keys by auth type, each a group of alternatives of which exactly one is given.
_AUTH_SOURCES: dict[str, tuple[tuple[str, ...], ...]] = {
    "bearer": (("token", "token_file", "token_env"),),
    "api_key": (("key", "key_file"),),
    "basic": (("username", "username_file"), ("password", "password_file")),
}
_AUTH_KEYS = ("token", "token_file", "token_env", "key", "key_file", "username", "username_file", "password", "password_file")


def _credential(sec: Section, group: tuple[str, ...], environ: Mapping[str, str]) -> tuple[str, str]:
    """The one credential of ``group`` that is given, resolved: (key it came from, value)."""
    given = [key for key in group if sec.has(key)]
    if len(given) != 1:
        choices = ", ".join(group[:-1]) + f" or {group[-1]}"
        raise sec.error(group[0], f"give exactly one of {choices}")
    source = given[0]
    value = sec.string(source, "")
    if source.endswith("_file"):
        text = read_text_file(sec, source, value).strip()
    elif source.endswith("_env"):
        text = environ.get(value, "").strip()
        if not text:
            raise sec.error(source, f"environment variable {value} is not set or empty")
    else:
        text = expand_env(value, environ, lambda problem: sec.error(source, problem)).strip()
    if not text or any(c in text for c in "\r\n\x00"):
        raise sec.error(source, f"the {source.partition('_')[0]} is empty or contains line breaks")
    return source, text


def _parse_outbound_auth(parent: Section, environ: Mapping[str, str]) -> tuple[str, bytes] | None:
    """
    ``auth:`` -> (header name, header value) for every upstream request, as in Olla:
    ``bearer`` (token | token_file | token_env) -> ``Authorization: Bearer ...``;
    ``api_key`` (key | key_file, header: X-Api-Key) -> ``X-Api-Key: ...``;
    ``basic`` (username | username_file, password | password_file) -> ``Authorization: Basic ...``.
    Inline values may use ``${VAR}`` / ``${VAR:-default}``; files are read now
    (again on each reload).  Errors never echo a credential.
    """
    if not parent.has("auth"):
        parent.raw("auth")
        return None
    sec = parent.section("auth", f"{ENDPOINT_SECTION}.auth")
    kind = sec.choice("type", "bearer", AUTH_TYPES)
    groups = _AUTH_SOURCES[kind]
    allowed = {key for group in groups for key in group}
    for key in _AUTH_KEYS:
        if key not in allowed and sec.has(key):
            raise sec.error(key, f"does not apply to auth type {kind}")
    if kind != "api_key":
        if sec.has("header"):
            raise sec.error("header", f"does not apply to auth type {kind} (only to api_key)")
        sec.raw("header")
    for key in _AUTH_KEYS:
        sec.raw(key)  # the null ones
    resolved = [_credential(sec, group, environ) for group in groups]
    header = "authorization"
    if kind == "bearer":
        source, token = resolved[0]
        if " " in token:
            raise sec.error(source, "the token contains spaces")
        value = "Bearer " + token
    elif kind == "api_key":
        header = sec.string("header", "X-Api-Key").strip()
        if not _HEADER_NAME.match(header):
            raise sec.error("header", f"expected a header name such as \"X-Api-Key\", got {show_value(header)}")
        if header.lower() in _RESERVED_HEADERS or header.lower().startswith(("x-olla-", "proxy-")):
            raise sec.error("header", "is managed by olladmr and cannot be set")
        value = resolved[0][1]
    else:
        (user_source, user), (_, password) = resolved
        if ":" in user:
            raise sec.error(user_source, 'the username must not contain ":"')
        value = "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
    sec.finish()
    return header, value.encode("utf-8")


def _parse_endpoint(parent: Section, item: object, path: str, environ: Mapping[str, str]) -> EndpointConfig:
    if not isinstance(item, dict):
        raise ConfigError(parent.source, path, f"expected a mapping with at least a url, got {show_value(item)}")
    sec = parent.item(item, path, ENDPOINT_SECTION)
    url = _parse_url(sec, "url")
    default_name = urlsplit(url).netloc
    name = sec.string("name", default_name).strip()
    if not name or any(c.isspace() or not c.isprintable() for c in name):
        raise sec.error("name", f"must be a non-empty name without spaces, got {show_value(sec.raw('name'))}")
    ep_type = sec.string("type", ENDPOINT_TYPE)
    if ep_type not in (ENDPOINT_TYPE, "dmr"):
        raise sec.error("type", f'olladmr serves only "{ENDPOINT_TYPE}" endpoints, got {show_value(ep_type)}')
    check_interval = sec.duration("check_interval", 10.0, minimum=0.1)
    check_timeout = sec.duration("check_timeout", min(5.0, check_interval), minimum=0.01)
    if check_timeout > check_interval:
        raise sec.error(
            "check_timeout",
            f"must not be longer than check_interval ({fmt_seconds(check_interval)}), got {show_value(sec.raw('check_timeout'))}",
        )
    auth = _parse_outbound_auth(sec, environ)
    endpoint = EndpointConfig(
        name=name,
        url=url,
        type=ENDPOINT_TYPE,
        priority=sec.integer("priority", 100, minimum=0),
        model_url=_parse_path(sec, "model_url", DEFAULT_MODELS_PATH),
        health_check_url=_parse_path(sec, "health_check_url", DEFAULT_MODELS_PATH),
        ps_url=_parse_path(sec, "ps_url", DEFAULT_PS_PATH),
        check_interval=check_interval,
        check_timeout=check_timeout,
        headers=_parse_headers(sec, "headers", environ),
        max_concurrent=sec.integer("max_concurrent", 0, minimum=0),
        queue_size=sec.integer("queue_size", 64, minimum=0),
        queue_timeout=sec.duration("queue_timeout", 30.0),
        forward_client_auth=sec.boolean("forward_client_auth", False),
        slots=sec.integer("slots", 4, minimum=1),
        cache_tokens=sec.integer("cache_tokens", 0, minimum=0),
        auth_header=None if auth is None else auth[1],
        auth_header_name="authorization" if auth is None else auth[0],
    )
    sec.finish()
    return endpoint


def _parse_endpoints(
    parent: Section, items: Iterable[object], path: str, environ: Mapping[str, str]
) -> tuple[EndpointConfig, ...]:
    endpoints: list[EndpointConfig] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        ep = _parse_endpoint(parent, item, where, environ)
        if ep.name in seen:
            raise ConfigError(
                parent.source, f"{where}.name", f'duplicate endpoint name "{ep.name}" (also {path}[{seen[ep.name]}])'
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
        raise ConfigError(source, "", f"expected a mapping at the top level, got {show_value(document)}")
    sink: list[str] = []
    top = Section(document, "", source, sink, OLLA_IGNORED)

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
    dashboard = admin.boolean("dashboard", True)
    admin.finish()
    host = srv.string("host", DEFAULT_HOST).strip()
    if not host or any(c.isspace() for c in host):
        raise srv.error("host", f"expected an address such as \"127.0.0.1\", got {show_value(srv.raw('host'))}")
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
        dashboard=dashboard,
        rate_limits=parse_rate_limits(srv.section("rate_limits")),
        auth=parse_auth(srv.section("auth"), environ),
        cors=parse_cors(srv.section("cors")),
    )
    srv.finish()

    prx = top.section("proxy")
    aff = prx.section("response_affinity")
    response_affinity = ResponseAffinityConfig(
        max_entries=aff.integer("max_entries", 100_000, minimum=1, maximum=10_000_000),
        ttl=aff.duration("ttl", 3600.0, minimum=1.0),
        probe_timeout=aff.duration("probe_timeout", 2.0, minimum=0.01),
        max_concurrent_probes=aff.integer("max_concurrent_probes", 32, minimum=1),
    )
    aff.finish()
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
        response_affinity=response_affinity,
        affinity=parse_affinity(prx),
        lost_requests=parse_lost_requests(prx.section("lost_requests")),
    )
    prx.finish()

    disc = top.section("discovery")
    disc_type = disc.string("type", "static")
    if disc_type != "static":
        raise disc.error("type", f'only "static" discovery is supported, got {show_value(disc_type)}')
    static = disc.section("static")
    endpoints = _parse_endpoints(static, static.sequence("endpoints"), "discovery.static.endpoints", environ)
    static.finish()
    md = disc.section("model_discovery", "discovery.model_discovery")
    if not md.boolean("enabled", True):
        md.report_ignored("enabled")  # olladmr always learns each endpoint's models
    model_discovery_interval = md.duration("interval", 300.0, minimum=1.0)
    md.finish()
    disc.finish()

    short = top.sequence("endpoints")
    if short:
        if endpoints:
            raise top.error("endpoints", "give endpoints either here or under discovery.static.endpoints, not both")
        endpoints = _parse_endpoints(top, short, "endpoints", environ)

    log = top.section("logging")
    logging = LoggingConfig(
        level=log.choice("level", "info", LOG_LEVELS + ("warning",)).replace("warning", "warn"),
        format=log.choice("format", "text", LOG_FORMATS),
    )
    if log.has("output"):
        output = log.string("output", "stdout")
        if output not in ("stdout", "stderr", "file"):
            raise log.error("output", f"expected stdout, stderr or file, got {show_value(output)}")
        if output != "stdout":
            log.report_ignored("output")  # olladmr logs to stdout (twistd's --logfile/--logger redirect it)
    log.finish()

    model_aliases = parse_model_aliases(top, "model_aliases")

    top.finish()
    if not endpoints:
        endpoints = (default_endpoint(),)
    return Config(
        server=server,
        proxy=proxy,
        endpoints=endpoints,
        logging=logging,
        model_discovery_interval=model_discovery_interval,
        model_aliases=model_aliases,
        source=source,
        ignored=tuple(sink),
    )


# --------------------------------------------------------------------------
# proxy.affinity, and Olla's proxy.sticky_sessions

#: Olla's key source names (``proxy.sticky_sessions.key_sources``) -> olladmr's.
OLLA_KEY_SOURCES: dict[str, str] = {
    "session_header": "session_header",
    "prefix_hash": "prefix",
    "auth_header": "auth",
    "ip": "ip",
}


def _key_sources(section: Section, names: Mapping[str, str], default: tuple[str, ...]) -> tuple[str, ...]:
    """``key_sources``: names from ``names`` (case-insensitive), each once, in order, mapped to olladmr's."""
    if not section.has("key_sources"):
        section.raw("key_sources")
        return default
    out: list[str] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(section.sequence("key_sources")):
        where = f"key_sources[{index}]"
        name = item.lower() if isinstance(item, str) else ""
        source = names.get(name)
        if source is None:
            raise section.error(where, f"expected one of {', '.join(names)}, got {show_value(item)}")
        if name in seen:
            raise section.error(where, f'"{name}" is listed twice (also [{seen[name]}])')
        seen[name] = index
        out.append(source)
    return tuple(out)


def _prefix_bytes(section: Section, key: str, default: int) -> int:
    """A byte count (``1024`` or ``"4KB"``) from 16 bytes to 1MiB."""
    value = section.get(key, default, parse_size, 'a number of bytes such as 1024 or a size such as "4KB"')
    if value < 16:
        raise section.error(key, f"must be at least 16 bytes, got {show_value(section.raw(key))}")
    if value > MAX_AFFINITY_PREFIX_BYTES:
        raise section.error(
            key, f"must be at most 1MiB ({MAX_AFFINITY_PREFIX_BYTES} bytes), got {show_value(section.raw(key))}"
        )
    return value


def _finite(section: Section, key: str, value: float) -> float:
    """``value`` unless it is infinite or NaN (YAML's .inf and .nan)."""
    if not math.isfinite(value):
        raise section.error(key, f"expected a finite number, got {value}")
    return value


def _check_sources(section: Section, config: AffinityConfig, names: Mapping[str, str]) -> AffinityConfig:
    """Refuse ``enabled`` with no key sources; finish the section."""
    if config.enabled and not config.key_sources:
        raise section.error(
            "key_sources", f"is empty but enabled is true; list at least one of {', '.join(names)} (or set enabled: false)"
        )
    section.finish()
    return config


def parse_lost_requests(section: Section) -> LostRequestsConfig:
    """``proxy.lost_requests``: the once-only retry of a request an upstream lost before answering."""
    config = LostRequestsConfig(
        retry=section.boolean("retry", True),
        hang_after=section.duration("hang_after", 5.0, minimum=0.01),
        hang_factor=section.number("hang_factor", 20.0, minimum=1.0),
    )
    section.finish()
    return config


def parse_affinity(proxy: Section) -> AffinityConfig:
    """
    Read session affinity from the ``proxy`` section: ``proxy.affinity``, or
    Olla's ``proxy.sticky_sessions`` (the same settings under Olla's names),
    never both.

    ``proxy.affinity``: ``enabled`` (default true), ``key_sources`` (of
    session_header, prefix, auth, ip; tried in order), ``prefix_bytes``
    (16 bytes to 1MiB), ``max_sessions``, ``idle_ttl`` (a duration, at
    least 1s) and ``load_factor`` (at least 1).  ``proxy.sticky_sessions``:
    ``enabled`` (default false, as in Olla: a file that has the section but
    does not turn it on gets no affinity), ``idle_ttl_seconds``,
    ``max_sessions``, ``key_sources`` (Olla's names: session_header,
    prefix_hash, auth_header, ip) and ``prefix_hash_bytes``; every other
    setting takes olladmr's default.  A null section counts as absent.
    Everything is validated even while ``enabled`` is false.
    """
    defaults = AffinityConfig()
    if proxy.has("sticky_sessions"):
        if proxy.has("affinity"):
            raise proxy.error(
                "sticky_sessions",
                "cannot be given together with proxy.affinity (the same settings under Olla's name); keep one of them",
            )
        proxy.raw("affinity")
        olla = proxy.section("sticky_sessions")
        enabled = olla.boolean("enabled", False)
        idle_ttl = _finite(olla, "idle_ttl_seconds", olla.number("idle_ttl_seconds", defaults.idle_ttl, minimum=1.0))
        config = AffinityConfig(
            enabled=enabled,
            key_sources=_key_sources(olla, OLLA_KEY_SOURCES, defaults.key_sources),
            prefix_bytes=_prefix_bytes(olla, "prefix_hash_bytes", defaults.prefix_bytes),
            max_sessions=olla.integer("max_sessions", defaults.max_sessions, minimum=1),
            idle_ttl=idle_ttl,
            load_factor=defaults.load_factor,
        )
        return _check_sources(olla, config, OLLA_KEY_SOURCES)
    proxy.raw("sticky_sessions")
    sec = proxy.section("affinity")
    names = {name: name for name in AFFINITY_KEY_SOURCES}
    config = AffinityConfig(
        enabled=sec.boolean("enabled", defaults.enabled),
        key_sources=_key_sources(sec, names, defaults.key_sources),
        prefix_bytes=_prefix_bytes(sec, "prefix_bytes", defaults.prefix_bytes),
        max_sessions=sec.integer("max_sessions", defaults.max_sessions, minimum=1),
        idle_ttl=sec.duration("idle_ttl", defaults.idle_ttl, minimum=1.0),
        load_factor=_finite(sec, "load_factor", sec.number("load_factor", defaults.load_factor, minimum=1.0)),
        placement=sec.choice("placement", defaults.placement, PLACEMENTS),
        block_chars=sec.integer("block_chars", defaults.block_chars, minimum=16, maximum=65536),
        cache_tokens=sec.integer("cache_tokens", defaults.cache_tokens, minimum=1),
        request_tokens=sec.integer("request_tokens", defaults.request_tokens, minimum=0),
        move_cost=_finite(sec, "move_cost", sec.number("move_cost", defaults.move_cost, minimum=0.0)),
        stay_while_free=sec.boolean("stay_while_free", defaults.stay_while_free),
        cached_after=sec.choice("cached_after", defaults.cached_after, CACHED_AFTER),
    )
    return _check_sources(sec, config, names)


# --------------------------------------------------------------------------
# server.auth

KEY_HINT = "hash the key with: printf %s 'KEY' | sha256sum"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _digest(value: object, fail: Callable[[str], ConfigError]) -> bytes:
    """One configured digest as 32 bytes; never echoes the value (it might be a key pasted by mistake)."""
    if not isinstance(value, str):
        raise fail(f"expected a SHA-256 hex digest as a quoted string, got {type(value).__name__}")
    text = value.strip()
    if not _HEX_DIGEST.fullmatch(text):
        if len(text) == 64:
            problem = "got 64 characters that are not all hex digits"
        else:
            problem = f"got {len(text)} characters"
        raise fail(f"expected a SHA-256 hex digest (64 hex characters), {problem}; {KEY_HINT}")
    return bytes.fromhex(text)


def _read_digest_file(section: Section, key: str) -> list[bytes]:
    path = section.string(key, "").strip()
    if not path:
        raise section.error(key, "expected a file name")
    lines = read_text_file(section, key, path).splitlines()
    digests: list[bytes] = []
    for number, line in enumerate(lines, 1):
        text = line.partition("#")[0].strip()
        if text:
            digests.append(_digest(text, lambda problem: section.error(key, f"{path} line {number}: {problem}")))
    if not digests:
        raise section.error(key, f'"{path}" holds no key digests (one per line; "#" starts a comment)')
    return digests


def _read_digest_env(section: Section, key: str, environ: Mapping[str, str]) -> list[bytes]:
    name = section.string(key, "").strip()
    if not _ENV_NAME.fullmatch(name):
        raise section.error(key, f'expected an environment variable name, got "{name}"')
    value = environ.get(name)
    if value is None:
        raise section.error(key, f"environment variable {name} is not set")
    digests: list[bytes] = []
    for index, part in enumerate(value.split(",")):
        if part.strip():
            digests.append(_digest(part, lambda problem: section.error(key, f"${name} entry {index + 1}: {problem}")))
    if not digests:
        raise section.error(key, f"environment variable {name} holds no key digests (comma-separated)")
    return digests


def _digests(section: Section, base: str, environ: Mapping[str, str]) -> tuple[bytes, ...]:
    """The digests of ``base``, ``base_file`` and ``base_env`` together, each once, in order."""
    found: dict[bytes, None] = {}
    for index, item in enumerate(section.sequence(base)):
        found[_digest(item, lambda problem: section.error(f"{base}[{index}]", problem))] = None
    if section.has(f"{base}_file"):
        found.update(dict.fromkeys(_read_digest_file(section, f"{base}_file")))
    else:
        section.raw(f"{base}_file")
    if section.has(f"{base}_env"):
        found.update(dict.fromkeys(_read_digest_env(section, f"{base}_env", environ)))
    else:
        section.raw(f"{base}_env")
    return tuple(found)


def parse_auth(section: Section, environ: Mapping[str, str] = os.environ) -> AuthConfig:
    """
    Read a ``server.auth`` section into an :class:`AuthConfig`.

    Files are read and environment variables looked up now (again on each
    reload).  Raises :class:`~olladmr.config.ConfigError` naming the key
    and, for files, the file and line.
    """
    api = _digests(section, "api_keys", environ)
    admin = _digests(section, "admin_keys", environ)
    rpm = section.integer("requests_per_minute", 0, minimum=0)
    if rpm and not api:
        raise section.error("requests_per_minute", "is a per-API-key limit but no api_keys are configured")
    section.finish()
    return AuthConfig(api_key_digests=api, admin_key_digests=admin, per_key_requests_per_minute=rpm)


# --------------------------------------------------------------------------
# server.cors

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://(\[[0-9a-f:.]+\]|[^\s/?#:\[\]@]+)(:[0-9]{1,5})?")


def _strings(section: Section, key: str, default: tuple[str, ...], check: re.Pattern[str], what: str) -> tuple[str, ...]:
    if not section.has(key):
        section.raw(key)
        return default
    out: list[str] = []
    for index, item in enumerate(section.sequence(key)):
        text = item.strip() if isinstance(item, str) else None
        if not text or not (text == "*" or check.fullmatch(text)):
            raise section.error(f"{key}[{index}]", f"expected {what}, got {show_value(item)}")
        out.append(text)
    return tuple(out)


def _origin(section: Section, index: int, item: object) -> str:
    text = item.strip().lower() if isinstance(item, str) else ""
    if text == "*":
        return text
    if not _ORIGIN.fullmatch(text):
        problem = 'expected an origin such as "https://app.example.com" or "*"'
        if text.count("/") > 2:
            problem = 'an origin has no path (not even a trailing "/"): expected e.g. "https://app.example.com"'
        raise section.error(f"allowed_origins[{index}]", f"{problem}, got {show_value(item)}")
    return text


def _max_age(value: object) -> int:
    if isinstance(value, int):
        return count(value)
    return int(parse_duration(value))


def parse_cors(section: Section) -> CorsConfig:
    """
    Read a ``server.cors`` section into a :class:`CorsConfig`.

    Everything is validated even while ``enabled`` is false.  Refused:
    ``allow_credentials: true`` with a ``"*"`` origin (browsers would
    reject every answer) and ``enabled: true`` with no origins.
    """
    enabled = section.boolean("enabled", False)
    origins = tuple(dict.fromkeys(_origin(section, i, item) for i, item in enumerate(section.sequence("allowed_origins"))))
    methods = tuple(m.upper() for m in _strings(section, "allowed_methods", DEFAULT_CORS_METHODS, _TOKEN, "an HTTP method"))
    headers = _strings(section, "allowed_headers", DEFAULT_CORS_HEADERS, _TOKEN, "a header name")
    # As in Olla, an empty list means the default: expose the X-Olla-* headers.
    exposed = _strings(section, "exposed_headers", DEFAULT_EXPOSED_HEADERS, _TOKEN, "a header name") or DEFAULT_EXPOSED_HEADERS
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


# --------------------------------------------------------------------------
# server.rate_limits


def parse_rate_limits(section: Section) -> RateLimitConfig:
    """
    Read a ``server.rate_limits`` section into a :class:`RateLimitConfig`.

    Raises :class:`~olladmr.config.ConfigError` naming the key, e.g.
    ``server.rate_limits.trusted_proxy_cidrs[1]: not a valid CIDR ...``.
    """
    global_rpm = section.integer("global_requests_per_minute", 0, minimum=0)
    per_ip_rpm = section.integer("per_ip_requests_per_minute", 0, minimum=0)
    health_rpm = section.integer("health_requests_per_minute", 0, minimum=0)
    burst = section.integer("burst_size", 0, minimum=0)
    cleanup = section.duration("cleanup_interval", 300.0, minimum=1.0)
    trust = section.boolean("trust_proxy_headers", False)
    max_concurrent = section.integer("max_concurrent_per_client", 0, minimum=0)
    cidrs = DEFAULT_TRUSTED_PROXY_CIDRS
    if section.has("trusted_proxy_cidrs"):
        parsed: list[IPNetwork] = []
        for index, item in enumerate(section.sequence("trusted_proxy_cidrs")):
            where = f"trusted_proxy_cidrs[{index}]"
            if not isinstance(item, str):
                raise section.error(where, f'expected a CIDR such as "10.0.0.0/8", got {show_value(item)}')
            try:
                parsed.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise section.error(where, f'not a valid CIDR (such as "10.0.0.0/8"): {show_value(item)}') from None
        cidrs = tuple(parsed)
    if trust and not cidrs:
        raise section.error(
            "trusted_proxy_cidrs",
            "is empty but trust_proxy_headers is true; list the proxies whose X-Forwarded-For may be trusted",
        )
    section.finish()
    return RateLimitConfig(
        global_requests_per_minute=global_rpm,
        per_ip_requests_per_minute=per_ip_rpm,
        health_requests_per_minute=health_rpm,
        burst_size=burst,
        cleanup_interval=cleanup,
        trust_proxy_headers=trust,
        trusted_proxy_cidrs=cidrs,
        max_concurrent_per_client=max_concurrent,
    )


# --------------------------------------------------------------------------
# model_aliases

MAX_MODEL_NAME = 512


def _shown_alias(alias: str) -> str:
    """An alias as it appears in a key path: cut short if very long."""
    return alias if len(alias) <= 64 else alias[:64] + "..."


def _model_name_problem(value: object) -> str | None:
    """What is wrong with ``value`` as an alias or model name, or ``None``."""
    if not isinstance(value, str):
        return f"expected a model name (a string), got {show_value(value)}"
    if not value.strip():
        return "is empty"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return "must not contain control characters"
    if value != value.strip():
        return f"has leading or trailing spaces: {show_value(value)}"
    if len(value) > MAX_MODEL_NAME:
        return f"is longer than {MAX_MODEL_NAME} characters ({len(value)})"
    return None


def parse_model_aliases(parent: Section, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """
    Read Olla's ``model_aliases: {alias: [real model, ...]}`` into ordered pairs.

    Names are kept as written; they are compared the way DMR compares model
    names (:func:`olladmr.names.normalise_model`: ``smollm2`` is
    ``ai/smollm2:latest``).  Refused, each as ``model_aliases.<alias>: ...``:
    an empty, over-long or control-character name; an empty target list;
    the same model twice in one alias; two aliases that are the same name;
    an alias that is itself the target of an alias (its own: it would hide
    the real model; another's: a chain or a cycle).
    """
    raw = parent.raw(key)
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise parent.error(key, f"expected a mapping of alias names to lists of model names, got {show_value(raw)}")
    base = parent.key_path(key)
    source = parent.source
    aliases: list[tuple[str, tuple[str, ...]]] = []
    keys: dict[str, str] = {}  # normalised alias -> alias as written
    for alias, targets in raw.items():
        if isinstance(alias, str) and alias.strip():
            where = f"{base}.{_shown_alias(alias)}"
        else:
            where = base
        if not isinstance(alias, str):
            raise ConfigError(source, base, f"alias names must be strings, got {show_value(alias)}")
        problem = _model_name_problem(alias)
        if problem is not None:
            raise ConfigError(source, where, "an alias name is empty" if where == base else problem)
        normal = normalise_model(alias)
        if normal in keys:
            raise ConfigError(
                source, where, f'is the same alias as "{_shown_alias(keys[normal])}" (both are model "{normal}")'
            )
        keys[normal] = alias
        if not isinstance(targets, list):
            raise ConfigError(source, where, f"expected a list of model names, got {show_value(targets)}")
        if not targets:
            raise ConfigError(source, where, "lists no models; give at least one real model name")
        seen: dict[str, int] = {}
        for index, target in enumerate(targets):
            problem = _model_name_problem(target)
            if problem is not None:
                raise ConfigError(source, f"{where}[{index}]", problem)
            assert isinstance(target, str)
            model = normalise_model(target)
            if model in seen:
                raise ConfigError(
                    source,
                    f"{where}[{index}]",
                    f'"{target}" is listed twice (the same model as [{seen[model]}] "{targets[seen[model]]}")',
                )
            seen[model] = index
        aliases.append((alias, tuple(targets)))
    _check_alias_targets(source, base, aliases, keys)
    return tuple(aliases)


def _check_alias_targets(
    source: str, base: str, aliases: list[tuple[str, tuple[str, ...]]], keys: Mapping[str, str]
) -> None:
    """No alias may be the target of an alias: not its own (it names a real model) nor another's (a chain or cycle)."""
    targets = {alias: [normalise_model(t) for t in models] for alias, models in aliases}
    for alias, models in aliases:
        where = f"{base}.{_shown_alias(alias)}"
        own = normalise_model(alias)
        for index, model in enumerate(targets[alias]):
            if model == own:
                raise ConfigError(
                    source,
                    where,
                    f'names an existing model: it lists itself ([{index}] "{models[index]}"); '
                    "an alias must be a new name, or requests for the real model would be rerouted",
                )
        for index, model in enumerate(targets[alias]):
            if model not in keys:
                continue
            other = keys[model]
            cycle = _alias_cycle(alias, other, targets, keys)
            if cycle is not None:
                problem = "forms a cycle: " + " -> ".join(_shown_alias(a) for a in cycle)
            else:
                problem = (
                    f'[{index}] "{models[index]}" is itself an alias ({base}.{_shown_alias(other)}); '
                    "aliases must list real model names, not other aliases"
                )
            raise ConfigError(source, where, problem)


def _alias_cycle(
    start: str, first: str, targets: Mapping[str, list[str]], keys: Mapping[str, str]
) -> list[str] | None:
    """The aliases ``start -> first -> ... -> start`` if following alias targets from ``first`` leads back."""
    reached_from: dict[str, str] = {first: start}
    queue = deque([first])
    while queue:  # breadth-first, so the cycle reported is a shortest one
        current = queue.popleft()
        for model in targets[current]:
            nxt = keys.get(model)
            if nxt is None:
                continue
            if nxt == start:
                chain = [current]
                while chain[-1] != first:
                    chain.append(reached_from[chain[-1]])
                return [start, *reversed(chain), start]
            if nxt not in reached_from:
                reached_from[nxt] = current
                queue.append(nxt)
    return None
