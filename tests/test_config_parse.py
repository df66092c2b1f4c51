"""Unit tests for ``olladmr.config.parse``: server.rate_limits, server.auth, server.cors, endpoint auth and headers, model_aliases."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from support import headers, section

from olladmr.config import Config, ConfigError, EndpointConfig, load_config, parse_config
from olladmr.config.parse import parse_auth, parse_cors, parse_rate_limits
from olladmr.config.schema import DEFAULT_EXPOSED_HEADERS, AuthConfig, RateLimitConfig
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
    bearer = _endpoint(auth={"type": "bearer", "token": "tok"})
    assert bearer.encoded_headers == ((b"authorization", b"Bearer tok"),)
    assert _endpoint({"T": "from-env"}, auth={"token_env": "T"}).encoded_headers == ((b"authorization", b"Bearer from-env"),)
    api_key = _endpoint(auth={"type": "api_key", "key_file": str(keyfile)})
    assert api_key.encoded_headers == ((b"x-api-key", b"k-123"),)
    custom = _endpoint(auth={"type": "api_key", "key": "k", "header": "X-Custom-Key"})
    assert custom.encoded_headers == ((b"x-custom-key", b"k"),)
    basic = _endpoint({"PW": "p@ss"}, auth={"type": "basic", "username": "olla", "password": "${PW}"})
    assert basic.encoded_headers == ((b"authorization", b"Basic " + base64.b64encode(b"olla:p@ss")),)
    for ep in (bearer, api_key, custom, basic):
        assert b"tok" not in repr(ep).encode() and "k-123" not in repr(ep) and "p@ss" not in repr(ep)


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
        ({"auth": {"type": "api_key", "key_file": "/nonexistent/olladmr-key"}}, {}, "endpoints[0].auth.key_file: cannot read /nonexistent/olladmr-key"),
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
