"""The composition root (olladmr.build) and the entry points that use it: one part each, wired one way."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from olladmr.build import build
from olladmr.config import ConfigError, resolve_config
from olladmr.edge.auth import hash_key
from olladmr.tap import makeService


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


BASE = """\
server: {host: 127.0.0.1, port: 0}
endpoints:
  - {name: a, url: "http://127.0.0.1:1", check_interval: 10s}
"""


def test_every_part_shares_one_fleet_clock_and_inflight_set() -> None:
    """build() makes each part once and hands the same fleet, in-flight set and clock to everyone who reads them."""
    reactor = MemoryReactorClock()
    config = resolve_config(None, {})
    parts = build(config, reactor=reactor)
    assert parts.proxy.fleet is parts.fleet and parts.health.fleet is parts.fleet and parts.catalogue.fleet is parts.fleet
    assert parts.proxy.inflight is parts.inflight
    assert parts.proxy.clock is reactor and parts.health.clock is reactor and parts.site.clock is reactor
    assert parts.site.limits is parts.limits
    assert parts.service.listener is parts.listener
    assert {child.name for child in parts.service} == {  # no worker pool for one process
        "listener", "upstream", "gate", "health", "reloader", "process", "dashboard"}
    assert parts.workers is None


def test_resolve_config_reads_only_the_environ_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$OLLA_CONFIG_FILE and api_keys_env are looked up in the injected environ, never in os.environ."""
    path = write(
        tmp_path / "c.yaml",
        """\
        server:
          host: 127.0.0.1
          auth: {api_keys_env: OLLADMR_TEST_KEYS}
        endpoints:
          - {name: a, url: "http://127.0.0.1:1"}
        """,
    )
    monkeypatch.delenv("OLLADMR_TEST_KEYS", raising=False)
    monkeypatch.delenv("OLLA_CONFIG_FILE", raising=False)
    environ = {"OLLA_CONFIG_FILE": path, "OLLADMR_TEST_KEYS": hash_key("secret")}
    config = resolve_config(None, environ)
    assert config.source == path and len(config.server.auth.api_key_digests) == 1
    monkeypatch.setenv("OLLADMR_TEST_KEYS", hash_key("other"))
    with pytest.raises(ConfigError, match="OLLADMR_TEST_KEYS is not set"):
        resolve_config(path, {})  # os.environ has it; the injected environ does not


def test_make_service_uses_the_injected_environ(tmp_path: Path) -> None:
    """twistd's makeService finds the file through the environ it is given and builds a service that is not running."""
    path = write(tmp_path / "c.yaml", BASE)
    service = makeService({"config": None, "listen": None}, MemoryReactorClock(), {"OLLA_CONFIG_FILE": path})
    assert not service.running
    assert service.listener.description == "tcp:0:interface=127.0.0.1"


def test_reload_reaches_every_reconfigurable_part(tmp_path: Path) -> None:
    """One reload reconfigures fleet, proxy, gate, limits, logging, metrics, health and lifecycle together."""
    path = write(tmp_path / "c.yaml", BASE)
    reactor = MemoryReactorClock()
    parts = build(resolve_config(path, {}), reactor=reactor, config_path=path, environ={})
    write(
        tmp_path / "c.yaml",
        """\
        server:
          host: 127.0.0.1
          port: 0
          request_limits: {max_body_size: 1MB}
          read_header_timeout: 3s
          rate_limits: {per_ip_requests_per_minute: 60}
        proxy: {load_balancer: round-robin, busy_threshold: 2s}
        logging: {level: warn}
        endpoints:
          - {name: a, url: "http://127.0.0.1:1", check_interval: 10s}
          - {name: b, url: "http://127.0.0.1:2"}
        """,
    )
    reactor.advance(5)
    result = parts.reloader.reload()
    assert result.ok, result.summary
    assert result.summary == "added b; proxy settings changed; logging settings changed; request limits changed"
    assert [ep.name for ep in parts.fleet] == ["a", "b"]
    assert parts.proxy.balancer.name == "round-robin"
    assert parts.limits.max_body_size == 1024**2 and parts.limits.read_header_timeout == 3.0
    assert parts.gate.limiter.config.per_ip_requests_per_minute == 60 and parts.gate.active
    assert parts.lifecycle.loaded_at == 5 and parts.lifecycle.config.source == path
    assert parts.status.service()["config_loaded_at"] == 5 and parts.status.service()["reloads"]["succeeded"] == 1
    assert parts.upstream.proxy.load_balancer == "round-robin"
    assert parts.access_log.enabled is False  # warn filters info-level access events out


def test_a_bad_reload_changes_nothing(tmp_path: Path) -> None:
    """A file that does not validate leaves every part on the running configuration and counts a failure."""
    path = write(tmp_path / "c.yaml", BASE)
    parts = build(resolve_config(path, {}), reactor=MemoryReactorClock(), config_path=path, environ={})
    (tmp_path / "c.yaml").write_text("proxy: {load_balancer: fastest}\n")
    result = parts.reloader.reload()
    assert not result.ok and "proxy.load_balancer" in result.summary
    assert parts.proxy.balancer.name == "priority" and parts.reloader.counts() == (0, 1)
    assert parts.lifecycle.config.source == path and [ep.name for ep in parts.fleet] == ["a"]


def test_the_listener_asks_for_a_deep_backlog_unless_told() -> None:
    """A burst of clients connecting at once is queued by the kernel, not dropped for a SYN retransmit (1 s)."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    from olladmr.service import LISTEN_BACKLOG, Listener, with_backlog

    assert with_backlog("tcp:40114:interface=127.0.0.1") == f"tcp:40114:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"
    assert with_backlog("tcp:1:backlog=7") == "tcp:1:backlog=7"
    listener = Listener(reactor, "tcp:0:interface=127.0.0.1")
    listener.bind(Factory())  # type: ignore[arg-type]
    try:
        assert listener.port is not None and getattr(listener.port, "backlog") == LISTEN_BACKLOG >= 511
    finally:
        listener.close()
