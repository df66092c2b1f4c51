"""End-to-end fleet behaviour with three fake DMRs on real ports: routing, balancing, failover, recovery."""

from __future__ import annotations

import json
from collections import Counter

import pytest_twisted
from conftest import config_for, eventually, in_thread, within
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore

CHAT = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}
NO_AFFINITY = {"affinity": {"enabled": False}}  # these tests are about the balancers, which decide unkeyed requests
PATH = "/olla/dmr/engines/v1/chat/completions"


def served_by(fakes) -> Counter:
    return Counter({f.name: len(f.inference_requests) for f in fakes})


@pytest_twisted.ensureDeferred
async def test_priority_routes_to_the_top_tier_only(daemon_factory, fakes):
    """With the priority balancer, the highest-priority endpoint serves everything while it is healthy."""
    daemon = await daemon_factory(config_for(*fakes))
    for _ in range(6):
        response, _ = await daemon.post_json(PATH, CHAT)
        assert response.code == 200
        assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-0"]
    assert served_by(fakes) == Counter({"fake-0": 6, "fake-1": 0, "fake-2": 0})


@pytest_twisted.ensureDeferred
async def test_equal_priority_requests_spread_and_round_robin_rotates(daemon_factory, fakes):
    """Ties in the top tier rotate; round-robin is a strict rotation over all candidates."""
    same = {f"endpoint{i}": {"priority": 50} for i in range(3)}
    daemon = await daemon_factory(config_for(*fakes, **same, proxy=NO_AFFINITY))  # the balancer decides unkeyed requests
    for _ in range(6):
        await daemon.post_json(PATH, CHAT)
    assert served_by(fakes) == Counter({"fake-0": 2, "fake-1": 2, "fake-2": 2})
    for f in fakes:
        f.reset()
    rr = await daemon_factory(config_for(*fakes, proxy={"load_balancer": "round-robin", **NO_AFFINITY}))
    order = []
    for _ in range(6):
        response, _ = await rr.post_json(PATH, CHAT)
        order.append(response.headers.getRawHeaders(b"x-olla-endpoint")[0].decode())
    assert order == ["fake-0", "fake-1", "fake-2"] * 2


@pytest_twisted.ensureDeferred
async def test_model_aware_routing_and_union_model_list(daemon_factory, fakes):
    """A model goes only to endpoints that list it (any alias); unknown models get a 404 naming what exists."""
    fakes[0].models = ["ai/smollm2"]
    fakes[1].models = ["ai/llama3.2:latest", "ai/smollm2"]
    fakes[2].models = ["ai/phi4-mini"]
    daemon = await daemon_factory(config_for(*fakes))
    response, _ = await daemon.post_json(PATH, {**CHAT, "model": "AI/Phi4-Mini:latest"})
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-2"]
    assert response.headers.getRawHeaders(b"x-olla-routing-decision") == [b"routed"]
    assert response.headers.getRawHeaders(b"x-olla-routing-reason") == [b"model_found"]
    assert json.loads(fakes[2].inference_requests[-1].body)["model"] == "AI/Phi4-Mini:latest"  # never rewritten
    response, _ = await daemon.post_json(PATH, {**CHAT, "model": "llama3.2"})
    assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-1"]
    response, body = await daemon.post_json(PATH, {**CHAT, "model": "ai/nope"})
    assert response.code == 404
    error = json.loads(body)["error"]
    assert error["code"] == "model_not_found" and "ai/nope" in error["message"] and "ai/phi4-mini" in error["message"]
    assert response.headers.getRawHeaders(b"x-olla-routing-decision") == [b"rejected"]
    models = await in_thread(daemon.openai().models.list)
    ids = [m.id for m in models.data]
    assert sorted(ids) == ["ai/llama3.2:latest", "ai/phi4-mini", "ai/smollm2"]
    response, body = await daemon.request("GET", "/olla/models")
    listing = {m["key"]: m for m in json.loads(body)["data"]}
    assert [e["name"] for e in listing["ai/smollm2:latest"]["endpoints"]] == ["fake-0", "fake-1"]


@pytest_twisted.ensureDeferred
async def test_lazy_endpoint_with_empty_list_is_a_fallback(daemon_factory, fakes):
    """An endpoint listing no models (lazy) serves models nobody lists; known lists still win."""
    fakes[0].models = ["ai/smollm2"]
    fakes[1].models = []
    daemon = await daemon_factory(config_for(fakes[0], fakes[1]))
    response, _ = await daemon.post_json(PATH, {**CHAT, "model": "ai/other"})
    assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-1"]
    assert response.headers.getRawHeaders(b"x-olla-routing-decision") == [b"fallback"]
    response, _ = await daemon.post_json(PATH, CHAT)
    assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-0"]


@pytest_twisted.ensureDeferred
async def test_failover_under_steady_traffic_loses_no_request(daemon_factory, fakes):
    """Killing a backend while 300 requests flow (10 at a time) costs the clients nothing."""
    same = {f"endpoint{i}": {"priority": 50} for i in range(3)}
    daemon = await daemon_factory(config_for(*fakes, **same, proxy=NO_AFFINITY))
    limiter = DeferredSemaphore(10)
    statuses: list[int] = []
    killed: Deferred[None] | None = None

    async def one(i: int) -> None:
        nonlocal killed
        if i == 100:
            killed = Deferred.fromCoroutine(fakes[0].stop())
        response, body = await daemon.post_json(PATH, CHAT)
        statuses.append(response.code)

    await DeferredList([limiter.run(lambda i=i: Deferred.fromCoroutine(one(i))) for i in range(300)])
    await killed
    assert Counter(statuses) == Counter({200: 300})
    assert daemon.parts.fleet.get("fake-0").status == "offline"
    assert len(fakes[1].inference_requests) + len(fakes[2].inference_requests) >= 200
    await fakes[0].start(fakes[0].port)


@pytest_twisted.ensureDeferred
async def test_dead_endpoint_recovers_and_gets_traffic_again(daemon_factory, fakes):
    """A killed endpoint is offline at once on a refused request, and healthy again soon after it restarts."""
    config = config_for(
        fakes[0], fakes[1], endpoint0={"check_interval": "200ms", "check_timeout": "100ms"}, proxy=NO_AFFINITY
    )
    daemon = await daemon_factory(config)
    await fakes[0].stop()
    response, _ = await daemon.post_json(PATH, CHAT)
    assert response.code == 200 and response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-1"]
    endpoint = daemon.parts.fleet.get("fake-0")
    assert endpoint.status == "offline"
    await fakes[0].start(fakes[0].port)
    await eventually(lambda: endpoint.status == "healthy", 10, "fake-0 to be healthy again")
    response, _ = await daemon.post_json(PATH, CHAT)
    assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-0"]


@pytest_twisted.ensureDeferred
async def test_fast_failing_backend_is_ejected_by_its_breaker(daemon_factory, fakes):
    """Fast 500s pass through unchanged, then open the breaker; least-connections stops sending there."""
    config = config_for(fakes[0], fakes[1], proxy={"load_balancer": "least-connections", "breaker_failures": 3})
    daemon = await daemon_factory(config)
    fakes[0].force_status = (500, b"boom\n", "text/plain; charset=utf-8")
    codes = Counter()
    for _ in range(20):
        response, body = await daemon.post_json(PATH, CHAT)
        codes[response.code] += 1
        if response.code == 500:
            assert body == b"boom\n"
    assert codes[500] == 3 and codes[200] == 17
    assert len(fakes[0].inference_requests) == 3
    _, body = await daemon.request("GET", "/internal/status/endpoints")
    status = {e["name"]: e for e in json.loads(body)["endpoints"]}
    assert status["fake-0"]["breaker"] == "open" and status["fake-0"]["routable"] is False
    assert status["fake-0"]["issues"]
    assert json.loads(body)["routable_count"] == 1


@pytest_twisted.ensureDeferred
async def test_loading_model_503_fails_over(daemon_factory, fakes):
    """A legacy DMR's 503 "Loading model" is retried on another endpoint; the client sees a 200."""
    daemon = await daemon_factory(config_for(fakes[0], fakes[1]))
    fakes[0].loading_503 = 1
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-1"]
    assert daemon.parts.fleet.get("fake-0").routable  # not punished for loading


@pytest_twisted.ensureDeferred
async def test_per_endpoint_concurrency_queue(daemon_factory, fake):
    """max_concurrent=1, queue_size=1: one runs, one waits (then runs), the third gets 503 with Retry-After."""
    config = config_for(fake, endpoint0={"max_concurrent": 1, "queue_size": 1, "queue_timeout": "5s"})
    daemon = await daemon_factory(config)
    fake.hold = Deferred()
    first = Deferred.fromCoroutine(daemon.post_json(PATH, {**CHAT, "stream": True}))
    await eventually(lambda: fake.active == 1, 5, "first request upstream")
    second = Deferred.fromCoroutine(daemon.post_json(PATH, CHAT))
    await eventually(lambda: daemon.parts.fleet.get("fake-a").queued == 1, 5, "second request queued")
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 503
    assert json.loads(body)["error"]["code"] == "queue_full"
    assert response.headers.getRawHeaders(b"retry-after")
    assert len(fake.inference_requests) == 1
    fake.hold.callback(None)
    (r1, _), (r2, _) = await within(first, 5), await within(second, 5)
    assert (r1.code, r2.code) == (200, 200)
    assert len(fake.inference_requests) == 2


@pytest_twisted.ensureDeferred
async def test_queue_timeout_gives_503(daemon_factory, fake):
    """A queued request that gets no slot within queue_timeout is answered 503 queue_timeout."""
    config = config_for(fake, endpoint0={"max_concurrent": 1, "queue_size": 4, "queue_timeout": "200ms"})
    daemon = await daemon_factory(config)
    fake.hold = Deferred()
    first = Deferred.fromCoroutine(daemon.post_json(PATH, {**CHAT, "stream": True}))
    await eventually(lambda: fake.active == 1, 5, "first request upstream")
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 503 and json.loads(body)["error"]["code"] == "queue_timeout"
    fake.hold.callback(None)
    await within(first, 5)


@pytest_twisted.ensureDeferred
async def test_model_only_on_down_endpoint_is_503_model_unavailable(daemon_factory, fakes):
    """When the only endpoint with a model is down, the answer is 503 model_unavailable with Retry-After."""
    fakes[0].models = ["ai/smollm2"]
    fakes[1].models = ["ai/llama3.2"]
    daemon = await daemon_factory(config_for(fakes[0], fakes[1]))
    await fakes[0].stop()
    daemon.parts.health.mark_offline(daemon.parts.fleet.get("fake-0"), "test")
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 503
    assert json.loads(body)["error"]["code"] == "model_unavailable"
    assert response.headers.getRawHeaders(b"retry-after")
    assert response.headers.getRawHeaders(b"x-olla-routing-reason") == [b"model_unavailable"]
    await fakes[0].start(fakes[0].port)


@pytest_twisted.ensureDeferred
async def test_read_timeout_mid_stream_ends_with_an_error_event(daemon_factory, fake):
    """Upstream silence longer than proxy.read_timeout mid-stream: an SSE error event and a clean close."""
    daemon = await daemon_factory(config_for(fake, proxy={"read_timeout": "300ms"}))
    fake.hold = Deferred()
    response, body = await daemon.post_json(PATH, {**CHAT, "stream": True})
    assert response.code == 200
    assert b"[DONE]" not in body
    last = body.strip().split(b"\n\n")[-1]
    assert json.loads(last[len(b"data: ") :])["error"]["code"] == "read_timeout"
    await within(fake.when_disconnected(), 2, "the upstream to be closed")
    fake.hold.callback(None)


@pytest_twisted.ensureDeferred
async def test_status_endpoints_shape(daemon_factory, fakes):
    """/internal/status/endpoints reports each endpoint with its state, models and counters."""
    daemon = await daemon_factory(config_for(*fakes))
    await daemon.post_json(PATH, CHAT)
    response, body = await daemon.request("GET", "/internal/status/endpoints")
    doc = json.loads(body)
    assert (doc["total_count"], doc["healthy_count"], doc["routable_count"]) == (3, 3, 3)
    first = doc["endpoints"][0]
    for key in ("name", "url", "type", "status", "priority", "models", "model_count", "active_connections",
                "request_count", "last_check", "last_latency_ms", "breaker", "issues"):
        assert key in first, key
    assert first["request_count"] == 1 and first["status"] == "healthy" and first["breaker"] == "closed"
    response, body = await daemon.request("GET", "/internal/ready")
    assert response.code == 200
