"""Metrics, token usage, access events, status and readiness, observed through the running daemon."""

from __future__ import annotations

import json
import re

import pytest_twisted
from conftest import config_for, in_thread
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import globalLogPublisher

CHAT = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/olla/dmr/engines/v1/chat/completions"


async def scrape(daemon) -> dict[tuple[str, tuple], float]:
    response, body = await daemon.request("GET", "/internal/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest_twisted.ensureDeferred
async def test_metrics_move_by_exactly_the_traffic_sent(daemon_factory, fakes):
    """Counters rise by exactly what was sent; unknown models fold into one label; endpoint gauges are live."""
    daemon = await daemon_factory(config_for(fakes[0], fakes[1]))
    before = await scrape(daemon)
    for _ in range(3):
        await daemon.post_json(PATH, CHAT)
    await daemon.post_json(PATH, {**CHAT, "model": "ai/unknown-1"})
    await daemon.post_json(PATH, {**CHAT, "model": "ai/unknown-2"})
    fakes[0].load_failure = True
    await daemon.post_json(PATH, CHAT)
    after = await scrape(daemon)
    key = dict(endpoint="fake-0", model="ai/smollm2:latest", route="chat/completions")
    assert value(after, "olladmr_requests_total", **key, status_class="2xx") - value(
        before, "olladmr_requests_total", **key, status_class="2xx"
    ) == 3
    assert value(after, "olladmr_requests_total", **key, status_class="5xx") == 1
    assert value(after, "olladmr_requests_total", endpoint="none", model="other", route="chat/completions",
                 status_class="4xx") == 2
    assert value(after, "olladmr_request_duration_seconds_count", route="chat/completions") == 6
    assert value(after, "olladmr_time_to_first_byte_seconds_count", route="chat/completions") == 4
    assert value(after, "olladmr_endpoint_up", endpoint="fake-1") == 1
    assert value(after, "olladmr_endpoint_status", endpoint="fake-1", status="healthy") == 1
    assert value(after, "olladmr_endpoint_breaker_state", endpoint="fake-0") == 0
    assert value(after, "olladmr_requests_in_flight") == 0
    assert value(after, "olladmr_upstream_response_bytes_total", endpoint="fake-0") > 0
    assert value(after, "olladmr_health_check_duration_seconds_count", endpoint="fake-0", result="healthy") >= 1


@pytest_twisted.ensureDeferred
async def test_token_usage_recorded_without_touching_the_bytes(daemon_factory, fake):
    """Usage from a JSON body and from the include_usage SSE chunk reaches the metrics and the access event."""
    daemon = await daemon_factory(config_for(fake))
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        client = daemon.openai()
        reply = await in_thread(client.chat.completions.create, model="ai/smollm2", messages=[{"role": "user", "content": "one two"}])

        def stream() -> list:
            return list(client.chat.completions.create(
                model="ai/smollm2", messages=[{"role": "user", "content": "x"}], stream=True,
                stream_options={"include_usage": True}))

        chunks = await in_thread(stream)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert chunks[-1].usage.completion_tokens == 4
    samples = await scrape(daemon)
    prompt = reply.usage.prompt_tokens + chunks[-1].usage.prompt_tokens
    assert value(samples, "olladmr_tokens_total", model="ai/smollm2:latest", kind="prompt") == prompt
    assert value(samples, "olladmr_tokens_total", model="ai/smollm2:latest", kind="completion") == 8
    assert value(samples, "olladmr_completion_tokens_per_second_count", model="ai/smollm2:latest") == 2
    access = [e for e in events if e.get("log_namespace") == "olladmr.access" and e.get("endpoint")]
    assert len(access) == 2
    assert {e["completion_tokens"] for e in access} == {4}
    assert all(e["outcome"] == "ok" and e["status"] == 200 and e["request_id"] for e in access)


async def access_events(*requests) -> dict[str, dict]:
    """Await ``requests`` (coroutines, one after another) and return their ``olladmr.access`` events by request id."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for request in requests:
            await request
    finally:
        globalLogPublisher.removeObserver(events.append)
    return {e["request_id"]: e for e in events if e.get("log_namespace") == "olladmr.access"}


@pytest_twisted.ensureDeferred
async def test_one_access_event_per_request_including_errors(daemon_factory, fake):
    """Every request, proxied or answered locally, produces exactly one access event with its outcome."""
    daemon = await daemon_factory(config_for(fake))
    access = await access_events(
        daemon.post_json(PATH, CHAT, {"x-request-id": "req-ok"}),
        daemon.request("GET", "/nowhere", headers={"x-request-id": "req-404"}),
        daemon.post_json(PATH, {"model": ""}, {"x-request-id": "req-400"}),
    )
    assert set(access) == {"req-ok", "req-404", "req-400"}
    assert (access["req-ok"]["status"], access["req-ok"]["outcome"], access["req-ok"]["endpoint"]) == (200, "ok", "fake-a")
    assert access["req-404"]["status"] == 404 and access["req-400"]["status"] == 400
    assert access["req-ok"]["ttfb_ms"] is not None and access["req-ok"]["total_ms"] >= access["req-ok"]["ttfb_ms"]


@pytest_twisted.ensureDeferred
async def test_access_lines_leave_out_what_has_no_value_and_json_keeps_it_null(daemon_factory, fake):
    """A rejected request's text line has no ``None`` and units on durations; its JSON event shows the nulls."""
    from twisted.logger import eventAsJSON, formatEventAsClassicLogText

    daemon = await daemon_factory(config_for(fake))
    access = await access_events(
        daemon.post_json(PATH, CHAT, {"x-request-id": "req-ok"}),
        daemon.post_json(PATH, {**CHAT, "model": "no/such-model"}, {"x-request-id": "req-none"}),
    )
    rejected = formatEventAsClassicLogText(access["req-none"])
    assert "None" not in rejected and "endpoint=" not in rejected and "ttfb=" not in rejected and "tokens=" not in rejected
    assert "model=no/such-model -> 404" in rejected and re.search(r"total=[0-9.]+ms", rejected), rejected
    served = formatEventAsClassicLogText(access["req-ok"])
    assert "endpoint=fake-a -> 200" in served and re.search(r"ttfb=[0-9.]+ms total=[0-9.]+ms tokens=\d+/\d+ ok", served)
    as_json = json.loads(eventAsJSON(access["req-none"]))
    assert as_json["endpoint"] is None and as_json["ttfb_ms"] is None and as_json["prompt_tokens"] is None


@pytest_twisted.ensureDeferred
async def test_status_models_version_ready(daemon_factory, fake):
    """Status, per-model stats, version and readiness answer JSON; readiness fails while draining."""
    daemon = await daemon_factory(config_for(fake))
    for _ in range(4):
        await daemon.post_json(PATH, CHAT)
    _, body = await daemon.request("GET", "/internal/status")
    status = json.loads(body)
    assert status["requests"]["total"] == 4 and status["requests"]["success_rate"] == 1.0
    assert status["endpoints"] == {"total": 1, "healthy": 1, "routable": 1} and status["balancer"] == "priority"
    _, body = await daemon.request("GET", "/internal/status/models")
    models = {m["key"]: m for m in json.loads(body)["models"]}
    smol = models["ai/smollm2:latest"]
    assert smol["requests"] == 4 and smol["latency_ms"]["p50"] is not None
    assert smol["latency_ms"]["p50"] <= smol["latency_ms"]["p99"]
    _, body = await daemon.request("GET", "/version")
    version = json.loads(body)
    assert version["name"] == "olladmr" and version["twisted"] and version["python"]
    response, _ = await daemon.request("GET", "/internal/ready")
    assert response.code == 200
    daemon.parts.lifecycle.draining = True
    response, body = await daemon.request("GET", "/internal/ready")
    assert response.code == 503 and json.loads(body)["reason"] == "shutting down"
    daemon.parts.lifecycle.draining = False


def test_json_log_format_is_one_object_per_line():
    """logging.format: json writes each event as one JSON line with its fields."""
    import io

    from olladmr.config import parse_config
    from olladmr.ops.logs import LogControl

    stream = io.StringIO()
    control = LogControl("info", "json", stream)
    control.observer({"log_namespace": "t", "log_level": __import__("twisted.logger").logger.LogLevel.info,
                      "log_format": "hello {who}", "who": "you", "log_time": 0.0})
    control.reconfigure(parse_config({"logging": {"level": "error", "format": "json"}}, "t"))
    control.observer({"log_namespace": "t", "log_level": __import__("twisted.logger").logger.LogLevel.info,
                      "log_format": "dropped", "log_time": 0.0})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["who"] == "you"
