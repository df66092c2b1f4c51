"""Unit tests for ``olladmr.config.parse``: the server.rate_limits, server.auth and server.cors sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import headers, section

from olladmr.config import ConfigError
from olladmr.config.parse import parse_auth, parse_cors, parse_rate_limits
from olladmr.config.schema import AuthConfig, RateLimitConfig
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
