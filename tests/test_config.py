"""The config parser: Olla's layout, the short form, durations and sizes, and one-line errors."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, strategies as st

from olladmr.config import ConfigError, load_config, parse_config, parse_duration, parse_size, resolve_config

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
