"""Reload without dropping a stream, invalid reloads, and drain on shutdown; SIGHUP/SIGTERM on real twistd."""

from __future__ import annotations

import json
import sys

import pytest
import pytest_twisted
import yaml
from conftest import config_for, eventually, within
from test_core_e2e import _stream
from test_twistd import TWISTD, _env, _free_port, _Watcher
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from olladmr.build import build

CHAT = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/olla/dmr/engines/v1/chat/completions"


def _write(path, *fakes, **extra) -> None:
    doc = {"endpoints": [{"url": f.url, "name": f.name, "check_interval": "10s"} for f in fakes], **extra}
    path.write_text(yaml.safe_dump(doc))


@pytest_twisted.ensureDeferred
async def test_reload_swaps_endpoints_while_a_stream_finishes_on_the_old_one(tmp_path, fakes):
    """A stream in flight on a removed endpoint completes unchanged; new requests go to the new endpoint."""
    cfg = tmp_path / "config.yaml"
    _write(cfg, fakes[0], fakes[1])
    from olladmr.config import load_config

    parts = build(load_config(str(cfg)), reactor=reactor, listen="tcp:0:interface=127.0.0.1", config_path=str(cfg))
    service = parts.service
    service.startService()
    await service.serving
    from conftest import Daemon

    daemon = Daemon(parts)
    try:
        fakes[0].hold = Deferred()
        _, collector = await _stream(daemon)
        await within(collector.first, 5, "first chunk")
        survivor = parts.fleet.get("fake-1")
        survivor.request_count = 41
        doc = yaml.safe_load(cfg.read_text())
        doc["endpoints"] = [doc["endpoints"][1], {"url": fakes[2].url, "name": fakes[2].name}]
        doc["endpoints"][0]["priority"] = 7  # fake-1 changes, fake-0 goes, fake-2 arrives
        cfg.write_text(yaml.safe_dump(doc))
        result = parts.reloader.reload()
        assert result.ok and "added fake-2" in result.summary and "removed fake-0" in result.summary
        assert "changed fake-1" in result.summary and parts.fleet.get("fake-1").config.priority == 7
        assert parts.fleet.get("fake-1") is survivor and survivor.request_count == 41  # state kept
        fakes[0].hold.callback(None)
        body = await within(collector.done, 5, "end of the old stream")
        assert body.endswith(b"data: [DONE]\n\n")
        await eventually(lambda: parts.fleet.get("fake-2").status == "healthy", 5, "new endpoint checked")
        response, _ = await daemon.post_json(PATH, CHAT)
        assert response.headers.getRawHeaders(b"x-olla-endpoint")[0] in (b"fake-1", b"fake-2")
        cfg.write_text("endpoints:\n  - {url: 'http://x:1', check_interval: soon}\n")
        bad = parts.reloader.reload()
        assert not bad.ok and "check_interval" in bad.summary
        assert sorted(ep.name for ep in parts.fleet) == ["fake-1", "fake-2"]  # old config kept
    finally:
        await service.stopService()
        await daemon.pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_shutdown_drains_in_flight_streams(daemon_factory, fake):
    """stopService stops accepting, waits for a running stream to finish, then stops."""
    daemon = await daemon_factory(config_for(fake))
    fake.hold = Deferred()
    _, collector = await _stream(daemon)
    await within(collector.first, 5, "first chunk")
    port = daemon.port
    stopping = daemon.service.stopService()
    assert daemon.parts.lifecycle.draining and not stopping.called
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.protocol import Protocol

    with pytest.raises(ConnectionRefusedError):  # no new connections while draining
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
    fake.hold.callback(None)
    body = await within(collector.done, 5, "the stream to finish")
    assert body.endswith(b"data: [DONE]\n\n")
    await within(stopping, 5, "the service to stop")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sighup_reloads_and_sigterm_drains_real_twistd(tmp_path, fakes):
    """kill -HUP applies a new endpoint list to the real daemon; kill -TERM lets a stream finish, exit 0."""
    from twisted.web.client import Agent, HTTPConnectionPool, readBody

    port = _free_port()
    cfg = tmp_path / "config.yaml"
    _write(cfg, fakes[0])
    watcher = _Watcher()
    process = reactor.spawnProcess(
        watcher, sys.executable,
        TWISTD + ["-n", "--pidfile=", "olladmr", "--config", str(cfg), "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=_env(), path=str(tmp_path),
    )
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)

    async def endpoint_names() -> list[str]:
        response = await agent.request(b"GET", f"http://127.0.0.1:{port}/internal/status/endpoints".encode())
        return [e["name"] for e in json.loads(await readBody(response))["endpoints"]]

    terminated = False
    try:
        await within(watcher.listening, 30, "the daemon to listen")
        assert await endpoint_names() == ["fake-0"]
        _write(cfg, fakes[0], fakes[1])
        process.signalProcess("HUP")
        await eventually(lambda: b"reloaded" in watcher.output, 10, "the reload log line")
        assert await endpoint_names() == ["fake-0", "fake-1"]
        cfg.write_text("endpoints: [{url: 'nope'}]\n")
        process.signalProcess("HUP")
        await eventually(lambda: b"reload failed" in watcher.output, 10, "the failed-reload log line")
        assert await endpoint_names() == ["fake-0", "fake-1"]

        from test_core_e2e import _Collector
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers
        import io

        fakes[0].hold = Deferred()
        fakes[1].hold = fakes[0].hold
        response = await agent.request(
            b"POST", f"http://127.0.0.1:{port}{PATH}".encode(), Headers({b"content-type": [b"application/json"]}),
            FileBodyProducer(io.BytesIO(json.dumps({**CHAT, "stream": True}).encode())),
        )
        collector = _Collector()
        response.deliverBody(collector)
        await within(collector.first, 5, "first chunk")
        process.signalProcess("TERM")
        terminated = True
        await eventually(lambda: b"draining 1 in-flight" in watcher.output, 10, "drain to start")
        fakes[0].hold.callback(None)
        body = await within(collector.done, 10, "the stream to finish during drain")
        assert body.endswith(b"data: [DONE]\n\n")
    finally:
        if process.pid and not terminated:
            process.signalProcess("TERM")
    code = await within(watcher.ended, 30, "the daemon to exit")
    assert code == 0, watcher.output.decode()
    assert b"Traceback" not in watcher.output
    await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_reload_endpoint_is_opt_in(tmp_path, fake):
    """POST /internal/reload is 404 unless server.admin.reload_endpoint is true; then it reloads."""
    from conftest import Daemon
    from olladmr.config import load_config

    cfg = tmp_path / "config.yaml"
    _write(cfg, fake)
    parts = build(load_config(str(cfg)), reactor=reactor, listen="tcp:0:interface=127.0.0.1", config_path=str(cfg))
    service = parts.service
    service.startService()
    await service.serving
    daemon = Daemon(parts)
    try:
        response, _ = await daemon.request("POST", "/internal/reload")
        assert response.code == 404
        _write(cfg, fake, server={"admin": {"reload_endpoint": True}})
        parts.reloader.reload()
        response, body = await daemon.request("POST", "/internal/reload")
        assert response.code == 200 and json.loads(body)["reloaded"] is True
        cfg.write_text("server: {port: nope}\n")
        response, body = await daemon.request("POST", "/internal/reload")
        assert response.code == 400 and "server.port" in json.loads(body)["summary"]
        _, metrics = await daemon.request("GET", "/internal/metrics")
        assert b'olladmr_config_reloads_total{result="failure"} 1.0' in metrics
    finally:
        await service.stopService()
        await daemon.pool.closeCachedConnections()
