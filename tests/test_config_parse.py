"""Unit tests for ``olladmr.config.parse``: server.rate_limits, server.auth, server.cors, endpoint auth and headers,
endpoint ps_url, proxy.affinity (and Olla's proxy.sticky_sessions), model_aliases."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from support import headers, section

from olladmr.config import Config, ConfigError, EndpointConfig, load_config, parse_config
from olladmr.config.parse import OLLA_IGNORED, OLLA_KEY_SOURCES, parse_affinity, parse_auth, parse_cors, parse_rate_limits
from olladmr.config.schema import (
    LostRequestsConfig,
    AFFINITY_KEY_SOURCES,
    DEFAULT_EXPOSED_HEADERS,
    DEFAULT_PS_PATH,
    AffinityConfig,
    AuthConfig,
    ProxyConfig,
    RateLimitConfig,
)
from olladmr.edge.auth import Authenticator, hash_key
from olladmr.edge.cors import Cors


def test_parse_rate_limits_reads_olla_keys() -> None:
    """Olla's keys (and max_concurrent_per_client) are read into RateLimitConfig."""
    config = parse_rate_limits(
        section(
            {
                "global_requests_per_minute": 1000,
                "per_ip_requests_per_minute": 100,
                "health_requests_per_minute": 500,
                "burst_size": 50,
                "cleanup_interval": "1m",
                "trust_proxy_headers": True,
                "trusted_proxy_cidrs": ["10.0.0.0/8", "192.168.1.1/24", "::1"],
                "max_concurrent_per_client": 4,
            },
            "server.rate_limits",
        )
    )
    assert (config.global_requests_per_minute, config.per_ip_requests_per_minute, config.burst_size) == (1000, 100, 50)
    assert (config.health_requests_per_minute, config.cleanup_interval, config.max_concurrent_per_client) == (500, 60.0, 4)
    assert [str(n) for n in config.trusted_proxy_cidrs] == ["10.0.0.0/8", "192.168.1.0/24", "::1/128"]
    assert parse_rate_limits(section({}, "server.rate_limits")) == RateLimitConfig()


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"trusted_proxy_cidrs": ["10.0.0.0/8", "10.0.0.0/33"]},
            'c.yaml: server.rate_limits.trusted_proxy_cidrs[1]: not a valid CIDR (such as "10.0.0.0/8"): "10.0.0.0/33"',
        ),
        (
            {"trusted_proxy_cidrs": [8]},
            'c.yaml: server.rate_limits.trusted_proxy_cidrs[0]: expected a CIDR such as "10.0.0.0/8", got 8',
        ),
        ({"burst_size": -1}, "c.yaml: server.rate_limits.burst_size: must be at least 0, got -1"),
        ({"per_ip_requests_per_minute": "lots"}, 'server.rate_limits.per_ip_requests_per_minute: expected a whole number'),
        ({"trust_proxy_headers": True, "trusted_proxy_cidrs": []}, "server.rate_limits.trusted_proxy_cidrs: is empty"),
        ({"requests_per_hour": 5}, "c.yaml: server.rate_limits.requests_per_hour: unknown key"),
    ],
)
def test_parse_rate_limits_errors(data: dict[str, Any], message: str) -> None:
    """Bad rate limit settings are one-line errors naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_rate_limits(section(data, "server.rate_limits"))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_parse_auth_all_three_forms(tmp_path: Path) -> None:
    """Digests from the list, a commented file and an environment variable are merged, each once."""
    keyfile = tmp_path / "keys"
    keyfile.write_text(
        f"# API keys for olladmr\n\n{hash_key('b')}   # team b\n  {hash_key('c').upper()}\n{hash_key('a')}\n"
    )
    environ = {"OLLA_KEYS": f" {hash_key('d')}, ,{hash_key('a')}", "OLLA_ADMIN": hash_key("root")}
    config = parse_auth(
        section(
            {
                "api_keys": [hash_key("a")],
                "api_keys_file": str(keyfile),
                "api_keys_env": "OLLA_KEYS",
                "admin_keys_env": "OLLA_ADMIN",
                "requests_per_minute": 30,
            },
            "server.auth",
        ),
        environ,
    )
    assert config.api_key_digests == tuple(bytes.fromhex(hash_key(k)) for k in "abcd")
    assert config.admin_key_digests == (bytes.fromhex(hash_key("root")),)
    assert config.per_key_requests_per_minute == 30
    auth = Authenticator(config)
    assert auth.identify(headers(x_api_key="c")) == hash_key("c")[:8]
    assert auth.check_admin(headers(x_api_key="root"))
    assert parse_auth(section({}, "server.auth"), {}) == AuthConfig()


def test_parse_auth_admin_file(tmp_path: Path) -> None:
    """admin_keys_file is read like api_keys_file."""
    keyfile = tmp_path / "admin"
    keyfile.write_text(hash_key("root") + "\n")
    config = parse_auth(section({"admin_keys_file": str(keyfile)}, "server.auth"), {})
    assert config.admin_key_digests == (bytes.fromhex(hash_key("root")),)
    assert not Authenticator(config).required


@pytest.mark.parametrize(
    "data, environ, message",
    [
        (
            {"api_keys": [hash_key("a"), "sk-live-secret"]},
            {},
            "c.yaml: server.auth.api_keys[1]: expected a SHA-256 hex digest (64 hex characters), got 14 characters",
        ),
        ({"api_keys": ["z" * 64]}, {}, "server.auth.api_keys[0]: expected a SHA-256 hex digest (64 hex characters), got 64"),
        ({"admin_keys": [12]}, {}, "server.auth.admin_keys[0]: expected a SHA-256 hex digest as a quoted string, got int"),
        ({"api_keys_env": "MISSING"}, {}, "server.auth.api_keys_env: environment variable MISSING is not set"),
        ({"api_keys_env": "EMPTY"}, {"EMPTY": " , "}, "server.auth.api_keys_env: environment variable EMPTY holds no"),
        ({"admin_keys_env": "BAD"}, {"BAD": f"{hash_key('x')},sk-secret"}, "server.auth.admin_keys_env: $BAD entry 2:"),
        ({"api_keys_env": "not a name"}, {}, 'server.auth.api_keys_env: expected an environment variable name'),
        ({"api_keys_file": "/nonexistent/olladmr-keys"}, {}, 'server.auth.api_keys_file: cannot read "/nonexistent/olladmr-keys"'),
        ({"requests_per_minute": 10}, {}, "server.auth.requests_per_minute: is a per-API-key limit but no api_keys"),
        ({"api_key": [hash_key("a")]}, {}, "server.auth.api_key: unknown key"),
    ],
)
def test_parse_auth_rejects_bad_digests(data: dict[str, Any], environ: dict[str, str], message: str) -> None:
    """Bad digests and unusable sources are one-line errors that never echo the value."""
    with pytest.raises(ConfigError) as caught:
        parse_auth(section(data, "server.auth"), environ)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    assert "secret" not in text


def test_parse_auth_file_errors_name_file_and_line(tmp_path: Path) -> None:
    """A bad line in a key file is reported with the file name and line number; an empty file is refused."""
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# comment\n{hash_key('a')}\nsk-oops-a-raw-key\n")
    with pytest.raises(ConfigError) as caught:
        parse_auth(section({"api_keys_file": str(keyfile)}, "server.auth"), {})
    assert f"c.yaml: server.auth.api_keys_file: {keyfile} line 3: expected a SHA-256 hex digest" in str(caught.value)
    assert "oops" not in str(caught.value)
    keyfile.write_text("# nothing here yet\n\n")
    with pytest.raises(ConfigError, match="holds no key digests"):
        parse_auth(section({"api_keys_file": str(keyfile)}, "server.auth"), {})


def test_parse_cors_reads_settings() -> None:
    """parse_cors reads every key, normalises origins and accepts max_age as seconds or a duration."""
    config = parse_cors(
        section(
            {
                "enabled": True,
                "allowed_origins": ["https://App.Example.com", "http://localhost:3000"],
                "allowed_methods": ["get", "post"],
                "allowed_headers": ["Content-Type"],
                "exposed_headers": ["X-Olla-Model"],
                "allow_credentials": True,
                "max_age": "10m",
            },
            "server.cors",
        )
    )
    assert config.allowed_origins == ("https://app.example.com", "http://localhost:3000")
    assert config.allowed_methods == ("GET", "POST")
    assert (config.allow_credentials, config.max_age, config.exposed_headers) == (True, 600, ("X-Olla-Model",))
    assert Cors(config).allows(b"https://app.example.com")
    assert parse_cors(section({"max_age": 86400}, "server.cors")).max_age == 86400


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"allowed_origins": ["*"], "allow_credentials": True},
            'c.yaml: server.cors.allow_credentials: cannot be true while allowed_origins contains "*"',
        ),
        ({"enabled": True}, "server.cors.allowed_origins: is empty but enabled is true"),
        ({"allowed_origins": ["https://app.example.com/"]}, "server.cors.allowed_origins[0]: an origin has no path"),
        ({"allowed_origins": ["app.example.com"]}, 'server.cors.allowed_origins[0]: expected an origin such as'),
        ({"allowed_methods": ["GET POST"]}, 'server.cors.allowed_methods[0]: expected an HTTP method, got "GET POST"'),
        ({"max_age": "soon"}, 'server.cors.max_age: expected a number of seconds or a duration such as "10m", got "soon"'),
        ({"allowed_origin": ["*"]}, "server.cors.allowed_origin: unknown key"),
    ],
)
def test_parse_cors_errors(data: dict[str, Any], message: str) -> None:
    """Bad CORS settings, credentials with "*" among them, are one-line errors naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_cors(section(data, "server.cors"))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_parse_cors_empty_exposed_headers_means_the_olla_headers() -> None:
    """As in Olla, ``exposed_headers: []`` exposes the X-Olla-* headers (the default)."""
    assert parse_cors(section({"exposed_headers": []}, "server.cors")).exposed_headers == DEFAULT_EXPOSED_HEADERS


# --------------------------------------------------------------------------
# discovery.static.endpoints[].auth and .headers (parsed by parse_config)


def _endpoint(environ: dict[str, str] | None = None, **values: Any) -> EndpointConfig:
    config = parse_config({"endpoints": [{"url": "http://h:1", "name": "h", **values}]}, "c.yaml", environ or {})
    return config.endpoints[0]


def test_outbound_auth_types(tmp_path: Path) -> None:
    """Olla's three auth types become one header on every upstream request; credentials never show in repr."""
    keyfile = tmp_path / "key"
    keyfile.write_text("  k-123\n")
    bearer = _endpoint(auth={"type": "bearer", "token": "s3cr3t"})
    assert bearer.encoded_headers == ((b"authorization", b"Bearer s3cr3t"),)
    assert _endpoint({"T": "from-env"}, auth={"token_env": "T"}).encoded_headers == ((b"authorization", b"Bearer from-env"),)
    api_key = _endpoint(auth={"type": "api_key", "key_file": str(keyfile)})
    assert api_key.encoded_headers == ((b"x-api-key", b"k-123"),)
    custom = _endpoint(auth={"type": "api_key", "key": "k", "header": "X-Custom-Key"})
    assert custom.encoded_headers == ((b"x-custom-key", b"k"),)
    basic = _endpoint({"PW": "p@ss"}, auth={"type": "basic", "username": "olla", "password": "${PW}"})
    assert basic.encoded_headers == ((b"authorization", b"Basic " + base64.b64encode(b"olla:p@ss")),)
    for ep in (bearer, api_key, custom, basic):
        assert b"s3cr3t" not in repr(ep).encode() and "k-123" not in repr(ep) and "p@ss" not in repr(ep)


def test_env_placeholders_in_headers_and_credentials() -> None:
    """``${VAR}`` and ``${VAR:-default}`` expand (default when unset or empty); bare ``$VAR`` stays literal."""
    ep = _endpoint(
        {"TEAM": "", "REGION": "eu"},
        headers={"X-Team": "${TEAM:-research}", "X-Where": "${REGION}-${ZONE:-1}", "X-Cost": "$5"},
        auth={"token": "${MISSING:-fallback}"},
    )
    assert ep.headers == (("X-Team", "research"), ("X-Where", "eu-1"), ("X-Cost", "$5"))
    assert ep.auth_header == b"Bearer fallback"


@pytest.mark.parametrize(
    "values, environ, message",
    [
        ({"auth": {"type": "hmac", "token": "t"}}, {}, 'endpoints[0].auth.type: expected one of bearer, api_key, basic, got "hmac"'),
        ({"auth": {"type": "bearer"}}, {}, "endpoints[0].auth.token: give exactly one of token, token_file or token_env"),
        ({"auth": {"token": "a", "token_file": "b"}}, {}, "endpoints[0].auth.token: give exactly one of"),
        ({"auth": {"type": "api_key", "key": "k", "key_file": "f"}}, {}, "endpoints[0].auth.key: give exactly one of key or key_file"),
        ({"auth": {"type": "basic", "username": "u"}}, {}, "endpoints[0].auth.password: give exactly one of password or password_file"),
        ({"auth": {"type": "basic", "username": "a:b", "password": "p"}}, {}, 'endpoints[0].auth.username: the username must not contain ":"'),
        ({"auth": {"type": "bearer", "token": "t", "key": "k"}}, {}, "endpoints[0].auth.key: does not apply to auth type bearer"),
        ({"auth": {"type": "basic", "username": "u", "password": "p", "header": "X-A"}}, {}, "endpoints[0].auth.header: does not apply to auth type basic"),
        ({"auth": {"type": "api_key", "key": "k", "header": "Host"}}, {}, "endpoints[0].auth.header: is managed by olladmr"),
        ({"auth": {"type": "api_key", "key": "k", "header": "X Key"}}, {}, 'endpoints[0].auth.header: expected a header name such as "X-Api-Key"'),
        ({"auth": {"token": "${DMR_SECRET_TOKEN}"}}, {}, "endpoints[0].auth.token: environment variable DMR_SECRET_TOKEN is not set"),
        ({"auth": {"token": "${EMPTY}"}}, {"EMPTY": ""}, "endpoints[0].auth.token: the token is empty or contains line breaks"),
        ({"auth": {"token": "two words"}}, {}, "endpoints[0].auth.token: the token contains spaces"),
        ({"auth": {"type": "api_key", "key_file": "/nonexistent/olladmr-key"}}, {}, 'endpoints[0].auth.key_file: cannot read "/nonexistent/olladmr-key"'),
        ({"auth": {"token": "t", "scheme": "x"}}, {}, "endpoints[0].auth.scheme: unknown key"),
        ({"headers": {"X-A": "${NOPE}"}}, {}, "endpoints[0].headers.X-A: environment variable NOPE is not set"),
    ],
)
def test_outbound_auth_errors(values: dict[str, Any], environ: dict[str, str], message: str) -> None:
    """Bad outbound auth is a one-line error naming the key; it never echoes a credential."""
    with pytest.raises(ConfigError) as caught:
        _endpoint(environ, **values)
    text = str(caught.value)
    assert text.startswith("c.yaml: ") and message in text
    assert "\n" not in text


# --------------------------------------------------------------------------
# discovery.static.endpoints[].ps_url


def test_ps_url_default_and_custom() -> None:
    """``ps_url`` (polled for the models loaded now) defaults to DMR's /engines/ps and may be any path."""
    assert DEFAULT_PS_PATH == "/engines/ps"
    assert _endpoint().ps_url == "/engines/ps"
    assert EndpointConfig(name="x", url="http://x:1").ps_url == "/engines/ps"
    assert _endpoint(ps_url="/dmr/engines/ps").ps_url == "/dmr/engines/ps"
    assert _endpoint(ps_url=None).ps_url == "/engines/ps"  # null: the default, as for model_url
    assert parse_config(None, "c.yaml", {}).endpoints[0].ps_url == "/engines/ps"
    config = parse_config(
        {"discovery": {"static": {"endpoints": [{"url": "http://h:1/base", "ps_url": "/v2/ps"}]}}}, "c.yaml", {}
    )
    assert config.endpoints[0].ps_url == "/v2/ps" and config.ignored == ()


@pytest.mark.parametrize(
    "value, message",
    [
        ("engines/ps", 'c.yaml: endpoints[0].ps_url: expected a path starting with "/", got "engines/ps"'),
        ("", 'c.yaml: endpoints[0].ps_url: expected a path starting with "/", got ""'),
        ("http://h:1/engines/ps", 'c.yaml: endpoints[0].ps_url: expected a path starting with "/", got "http://h:1/engines/ps"'),
        ("/engines ps", 'c.yaml: endpoints[0].ps_url: expected a path starting with "/", got "/engines ps"'),
        ("/engines/ps#x", 'c.yaml: endpoints[0].ps_url: expected a path starting with "/", got "/engines/ps#x"'),
        ("/engines/ps\n", 'c.yaml: endpoints[0].ps_url: expected a path starting with "/", got "/engines/ps\\n"'),
        (5, "c.yaml: endpoints[0].ps_url: expected a string, got 5"),
        (["/engines/ps"], "c.yaml: endpoints[0].ps_url: expected a string, got a list"),
    ],
)
def test_ps_url_errors(value: object, message: str) -> None:
    """``ps_url`` is validated like model_url and health_check_url."""
    with pytest.raises(ConfigError) as caught:
        _endpoint(ps_url=value)
    assert str(caught.value) == message
    with pytest.raises(ConfigError) as model_url:
        _endpoint(model_url=value)
    assert str(model_url.value) == message.replace("ps_url", "model_url")


# --------------------------------------------------------------------------
# proxy.affinity


def _affinity(proxy: object) -> AffinityConfig:
    return parse_config({"proxy": proxy}, "c.yaml", {}).proxy.affinity


def test_affinity_defaults() -> None:
    """Affinity with bounded load is on by default: session header, then prefix; 1KB prefix; 100k sessions; 30m; 1.25."""
    defaults = AffinityConfig()
    assert (defaults.enabled, defaults.key_sources, defaults.prefix_bytes) == (True, ("session_header", "prefix"), 1024)
    assert (defaults.max_sessions, defaults.idle_ttl, defaults.load_factor) == (100_000, 1800.0, 1.25)
    assert ProxyConfig().affinity == defaults
    assert AFFINITY_KEY_SOURCES == ("session_header", "prefix", "auth", "ip")
    assert parse_config(None, "c.yaml", {}).proxy.affinity == defaults
    assert _affinity({}) == defaults
    assert _affinity({"affinity": None}) == defaults
    assert _affinity({"affinity": {}}) == defaults
    assert parse_config({"proxy": {"affinity": {}}}, "c.yaml", {}).ignored == ()


def test_affinity_every_field() -> None:
    """Every proxy.affinity key is read; key_sources keep their order."""
    config = _affinity(
        {
            "affinity": {
                "enabled": True,
                "key_sources": ["ip", "auth", "Prefix", "session_header"],
                "prefix_bytes": 4096,
                "max_sessions": 5000,
                "idle_ttl": "1h30m",
                "load_factor": 2,
            }
        }
    )
    assert config == AffinityConfig(
        enabled=True,
        key_sources=("ip", "auth", "prefix", "session_header"),
        prefix_bytes=4096,
        max_sessions=5000,
        idle_ttl=5400.0,
        load_factor=2.0,
    )
    assert isinstance(config.load_factor, float)
    direct = parse_affinity(section({"affinity": {"key_sources": ["auth"], "load_factor": 1.5}}, "proxy"))
    assert direct == AffinityConfig(key_sources=("auth",), load_factor=1.5)


@pytest.mark.parametrize(
    "values, field, expected",
    [
        ({"enabled": False}, "enabled", False),
        ({"key_sources": ["prefix"]}, "key_sources", ("prefix",)),
        ({"key_sources": ["session_header", "prefix", "auth", "ip"]}, "key_sources", AFFINITY_KEY_SOURCES),
        ({"key_sources": None}, "key_sources", ("session_header", "prefix")),
        ({"prefix_bytes": 16}, "prefix_bytes", 16),
        ({"prefix_bytes": 1024**2}, "prefix_bytes", 1024**2),
        ({"prefix_bytes": "4KB"}, "prefix_bytes", 4096),
        ({"prefix_bytes": "1MiB"}, "prefix_bytes", 1024**2),
        ({"max_sessions": 1}, "max_sessions", 1),
        ({"max_sessions": 10_000_000}, "max_sessions", 10_000_000),
        ({"idle_ttl": "1s"}, "idle_ttl", 1.0),
        ({"idle_ttl": "30m"}, "idle_ttl", 1800.0),
        ({"idle_ttl": "24h"}, "idle_ttl", 86400.0),
        ({"load_factor": 1}, "load_factor", 1.0),
        ({"load_factor": 1.0}, "load_factor", 1.0),
        ({"load_factor": 3.75}, "load_factor", 3.75),
    ],
)
def test_affinity_each_field(values: dict[str, Any], field: str, expected: object) -> None:
    """Each field alone, at its bounds and in each accepted form; the others keep their defaults."""
    config = _affinity({"affinity": values})
    assert getattr(config, field) == expected
    others = {name: getattr(AffinityConfig(), name) for name in AffinityConfig.__dataclass_fields__ if name != field}
    assert {name: getattr(config, name) for name in others} == others


def test_affinity_disabled_needs_no_key_sources_but_is_still_validated() -> None:
    """``enabled: false`` turns affinity off and may list no key sources; bad values are errors all the same."""
    off = _affinity({"affinity": {"enabled": False, "key_sources": []}})
    assert off == AffinityConfig(enabled=False, key_sources=())
    with pytest.raises(ConfigError, match=r'^c.yaml: proxy.affinity.key_sources\[0\]: expected one of'):
        _affinity({"affinity": {"enabled": False, "key_sources": ["x"]}})
    with pytest.raises(ConfigError, match=r"^c.yaml: proxy.affinity.load_factor: must be at least 1, got 0.5$"):
        _affinity({"affinity": {"enabled": False, "load_factor": 0.5}})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"enabled": "yes"}, 'proxy.affinity.enabled: expected true or false, got "yes"'),
        ({"key_sources": ["prefix", "x"]}, 'proxy.affinity.key_sources[1]: expected one of session_header, prefix, auth, ip, got "x"'),
        ({"key_sources": ["prefix_hash"]}, 'proxy.affinity.key_sources[0]: expected one of session_header, prefix, auth, ip, got "prefix_hash"'),
        ({"key_sources": [" prefix"]}, 'proxy.affinity.key_sources[0]: expected one of session_header, prefix, auth, ip, got " prefix"'),
        ({"key_sources": [3]}, "proxy.affinity.key_sources[0]: expected one of session_header, prefix, auth, ip, got 3"),
        ({"key_sources": [None]}, "proxy.affinity.key_sources[0]: expected one of session_header, prefix, auth, ip, got nothing"),
        ({"key_sources": "prefix"}, 'proxy.affinity.key_sources: expected a list, got "prefix"'),
        ({"key_sources": ["prefix", "ip", "prefix"]}, 'proxy.affinity.key_sources[2]: "prefix" is listed twice (also [0])'),
        ({"key_sources": ["auth", "AUTH"]}, 'proxy.affinity.key_sources[1]: "auth" is listed twice (also [0])'),
        (
            {"key_sources": []},
            "proxy.affinity.key_sources: is empty but enabled is true; list at least one of session_header, prefix, auth, ip "
            "(or set enabled: false)",
        ),
        ({"enabled": True, "key_sources": []}, "proxy.affinity.key_sources: is empty but enabled is true;"),
        ({"prefix_bytes": 15}, "proxy.affinity.prefix_bytes: must be at least 16 bytes, got 15"),
        ({"prefix_bytes": 0}, "proxy.affinity.prefix_bytes: must be at least 16 bytes, got 0"),
        ({"prefix_bytes": 1024**2 + 1}, "proxy.affinity.prefix_bytes: must be at most 1MiB (1048576 bytes), got 1048577"),
        ({"prefix_bytes": "2MB"}, 'proxy.affinity.prefix_bytes: must be at most 1MiB (1048576 bytes), got "2MB"'),
        ({"prefix_bytes": -1}, 'proxy.affinity.prefix_bytes: expected a number of bytes such as 1024 or a size such as "4KB", got -1'),
        ({"prefix_bytes": "lots"}, 'proxy.affinity.prefix_bytes: expected a number of bytes such as 1024 or a size such as "4KB", got "lots"'),
        ({"prefix_bytes": 1024.5}, 'proxy.affinity.prefix_bytes: expected a number of bytes such as 1024 or a size such as "4KB", got 1024.5'),
        ({"prefix_bytes": True}, 'proxy.affinity.prefix_bytes: expected a number of bytes such as 1024 or a size such as "4KB", got True'),
        ({"max_sessions": 0}, "proxy.affinity.max_sessions: must be at least 1, got 0"),
        ({"max_sessions": -5}, "proxy.affinity.max_sessions: must be at least 1, got -5"),
        ({"max_sessions": "many"}, 'proxy.affinity.max_sessions: expected a whole number, got "many"'),
        ({"max_sessions": 10.5}, "proxy.affinity.max_sessions: expected a whole number, got 10.5"),
        ({"idle_ttl": "500ms"}, 'proxy.affinity.idle_ttl: must be at least 1s, got "500ms"'),
        ({"idle_ttl": 0}, "proxy.affinity.idle_ttl: must be at least 1s, got 0"),
        ({"idle_ttl": 1800}, 'proxy.affinity.idle_ttl: expected a duration such as "10s", got 1800'),
        ({"idle_ttl": "half an hour"}, 'proxy.affinity.idle_ttl: expected a duration such as "10s", got "half an hour"'),
        ({"load_factor": 0.99}, "proxy.affinity.load_factor: must be at least 1, got 0.99"),
        ({"load_factor": 0}, "proxy.affinity.load_factor: must be at least 1, got 0"),
        ({"load_factor": "1.25"}, 'proxy.affinity.load_factor: expected a number, got "1.25"'),
        ({"load_factor": True}, "proxy.affinity.load_factor: expected a number, got True"),
        ({"load_factor": float("inf")}, "proxy.affinity.load_factor: expected a finite number, got inf"),
        ({"load_factor": float("nan")}, "proxy.affinity.load_factor: expected a finite number, got nan"),
        ({"idle_ttl_seconds": 600}, "proxy.affinity.idle_ttl_seconds: unknown key"),  # Olla's name belongs in sticky_sessions
        ({"ttl": "1h"}, "proxy.affinity.ttl: unknown key"),
    ],
)
def test_affinity_errors(values: dict[str, Any], message: str) -> None:
    """Each bad proxy.affinity value is a one-line error naming the key (and the list entry)."""
    with pytest.raises(ConfigError) as caught:
        _affinity({"affinity": values})
    text = str(caught.value)
    assert text.startswith("c.yaml: " + message), text
    assert "\n" not in text


@pytest.mark.parametrize(
    "value, message",
    [
        (True, "c.yaml: proxy.affinity: expected a mapping, got True"),
        (["enabled"], "c.yaml: proxy.affinity: expected a mapping, got a list"),
    ],
)
def test_affinity_must_be_a_mapping(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _affinity({"affinity": value})
    assert str(caught.value) == message


# --------------------------------------------------------------------------
# proxy.sticky_sessions: Olla's name for proxy.affinity


def test_sticky_sessions_is_honoured_not_ignored() -> None:
    """sticky_sessions is no longer in the ignored-keys table: it configures affinity."""
    assert "sticky_sessions" not in OLLA_IGNORED["proxy"]
    config = parse_config({"proxy": {"sticky_sessions": {"enabled": True}}}, "c.yaml", {})
    assert config.ignored == ()
    assert config.proxy.affinity == AffinityConfig()


def test_sticky_sessions_maps_every_olla_key() -> None:
    """Olla's keys and key source names map onto proxy.affinity's; load_factor keeps olladmr's default."""
    assert OLLA_KEY_SOURCES == {"session_header": "session_header", "prefix_hash": "prefix", "auth_header": "auth", "ip": "ip"}
    config = _affinity(
        {
            "sticky_sessions": {
                "enabled": True,
                "idle_ttl_seconds": 600,
                "max_sessions": 10000,
                "key_sources": ["ip", "auth_header", "prefix_hash", "session_header"],
                "prefix_hash_bytes": 512,
            }
        }
    )
    assert config == AffinityConfig(
        enabled=True,
        key_sources=("ip", "auth", "prefix", "session_header"),
        prefix_bytes=512,
        max_sessions=10000,
        idle_ttl=600.0,
        load_factor=1.25,
    )
    assert _affinity({"sticky_sessions": {"enabled": True, "idle_ttl_seconds": 90.5}}).idle_ttl == 90.5
    assert _affinity({"sticky_sessions": {"enabled": True, "key_sources": ["PREFIX_HASH"]}}).key_sources == ("prefix",)
    assert _affinity({"sticky_sessions": {"enabled": True, "prefix_hash_bytes": "2KB"}}).prefix_bytes == 2048


@pytest.mark.parametrize(
    "proxy, enabled",
    [
        ({}, True),  # no section at all: olladmr's default
        ({"sticky_sessions": None}, True),  # a null section counts as absent
        ({"sticky_sessions": {"enabled": True}}, True),
        ({"sticky_sessions": {"enabled": False}}, False),
        ({"sticky_sessions": {}}, False),  # the section without enabled: Olla's default, off
        ({"sticky_sessions": {"idle_ttl_seconds": 600, "max_sessions": 10}}, False),
        ({"sticky_sessions": {"enabled": None, "max_sessions": 10}}, False),
    ],
)
def test_sticky_sessions_enabled_follows_olla(proxy: dict[str, Any], enabled: bool) -> None:
    """With settings from sticky_sessions, Olla's ``enabled`` (default false) decides; with none, affinity is on."""
    assert _affinity(proxy).enabled is enabled


def test_sticky_sessions_disabled_keeps_the_other_settings() -> None:
    """``enabled: false`` turns affinity off; the rest is still read (and checked)."""
    config = _affinity({"sticky_sessions": {"enabled": False, "idle_ttl_seconds": 60, "key_sources": []}})
    assert config == AffinityConfig(enabled=False, idle_ttl=60.0, key_sources=())


@pytest.mark.parametrize(
    "proxy",
    [
        {"affinity": {"enabled": True}, "sticky_sessions": {"enabled": True}},
        {"affinity": {}, "sticky_sessions": {}},
        {"affinity": {"enabled": False}, "sticky_sessions": {"enabled": False}},
    ],
)
def test_affinity_and_sticky_sessions_together_are_an_error(proxy: dict[str, Any]) -> None:
    """The same settings twice, under both names, are refused; the message names both."""
    with pytest.raises(ConfigError) as caught:
        _affinity(proxy)
    assert str(caught.value) == (
        "c.yaml: proxy.sticky_sessions: cannot be given together with proxy.affinity "
        "(the same settings under Olla's name); keep one of them"
    )


def test_a_null_section_beside_the_other_is_not_both() -> None:
    """``affinity: null`` (or ``sticky_sessions: null``) counts as absent, so the other section is used."""
    assert _affinity({"affinity": None, "sticky_sessions": {"enabled": False}}).enabled is False
    assert _affinity({"affinity": {"enabled": False}, "sticky_sessions": None}).enabled is False


@pytest.mark.parametrize(
    "values, message",
    [
        ({"enabled": "true"}, 'proxy.sticky_sessions.enabled: expected true or false, got "true"'),
        (
            {"key_sources": ["session_header", "x"]},
            'proxy.sticky_sessions.key_sources[1]: expected one of session_header, prefix_hash, auth_header, ip, got "x"',
        ),
        (
            {"key_sources": ["prefix"]},  # olladmr's name in Olla's section
            'proxy.sticky_sessions.key_sources[0]: expected one of session_header, prefix_hash, auth_header, ip, got "prefix"',
        ),
        ({"key_sources": ["ip", "prefix_hash", "ip"]}, 'proxy.sticky_sessions.key_sources[2]: "ip" is listed twice (also [0])'),
        ({"key_sources": "ip"}, 'proxy.sticky_sessions.key_sources: expected a list, got "ip"'),
        (
            {"enabled": True, "key_sources": []},
            "proxy.sticky_sessions.key_sources: is empty but enabled is true; list at least one of session_header, "
            "prefix_hash, auth_header, ip (or set enabled: false)",
        ),
        ({"idle_ttl_seconds": 0}, "proxy.sticky_sessions.idle_ttl_seconds: must be at least 1, got 0"),
        ({"idle_ttl_seconds": 0.5}, "proxy.sticky_sessions.idle_ttl_seconds: must be at least 1, got 0.5"),
        ({"idle_ttl_seconds": "10m"}, 'proxy.sticky_sessions.idle_ttl_seconds: expected a number, got "10m"'),
        ({"idle_ttl_seconds": float("inf")}, "proxy.sticky_sessions.idle_ttl_seconds: expected a finite number, got inf"),
        ({"max_sessions": 0}, "proxy.sticky_sessions.max_sessions: must be at least 1, got 0"),
        ({"max_sessions": "lots"}, 'proxy.sticky_sessions.max_sessions: expected a whole number, got "lots"'),
        ({"prefix_hash_bytes": 8}, "proxy.sticky_sessions.prefix_hash_bytes: must be at least 16 bytes, got 8"),
        ({"prefix_hash_bytes": 2 * 1024**2}, "proxy.sticky_sessions.prefix_hash_bytes: must be at most 1MiB (1048576 bytes), got 2097152"),
        ({"prefix_hash_bytes": "big"}, 'proxy.sticky_sessions.prefix_hash_bytes: expected a number of bytes such as 1024'),
        ({"load_factor": 2}, "proxy.sticky_sessions.load_factor: unknown key"),  # olladmr-only: use proxy.affinity
        ({"idle_ttl": "10m"}, "proxy.sticky_sessions.idle_ttl: unknown key"),
        ({"prefix_bytes": 512}, "proxy.sticky_sessions.prefix_bytes: unknown key"),
    ],
)
def test_sticky_sessions_errors(values: dict[str, Any], message: str) -> None:
    """Bad sticky_sessions values are one-line errors naming Olla's key."""
    with pytest.raises(ConfigError) as caught:
        _affinity({"sticky_sessions": values})
    text = str(caught.value)
    assert text.startswith("c.yaml: " + message), text
    assert "\n" not in text


def test_sticky_sessions_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        _affinity({"sticky_sessions": True})
    assert str(caught.value) == "c.yaml: proxy.sticky_sessions: expected a mapping, got True"


def test_affinity_loaded_from_yaml(tmp_path: Path) -> None:
    """config.example.yaml's proxy.affinity block, and an Olla sticky_sessions block, load from files."""
    example = load_config(str(Path(__file__).parent.parent / "config.example.yaml"), {})
    assert example.proxy.affinity == AffinityConfig()
    assert all(ep.ps_url == "/engines/ps" for ep in example.endpoints)
    path = tmp_path / "olla.yaml"
    path.write_text(
        "proxy:\n  sticky_sessions:\n    enabled: true\n    idle_ttl_seconds: 600\n"
        "    key_sources: [session_header, prefix_hash, auth_header]\n    prefix_hash_bytes: 512\n"
    )
    config = load_config(str(path), {})
    assert config.proxy.affinity == AffinityConfig(
        key_sources=("session_header", "prefix", "auth"), prefix_bytes=512, idle_ttl=600.0
    )
    path.write_text("proxy:\n  affinity:\n    enabled: false\n")
    assert load_config(str(path), {}).proxy.affinity.enabled is False


def test_lost_requests_settings_and_their_mistakes() -> None:
    """proxy.lost_requests: defaults, the example file's values, and each mistake named by its key path."""
    example = load_config(str(Path(__file__).parent.parent / "config.example.yaml"), {})
    assert example.proxy.lost_requests == LostRequestsConfig()
    given = parse_config({"proxy": {"lost_requests": {"retry": False, "hang_after": "2s", "hang_factor": 8}}}, "c.yaml")
    assert given.proxy.lost_requests == LostRequestsConfig(retry=False, hang_after=2.0, hang_factor=8.0)
    for value, key in (({"hang_factor": 0.5}, "hang_factor"), ({"retry": "yes please"}, "retry"),
                       ({"hang_after": "soon"}, "hang_after"), ({"nope": 1}, "nope")):
        with pytest.raises(ConfigError) as caught:
            parse_config({"proxy": {"lost_requests": value}}, "c.yaml")
        assert str(caught.value).startswith(f"c.yaml: proxy.lost_requests.{key}"), str(caught.value)


# --------------------------------------------------------------------------
# model_aliases


def _aliases(document: object) -> Config:
    return parse_config({"model_aliases": document}, "c.yaml", {})


def test_model_aliases_are_read_in_order() -> None:
    """``model_aliases`` keeps the file's order and the names as written; aliases() maps alias -> models."""
    config = _aliases({"gpt-4o-mini": ["ai/smollm2"], "claude-sonnet-4": ["ai/llama3.2", "SmolLM2:360M"], "x": ["y"]})
    assert config.model_aliases == (
        ("gpt-4o-mini", ("ai/smollm2",)),
        ("claude-sonnet-4", ("ai/llama3.2", "SmolLM2:360M")),
        ("x", ("y",)),
    )
    assert config.aliases() == {"gpt-4o-mini": ("ai/smollm2",), "claude-sonnet-4": ("ai/llama3.2", "SmolLM2:360M"), "x": ("y",)}
    assert list(config.aliases()) == ["gpt-4o-mini", "claude-sonnet-4", "x"]
    assert config.ignored == ()
    assert _aliases(None).model_aliases == () and _aliases({}).aliases() == {}
    assert parse_config(None, "c.yaml", {}).model_aliases == ()


@pytest.mark.parametrize(
    "document, message",
    [
        (["a"], "c.yaml: model_aliases: expected a mapping of alias names to lists of model names, got a list"),
        ({"": ["ai/smollm2"]}, "c.yaml: model_aliases: an alias name is empty"),
        ({"  ": ["ai/smollm2"]}, "c.yaml: model_aliases: an alias name is empty"),
        ({1: ["ai/smollm2"]}, "c.yaml: model_aliases: alias names must be strings, got 1"),
        ({"bad\x07name": ["ai/smollm2"]}, "c.yaml: model_aliases.bad\\x07name: must not contain control characters"),
        ({"gpt\n4": ["ai/smollm2"]}, "c.yaml: model_aliases.gpt\\n4: must not contain control characters"),
        ({" gpt-4": ["ai/smollm2"]}, 'c.yaml: model_aliases. gpt-4: has leading or trailing spaces: " gpt-4"'),
        ({"a" * 513: ["ai/smollm2"]}, f"c.yaml: model_aliases.{'a' * 64}...: is longer than 512 characters (513)"),
        ({"gpt-4": []}, "c.yaml: model_aliases.gpt-4: lists no models; give at least one real model name"),
        ({"gpt-4": None}, "c.yaml: model_aliases.gpt-4: expected a list of model names, got nothing"),
        ({"gpt-4": "ai/smollm2"}, 'c.yaml: model_aliases.gpt-4: expected a list of model names, got "ai/smollm2"'),
        ({"gpt-4": ["ai/smollm2", ""]}, "c.yaml: model_aliases.gpt-4[1]: is empty"),
        ({"gpt-4": ["ai/smollm2", 7]}, "c.yaml: model_aliases.gpt-4[1]: expected a model name (a string), got 7"),
        ({"gpt-4": ["ai/small\tlm"]}, "c.yaml: model_aliases.gpt-4[0]: must not contain control characters"),
        ({"gpt-4": ["x" * 513]}, "c.yaml: model_aliases.gpt-4[0]: is longer than 512 characters (513)"),
        # the same model twice in one alias, compared as DMR compares names
        ({"gpt-4": ["ai/smollm2", "ai/llama3.2", "ai/smollm2"]}, 'c.yaml: model_aliases.gpt-4[2]: "ai/smollm2" is listed twice (the same model as [0] "ai/smollm2")'),
        ({"gpt-4": ["smollm2", "AI/SmolLM2:latest"]}, 'c.yaml: model_aliases.gpt-4[1]: "AI/SmolLM2:latest" is listed twice (the same model as [0] "smollm2")'),
        # two aliases that are one name
        ({"gpt-4": ["ai/smollm2"], "GPT-4": ["ai/llama3.2"]}, 'c.yaml: model_aliases.GPT-4: is the same alias as "gpt-4" (both are model "ai/gpt-4:latest")'),
        ({"fast": ["ai/smollm2"], "ai/fast:latest": ["ai/llama3.2"]}, 'c.yaml: model_aliases.ai/fast:latest: is the same alias as "fast"'),
        # an alias that names an existing model (one of its own targets)
        ({"smollm2": ["ai/smollm2", "ai/llama3.2"]}, 'c.yaml: model_aliases.smollm2: names an existing model: it lists itself ([0] "ai/smollm2")'),
        ({"gpt-oss-120b": ["gpt-oss:120b", "gpt-oss-120b"]}, 'c.yaml: model_aliases.gpt-oss-120b: names an existing model: it lists itself ([1] "gpt-oss-120b")'),
        # chains and cycles
        ({"fast": ["ai/smollm2"], "quick": ["ai/llama3.2", "fast"]}, 'c.yaml: model_aliases.quick: [1] "fast" is itself an alias (model_aliases.fast); aliases must list real model names'),
        ({"a": ["b"], "b": ["a"]}, "c.yaml: model_aliases.a: forms a cycle: a -> b -> a"),
        ({"a": ["ai/b"], "b": ["c"], "c": ["x", "A"]}, "c.yaml: model_aliases.a: forms a cycle: a -> b -> c -> a"),
        ({"a": ["m"], "b": ["c"], "c": ["b"]}, "c.yaml: model_aliases.b: forms a cycle: b -> c -> b"),
    ],
)
def test_model_alias_errors(document: object, message: str) -> None:
    """Each alias rule is a one-line error naming model_aliases.<alias> (and the entry, for a bad target)."""
    with pytest.raises(ConfigError) as caught:
        _aliases(document)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_model_aliases_loaded_from_yaml(tmp_path: Path) -> None:
    """The documented example in config.example.yaml's style loads from a file."""
    path = tmp_path / "c.yaml"
    path.write_text("model_aliases:\n  gpt-4o-mini: [ai/smollm2]\n  claude-sonnet-4:\n    - ai/llama3.2\n    - ai/smollm2\n")
    assert load_config(str(path), {}).aliases() == {
        "gpt-4o-mini": ("ai/smollm2",),
        "claude-sonnet-4": ("ai/llama3.2", "ai/smollm2"),
    }
