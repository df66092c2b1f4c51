"""
The dashboard's server side: the event log, the traffic history, the once-a-second
sampler and its event streams on a ``task.Clock``; then its routes on a real socket
(files, redirects, the admin-key rule, the event stream, turning it off).  What a
person sees in a browser is in ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest_twisted
from conftest import config_for, eventually, within
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from olladmr import build as assembly
from olladmr.config import parse_config
from olladmr.ops.dashboard import EVENT_LOG_SIZE, KEEPALIVE_SECONDS, EventLog, EventStream, TrafficHistory, sse
from olladmr.ops.lifecycle import ReloadResult

ADMIN_KEY = "admin-key-of-the-dashboard-tests"
API_KEY = "api-key-of-the-dashboard-tests"


# -- pieces


def test_event_log_keeps_the_last_fifty_newest_first() -> None:
    clock = Clock()
    events = EventLog(clock)
    for i in range(EVENT_LOG_SIZE + 7):
        clock.advance(1)
        events.add("status", f"event {i}")
    recent = events.recent()
    assert len(recent) == EVENT_LOG_SIZE
    assert [e["message"] for e in recent[:2]] == [f"event {EVENT_LOG_SIZE + 6}", f"event {EVENT_LOG_SIZE + 5}"]
    assert recent[0]["time"] == EVENT_LOG_SIZE + 7
    assert [e["id"] for e in events.since(events.last_id - 2)] == [events.last_id - 1, events.last_id]


def test_event_log_records_reloads_and_refused_configs() -> None:
    events = EventLog(Clock())
    events.reload_observed(ReloadResult(True, "added dmr-3; dmr-1: priority 100 -> 50"))
    events.reload_observed(ReloadResult(False, "olla.yaml: endpoints[0].url: expected a URL"))
    refused, applied = events.recent()
    assert (applied["kind"], applied["message"]) == ("reload", "reloaded: added dmr-3; dmr-1: priority 100 -> 50")
    assert (refused["kind"], refused["error"]) == ("config_error", "olla.yaml: endpoints[0].url: expected a URL")


def test_traffic_history_is_rates_per_second_over_five_minutes() -> None:
    history = TrafficHistory()
    history.sample(100.0, 0, 0)
    assert history.samples() == [] and history.latest() == (0.0, 0.0)
    history.sample(101.0, 10, 400)
    history.sample(103.0, 16, 400)
    assert history.samples() == [[101.0, 10.0, 400.0], [103.0, 3.0, 0.0]]
    for t in range(400):
        history.sample(104.0 + t, 16, 400)
    assert len(history.samples()) == 300


class FakeRequest:
    """What an ``EventStream`` uses of a ``Request``: write, finish, producer registration, notifyFinish."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self._finish: Deferred[None] = Deferred()

    def write(self, data: bytes) -> None:
        assert not self.finished
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def finish(self) -> None:
        self.finished = True
        self._finish.callback(None)

    def notifyFinish(self) -> Deferred[None]:
        return self._finish

    def client_left(self) -> None:
        self._finish.errback(ConnectionError("gone"))

    def text(self) -> str:
        return b"".join(self.written).decode()


def test_a_paused_stream_keeps_only_the_newest_snapshot_and_every_event() -> None:
    request = FakeRequest()
    forgotten: list[EventStream] = []
    stream = EventStream(request, forgotten.append)  # type: ignore[arg-type]
    assert request.producer is stream
    stream.pauseProducing()
    stream.send(sse("snapshot", 1), snapshot=True)
    stream.send(sse("event", "a"))
    stream.send(sse("snapshot", 2), snapshot=True)
    stream.send(sse("event", "b"))
    assert request.written == []
    stream.resumeProducing()
    assert request.text() == 'event: event\ndata: "a"\n\nevent: event\ndata: "b"\n\nevent: snapshot\ndata: 2\n\n'
    request.client_left()
    assert forgotten == [stream] and not stream.open and request.producer is None
    stream.send(b"late")  # ignored once the client is gone
    assert b"late" not in request.written


def built(clock: Clock, **sections: Any) -> assembly.Daemon:
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, **sections.pop("server", {})},
            "endpoints": [{"name": "dmr-a", "url": "http://a.test:12434"}, {"name": "dmr-b", "url": "http://b.test:1"}],
        },
        "test",
    )
    return assembly.build(config, reactor=clock, listen="tcp:0:interface=127.0.0.1")


def events_in(request: FakeRequest) -> list[tuple[str, Any]]:
    out = []
    for block in request.text().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if line.startswith(("event: ", "data: ")))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_the_sampler_logs_status_and_breaker_changes_and_pushes_only_changes() -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    parts = built(clock)
    dashboard = parts.dashboard
    a, b = parts.fleet
    a.status, b.status = "healthy", "healthy"
    dashboard.tick()
    request = FakeRequest()
    assert dashboard.subscribe(request) is not None  # type: ignore[arg-type]
    first = events_in(request)
    assert [name for name, _ in first] == ["snapshot", "events"]
    assert [ep["status"] for ep in first[0][1]["endpoints"]] == ["healthy", "healthy"]
    request.written.clear()

    clock.advance(1)
    dashboard.tick()
    assert request.written == []  # nothing changed: nothing sent

    b.status, b.status_reason = "offline", "connection_refused: connection refused"
    for _ in range(5):  # proxy.breaker_failures
        b.record_failure()
    clock.advance(1)
    dashboard.tick()
    pushed = events_in(request)
    messages = [data["message"] for name, data in pushed if name == "event"]
    assert messages == [
        "dmr-b: healthy → offline (connection_refused: connection refused)",
        "dmr-b: breaker closed → open",
    ]
    snapshot = next(data for name, data in pushed if name == "snapshot")
    assert snapshot["endpoints"][1]["status"] == "offline" and snapshot["endpoints"][1]["breaker"] == "open"
    request.written.clear()

    dashboard.events.reload_observed(ReloadResult(True, "no changes"))
    clock.advance(1)
    dashboard.tick()
    assert [d["message"] for n, d in events_in(request) if n == "event"] == ["reloaded: no changes"]
    request.written.clear()

    clock.advance(KEEPALIVE_SECONDS)
    dashboard.tick()
    assert b": keep-alive\n\n" in request.written


def test_stopping_the_service_ends_the_open_streams() -> None:
    clock = Clock()
    parts = built(clock)
    dashboard = parts.dashboard
    dashboard.startService()
    request = FakeRequest()
    dashboard.subscribe(request)  # type: ignore[arg-type]
    assert dashboard.streams == 1
    dashboard.stopService()
    assert request.finished and dashboard.streams == 0


def test_the_snapshot_holds_no_secrets() -> None:
    """Keys are configured as digests; neither a digest nor a key appears in what the dashboard sends."""
    admin = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    api = hashlib.sha256(API_KEY.encode()).hexdigest()
    parts = built(Clock(), server={"auth": {"admin_keys": [admin], "api_keys": [api]}})
    text = json.dumps(parts.dashboard.snapshot())
    for secret in (ADMIN_KEY, API_KEY, admin, api):
        assert secret not in text


# -- on a real socket


class Collect(Protocol):
    """Collects a streamed body until ``until`` has arrived."""

    def __init__(self, until: bytes) -> None:
        self.data = b""
        self.until = until
        self.seen: Deferred[bytes] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.until in self.data and not self.seen.called:
            self.seen.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        self.ended.callback(None)


async def open_stream(daemon: Any, until: bytes, headers: dict[str, str] | None = None) -> tuple[Any, Collect]:
    hdrs = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
    response = await daemon.agent.request(b"GET", (daemon.base + "/internal/ui/events").encode(), hdrs)
    collector = Collect(until)
    response.deliverBody(collector)
    return response, collector


@pytest_twisted.ensureDeferred
async def test_the_page_and_its_files_are_served_with_a_strict_policy(daemon_factory, fake):
    daemon = await daemon_factory(config_for(fake))
    response, _ = await daemon.request("GET", "/internal/ui")
    assert response.code == 301 and response.headers.getRawHeaders(b"location") == [b"/internal/ui/"]
    response, body = await daemon.request("GET", "/internal/ui/")
    assert response.code == 200 and body.startswith(b"<!doctype html>")
    assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    policy = response.headers.getRawHeaders(b"content-security-policy")[0]
    assert b"default-src 'none'" in policy and b"connect-src 'self'" in policy
    for name, kind in (("app.js", b"text/javascript; charset=utf-8"), ("style.css", b"text/css; charset=utf-8")):
        response, body = await daemon.request("GET", f"/internal/ui/{name}")
        assert response.code == 200 and response.headers.getRawHeaders(b"content-type") == [kind] and body
        assert b"http://" not in body and b"https://" not in body  # nothing loaded from elsewhere
    response, body = await daemon.request("GET", "/internal/ui/nope.js")
    assert response.code == 404 and json.loads(body)["error"]["type"]
    response, body = await daemon.request("POST", "/internal/ui/", b"")
    assert response.code == 405


@pytest_twisted.ensureDeferred
async def test_the_event_stream_starts_with_the_snapshot_and_the_event_log(daemon_factory, fake):
    daemon = await daemon_factory(config_for(fake))
    response, collector = await open_stream(daemon, b"event: events\n")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    data = await within(collector.seen, 5, "the first snapshot")
    assert data.startswith(b"retry: 2000\n\nevent: snapshot\ndata: ")
    snapshot = json.loads(data.split(b"\n\n")[1].split(b"data: ", 1)[1])
    assert [ep["name"] for ep in snapshot["endpoints"]] == [fake.name]
    assert daemon.parts.dashboard.streams == 1
    collector.transport.loseConnection()  # type: ignore[attr-defined]
    await within(collector.ended, 5, "the stream's end")
    await eventually(lambda: daemon.parts.dashboard.streams == 0, what="the dashboard forgetting the stream")


@pytest_twisted.ensureDeferred
async def test_admin_keys_guard_what_the_page_shows_not_the_page(daemon_factory, fake):
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    daemon = await daemon_factory(config_for(fake, server={"auth": {"admin_keys": [digest]}}))
    for path in ("/internal/ui", "/internal/ui/", "/internal/ui/app.js", "/internal/ui/style.css"):
        response, _ = await daemon.request("GET", path)
        assert response.code in (200, 301), path
    for path in ("/internal/ui/events", "/internal/ui/snapshot"):
        response, body = await daemon.request("GET", path)
        assert response.code == 401, path
        response, body = await daemon.request("GET", path, headers={"authorization": "Bearer wrong"})
        assert response.code == 401, path
    response, body = await daemon.request("GET", "/internal/ui/snapshot", headers={"x-api-key": ADMIN_KEY})
    assert response.code == 200 and json.loads(body)["endpoints"][0]["name"] == fake.name
    response, collector = await open_stream(daemon, b"event: events\n", {"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.code == 200
    await within(collector.seen, 5, "the first snapshot")
    collector.transport.loseConnection()  # type: ignore[attr-defined]
    await within(collector.ended, 5, "the stream's end")


@pytest_twisted.ensureDeferred
async def test_turned_off_the_dashboard_is_not_there(daemon_factory, fake):
    daemon = await daemon_factory(config_for(fake, server={"admin": {"dashboard": False}}))
    for path in ("/internal/ui", "/internal/ui/", "/internal/ui/app.js", "/internal/ui/events", "/internal/ui/snapshot"):
        response, body = await daemon.request("GET", path)
        assert response.code == 404 and b"server.admin.dashboard: false" in body, path


@pytest_twisted.ensureDeferred
async def test_a_reload_that_turns_it_off_ends_the_open_streams(daemon_factory, fake):
    daemon = await daemon_factory(config_for(fake))
    _, collector = await open_stream(daemon, b"event: events\n")
    await within(collector.seen, 5, "the first snapshot")
    daemon.parts.reconfiguration.apply(config_for(fake, server={"admin": {"dashboard": False}}))
    await within(collector.ended, 5, "the stream ending after the dashboard was turned off")
    assert daemon.parts.dashboard.streams == 0
