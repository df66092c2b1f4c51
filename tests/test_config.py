"""The config parser: Olla's layout (every key Olla v0.0.28 documents), the short form, durations and sizes, and one-line errors."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from hypothesis import given, strategies as st

from olladmr.config import ConfigError, load_config, parse_config, parse_duration, parse_size, resolve_config
from olladmr.config.parse import OLLA_IGNORED
from olladmr.config.schema import DEFAULT_EXPOSED_HEADERS, AffinityConfig

OLLA = """
server: {host: 127.0.0.1, port: 40114, request_limits: {max_body_size: 10MB}}
proxy: {load_balancer: round-robin, connection_timeout: 10s, response_header_timeout: 5m, read_timeout: 10m, engine: olla}
discovery:
  static:
    endpoints:
      - {url: "http://localhost:12434/", name: local-dmr, type: docker-model-runner, priority: 95,
         model_url: /engines/v1/models, health_check_url: /engines/v1/models, check_interval: 10s, check_timeout: 5s,
         headers: {X-Team: research}}
      - {url: "http://gpu1:12434/dmr", name: gpu1}
logging: {level: info, format: json}
"""


def test_olla_layout_is_accepted():
    """An Olla-style file parses into typed values; Olla-only keys are reported as ignored, not fatal."""
    config = parse_config(yaml.safe_load(OLLA), "olla.yaml")
    assert config.server.request_limits.max_body_size == 10 * 1024 * 1024
    assert config.proxy.load_balancer == "round-robin"
    assert config.proxy.response_header_timeout == 300.0
    local, gpu = config.endpoints
    assert local.url == "http://localhost:12434" and local.priority == 95 and local.headers == (("X-Team", "research"),)
    assert gpu.url == "http://gpu1:12434/dmr" and gpu.check_interval == 10.0
    assert config.logging.format == "json"
    assert config.ignored == ("proxy.engine",)


def test_short_form_and_defaults():
    """The seed's top-level endpoints list works; an empty file gives the built-in defaults."""
    config = parse_config({"endpoints": [{"url": "http://h:1", "name": "x"}]}, "s.yaml")
    assert [e.name for e in config.endpoints] == ["x"]
    default = parse_config(None, "empty.yaml")
    assert default.server.listen == "tcp:40114:interface=127.0.0.1"
    (ep,) = default.endpoints
    assert (ep.name, ep.url, ep.priority, ep.check_interval, ep.check_timeout) == (
        "local-dmr", "http://localhost:12434", 95, 10.0, 5.0,
    )


@pytest.mark.parametrize(
    "document,message",
    [
        (
            {"discovery": {"static": {"endpoints": [{"url": "http://a:1", "name": "a"}, {"url": "http://b:1", "check_interval": "ten"}]}}},
            'c.yaml: discovery.static.endpoints[1].check_interval: expected a duration such as "10s", got "ten"',
        ),
        ({"server": {"port": "x"}}, 'c.yaml: server.port: expected a whole number, got "x"'),
        ({"server": {"port": 70000}}, "c.yaml: server.port: must be at most 65535, got 70000"),
        ({"server": {"colour": 1}}, "c.yaml: server.colour: unknown key"),
        ({"endpoints": [{"url": "ftp://a"}]}, 'c.yaml: endpoints[0].url: must start with http:// or https://, got "ftp://a"'),
        ({"endpoints": [{"url": "http://u:p@a:1"}]}, "c.yaml: endpoints[0].url: must not carry credentials (user:password@); configure them elsewhere"),
        ({"endpoints": [{"name": "a"}]}, "c.yaml: endpoints[0].url: is required"),
        (
            {"endpoints": [{"url": "http://a:1", "name": "a"}, {"url": "http://b:1", "name": "a"}]},
            'c.yaml: endpoints[1].name: duplicate endpoint name "a" (also endpoints[0])',
        ),
        ({"proxy": {"load_balancer": "random"}}, 'c.yaml: proxy.load_balancer: expected one of priority, round-robin, least-connections, got "random"'),
        ({"server": {"request_limits": {"max_body_size": "lots"}}}, 'c.yaml: server.request_limits.max_body_size: expected a size such as "50MB", got "lots"'),
        ({"endpoints": [{"url": "http://a:1", "check_interval": "1s", "check_timeout": "2s"}]}, 'c.yaml: endpoints[0].check_timeout: must not be longer than check_interval (1s), got "2s"'),
        ({"endpoints": {"url": "http://a"}}, "c.yaml: endpoints: expected a list, got a mapping"),
        ([1, 2], "c.yaml: expected a mapping at the top level, got a list"),
    ],
)
def test_errors_name_file_key_path_and_problem(document, message):
    """Every mistake is one line: file, key path, problem."""
    with pytest.raises(ConfigError) as info:
        parse_config(document, "c.yaml")
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path):
    """Missing files and broken YAML are one-line errors too."""
    with pytest.raises(ConfigError, match=r"^/nonexistent/c.yaml: file not found$"):
        load_config("/nonexistent/c.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert str(info.value).startswith(f"{bad}: line ") and "invalid YAML" in str(info.value)


def test_lookup_order(tmp_path, monkeypatch):
    """--config wins over $OLLA_CONFIG_FILE, which wins over ./config.yaml; nothing found means defaults."""
    monkeypatch.chdir(tmp_path)
    a = tmp_path / "a.yaml"
    a.write_text("endpoints: [{url: 'http://a:1', name: from-a}]\n")
    (tmp_path / "config.yaml").write_text("endpoints: [{url: 'http://c:1', name: from-cwd}]\n")
    assert resolve_config(str(a), {}).endpoints[0].name == "from-a"
    assert resolve_config(None, {"OLLA_CONFIG_FILE": str(a)}).endpoints[0].name == "from-a"
    assert resolve_config(None, {}).endpoints[0].name == "from-cwd"
    (tmp_path / "config.yaml").unlink()
    if not __import__("os").path.exists("/etc/olladmr/config.yaml"):
        assert resolve_config(None, {}).endpoints[0].name == "local-dmr"


@pytest.mark.parametrize(
    "text,seconds", [("500ms", 0.5), ("10s", 10), ("5m", 300), ("1h30m", 5400), ("0", 0), (0, 0), ("1.5s", 1.5)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten", "10", 10, "10 s", "s", "", "-1s", True, None])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text,size", [("50MB", 50 * 2**20), ("512KB", 512 * 1024), ("1GiB", 2**30), (1000, 1000), ("10", 10)])
def test_sizes(text, size):
    assert parse_size(text) == size


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=12))
def test_parser_never_crashes(document):
    """Any YAML-shaped document either parses or raises a one-line ConfigError."""
    try:
        parse_config(document, "fuzz.yaml")
    except ConfigError as error:
        assert "\n" not in str(error)


# --------------------------------------------------------------------------
# Olla v0.0.28's keys: every one loads; the ones olladmr has no use for are reported

DATA = Path(__file__).parent / "data"
OLLA_SAMPLE = DATA / "olla-v0.0.28-config.yaml"

#: What olladmr reports as ignored for Olla's own sample file (config/config.yaml at v0.0.28).
OLLA_SAMPLE_IGNORED = {
    "server.write_timeout",
    "server.request_logging",
    "server.rate_limits.per_endpoint",
    "proxy.engine",
    "proxy.profile",
    "proxy.stream_buffer_size",
    "proxy.connection_keep_alive",
    "proxy.response_timeout",
    "proxy.tls_handshake_timeout",
    "proxy.retry",
    "discovery.refresh_interval",
    "discovery.health_check",
    "discovery.model_discovery.timeout",
    "discovery.model_discovery.concurrent_workers",
    "discovery.model_discovery.retry_attempts",
    "discovery.model_discovery.retry_backoff",
    "model_registry",
    "translators",
    "engineering",
}


def test_olla_sample_config_loads():
    """Olla's own sample file (endpoints swapped for DMRs) loads: its values are honoured, the rest reported."""
    config = load_config(str(OLLA_SAMPLE), {})
    assert config.source == str(OLLA_SAMPLE)
    assert [(e.name, e.url, e.check_interval, e.check_timeout) for e in config.endpoints] == [
        ("local-dmr", "http://localhost:12434", 2.0, 1.0),
        ("docker-dmr", "http://model-runner.docker.internal", 2.0, 1.0),
        ("gpu1-dmr", "http://gpu1:12434", 5.0, 2.0),
    ]
    server = config.server
    assert (server.host, server.port, server.read_timeout, server.read_header_timeout, server.shutdown_timeout) == (
        "127.0.0.1", 40114, 30.0, 10.0, 10.0,
    )
    assert (server.request_limits.max_body_size, server.request_limits.max_header_size) == (100 * 2**20, 2**20)
    limits = server.rate_limits
    assert (limits.global_requests_per_minute, limits.per_ip_requests_per_minute, limits.health_requests_per_minute) == (
        1000, 100, 1000,
    )
    assert (limits.burst_size, limits.cleanup_interval, limits.trust_proxy_headers) == (50, 300.0, False)
    assert not server.cors.enabled and server.cors.max_age == 300
    assert server.cors.exposed_headers == DEFAULT_EXPOSED_HEADERS  # Olla: an empty list exposes X-Olla-*
    proxy = config.proxy
    assert (proxy.load_balancer, proxy.connection_timeout, proxy.response_header_timeout, proxy.read_timeout) == (
        "least-connections", 60.0, 30.0, 600.0,
    )
    assert config.model_discovery_interval == 300.0
    assert (config.logging.level, config.logging.format) == ("info", "json")
    assert config.model_aliases == () and config.aliases() == {}
    # sticky_sessions is honoured as proxy.affinity: the sample's "enabled: false" turns affinity off
    assert proxy.affinity == AffinityConfig(
        enabled=False, key_sources=("session_header", "prefix", "auth"), prefix_bytes=512, max_sessions=10000, idle_ttl=600.0
    )
    assert set(config.ignored) == OLLA_SAMPLE_IGNORED
    assert not any("sticky" in key for key in config.ignored)
    assert len(config.ignored) == len(set(config.ignored))


def _document_with(section: str, key: str, value: object) -> tuple[dict[str, object], str]:
    """A minimal document with ``key: value`` in the ignored-keys table's ``section``, and the key path reported."""
    document: dict[str, object] = {}
    node = document
    path = ""
    for part in section.split(".") if section else []:
        if part.endswith("[]"):
            item: dict[str, object] = {"url": "http://h:1"}
            node[part[:-2]] = [item]
            node = item
            path = f"{path}.{part[:-2]}[0]" if path else f"{part[:-2]}[0]"
        else:
            child: dict[str, object] = {}
            node[part] = child
            node = child
            path = f"{path}.{part}" if path else part
    node[key] = value
    return document, f"{path}.{key}" if path else key


@pytest.mark.parametrize(
    "section,key", sorted((section, key) for section, keys in OLLA_IGNORED.items() for key in keys)
)
@pytest.mark.parametrize("value", ["anything", 0, [1, "two"], {"nested": {"deep": True}}, None])
def test_every_ignored_key_is_accepted_and_reported(section, key, value):
    """Each entry of the ignored-keys table is a real place in a document: accepted with any value, then reported."""
    document, path = _document_with(section, key, value)
    config = parse_config(document, "c.yaml", {})
    assert config.ignored == (path,)


def test_ignored_endpoint_keys_apply_to_the_short_form_too():
    """The top-level endpoints list shares the endpoint entry of the table."""
    config = parse_config({"endpoints": [{"url": "http://h:1", "preserve_path": True, "model_filter": {}}]}, "c.yaml", {})
    assert config.ignored == ("endpoints[0].preserve_path", "endpoints[0].model_filter")


#: Every key Olla v0.0.28 documents (internal/config/types.go, config/config.yaml,
#: docs/content/configuration/reference.md), with DMR endpoints.
OLLA_EVERY_KEY = """
server:
  host: 0.0.0.0
  port: 40114
  read_timeout: 30s
  read_header_timeout: 10s
  write_timeout: 0s
  idle_timeout: 0s
  shutdown_timeout: 10s
  request_logging: true
  cors: {enabled: true, allowed_origins: ["https://app.example"], allowed_methods: [GET, POST, OPTIONS],
         allowed_headers: ["*"], exposed_headers: [], allow_credentials: true, max_age: 300}
  request_limits: {max_body_size: 104857600, max_header_size: 1048576}
  rate_limits:
    global_requests_per_minute: 1000
    per_ip_requests_per_minute: 100
    health_requests_per_minute: 1000
    burst_size: 50
    per_endpoint: {default_requests_per_minute: 200}
    cleanup_interval: 5m
    trust_proxy_headers: true
    trusted_proxy_cidrs: ["10.0.0.0/8"]
proxy:
  engine: olla
  profile: auto
  load_balancer: priority
  stream_buffer_size: 8192
  connection_timeout: 45s
  connection_keep_alive: 30s
  response_timeout: 15m
  read_timeout: 10m
  response_header_timeout: 180s
  tls_handshake_timeout: 10s
  max_retries: 3
  retry_backoff: 500ms
  retry: {enabled: true, on_connection_failure: true, max_attempts: 0}
  profile_filter: {include: ["openai*"], exclude: ["*test*"]}
  sticky_sessions: {enabled: true, idle_ttl_seconds: 600, max_sessions: 10000,
                    key_sources: [session_header, prefix_hash, auth_header], prefix_hash_bytes: 512}
discovery:
  type: static
  refresh_interval: 30s
  health_check: {initial_delay: 1s}
  static:
    endpoints:
      - url: http://localhost:12434
        name: local-dmr
        type: docker-model-runner
        priority: 95
        preserve_path: false
        health_check_url: /engines/v1/models
        model_url: /engines/v1/models
        check_interval: 10s
        check_timeout: 5s
        model_filter: {include: ["ai/*"], exclude: ["*embed*"]}
        headers: {X-Team: "${TEAM:-research}"}
        auth: {type: bearer, token: "${DMR_TOKEN}"}
      - url: http://gpu1:12434
        name: gpu1
        auth: {type: api_key, key_file: KEYFILE, header: X-Api-Key}
      - url: http://gpu2:12434
        name: gpu2
        auth: {type: basic, username: olla, password_file: KEYFILE}
  model_discovery: {enabled: true, interval: 5m, timeout: 30s, concurrent_workers: 5, retry_attempts: 3, retry_backoff: 1s}
model_registry:
  type: memory
  enable_unifier: true
  routing_strategy:
    type: strict
    options: {fallback_behavior: compatible_only, discovery_timeout: 2s, discovery_refresh_on_miss: false}
  unification:
    enabled: true
    stale_threshold: 24h
    cleanup_interval: 10m
    cache_ttl: 10m
    custom_rules: [{platform: ollama, name_patterns: {"llama*": llama}, family_overrides: {llama3: meta-llama}}]
model_aliases:
  my-llama: [ai/llama3.2, "ai/llama3.2:3B-Q4_K_M"]
translators:
  anthropic:
    enabled: true
    passthrough_enabled: true
    max_message_size: 10485760
    inspector: {enabled: false, output_dir: logs/inspector/anthropic, session_header: X-Session-ID}
logging: {level: debug, format: text, output: stdout}
engineering: {show_nerdstats: false}
"""


def test_every_documented_olla_key_loads(tmp_path):
    """Olla's whole documented key set loads; what olladmr can honour is read, the rest is reported."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    document = yaml.safe_load(OLLA_EVERY_KEY.replace("KEYFILE", str(secret)))
    config = parse_config(document, "olla.yaml", {"DMR_TOKEN": "tok"})
    local, gpu1, gpu2 = config.endpoints
    assert local.headers == (("X-Team", "research"),) and local.priority == 95
    assert local.encoded_headers[-1] == (b"authorization", b"Bearer tok")
    assert gpu1.encoded_headers == ((b"x-api-key", b"s3cret"),)
    assert gpu2.encoded_headers == ((b"authorization", b"Basic " + base64.b64encode(b"olla:s3cret")),)
    assert config.server.host == "0.0.0.0" and config.server.idle_timeout == 0.0
    assert config.server.cors.allow_credentials and config.server.rate_limits.trust_proxy_headers
    assert config.proxy.response_header_timeout == 180.0 and config.proxy.connection_timeout == 45.0
    assert config.logging.level == "debug"
    assert config.aliases() == {"my-llama": ("ai/llama3.2", "ai/llama3.2:3B-Q4_K_M")}
    assert config.proxy.affinity == AffinityConfig(
        enabled=True, key_sources=("session_header", "prefix", "auth"), prefix_bytes=512, max_sessions=10000, idle_ttl=600.0
    )
    assert "sticky_sessions" not in OLLA_IGNORED["proxy"]
    assert set(config.ignored) == {
        "server.write_timeout",
        "server.request_logging",
        "server.rate_limits.per_endpoint",
        *(f"proxy.{key}" for key in OLLA_IGNORED["proxy"]),
        "discovery.refresh_interval",
        "discovery.health_check",
        *(f"discovery.model_discovery.{key}" for key in ("timeout", "concurrent_workers", "retry_attempts", "retry_backoff")),
        "discovery.static.endpoints[0].preserve_path",
        "discovery.static.endpoints[0].model_filter",
        "model_registry",
        "translators",
        "engineering",
    }


@pytest.mark.parametrize(
    "document,path",
    [
        ({"server": {"rate_limits": {"per_endpoints": {}}}}, "server.rate_limits.per_endpoints"),
        ({"proxy": {"sticky_session": {"enabled": True}}}, "proxy.sticky_session"),
        ({"discovery": {"static": {"endpoints": [{"url": "http://h:1", "preserve_paths": True}]}}}, "discovery.static.endpoints[0].preserve_paths"),
        ({"discovery": {"model_discovery": {"workers": 5}}}, "discovery.model_discovery.workers"),
        ({"model_alias": {"a": ["b"]}}, "model_alias"),
        ({"logging": {"file": "x.log"}}, "logging.file"),
    ],
)
def test_keys_neither_olla_nor_olladmr_knows_are_errors(document, path):
    """Near misses of Olla's keys are still unknown keys."""
    with pytest.raises(ConfigError) as info:
        parse_config(document, "c.yaml", {})
    assert str(info.value) == f"c.yaml: {path}: unknown key"


def test_value_dependent_ignored_keys():
    """logging.output other than stdout and model_discovery.enabled: false are accepted but not honoured."""
    quiet = parse_config({"logging": {"output": "stdout"}, "discovery": {"model_discovery": {"enabled": True}}}, "c.yaml", {})
    assert quiet.ignored == ()
    loud = parse_config({"logging": {"output": "file"}, "discovery": {"model_discovery": {"enabled": False}}}, "c.yaml", {})
    assert loud.ignored == ("discovery.model_discovery.enabled", "logging.output")
    with pytest.raises(ConfigError, match=r"^c.yaml: logging.output: expected stdout, stderr or file, got \"syslog\"$"):
        parse_config({"logging": {"output": "syslog"}}, "c.yaml", {})
    with pytest.raises(ConfigError, match=r"^c.yaml: discovery.model_discovery.enabled: expected true or false"):
        parse_config({"discovery": {"model_discovery": {"enabled": "no"}}}, "c.yaml", {})
