"""Edge policies end to end: API keys, admin keys, rate limits, outbound auth, CORS, header hygiene."""

from __future__ import annotations

import json

import pytest_twisted
from conftest import config_for

from olladmr.edge.auth import hash_key

CHAT = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/olla/dmr/engines/v1/chat/completions"


@pytest_twisted.ensureDeferred
async def test_api_keys_and_admin_keys(daemon_factory, fake):
    """Wrong or missing keys get 401 JSON; good keys (Bearer or x-api-key) pass and never reach the upstream."""
    auth = {"api_keys": [hash_key("sk-good")], "admin_keys": [hash_key("admin-secret")]}
    daemon = await daemon_factory(config_for(fake, server={"auth": auth}))
    for headers in ({}, {"authorization": "Bearer sk-bad"}, {"x-api-key": "nope"}):
        response, body = await daemon.post_json(PATH, CHAT, headers)
        assert response.code == 401, headers
        assert json.loads(body)["error"]["type"] and response.headers.getRawHeaders(b"x-olla-request-id")
    response, _ = await daemon.post_json(PATH, CHAT, {"authorization": "Bearer sk-good"})
    assert response.code == 200
    response, _ = await daemon.post_json(PATH, CHAT, {"x-api-key": "sk-good"})
    assert response.code == 200
    assert fake.inference_requests and all(
        "authorization" not in r.headers and "x-api-key" not in r.headers for r in fake.inference_requests
    )
    response, _ = await daemon.request("GET", "/internal/health")
    assert response.code == 200
    response, _ = await daemon.request("GET", "/internal/status", headers={"authorization": "Bearer sk-good"})
    assert response.code == 401
    response, _ = await daemon.request("GET", "/internal/status", headers={"authorization": "Bearer admin-secret"})
    assert response.code == 200
    models = daemon.openai()
    models.api_key = "sk-good"
    from conftest import in_thread

    listing = await in_thread(models.models.list)
    assert listing.data


@pytest_twisted.ensureDeferred
async def test_rate_limit_429_with_headers_and_exempt_routes(daemon_factory, fake):
    """Past the burst a client gets 429 with Retry-After; limited routes carry X-RateLimit-*; health/metrics are exempt."""
    limits = {"per_ip_requests_per_minute": 60, "burst_size": 3}
    daemon = await daemon_factory(config_for(fake, server={"rate_limits": limits}))
    codes = []
    for _ in range(5):
        response, body = await daemon.post_json(PATH, CHAT)
        codes.append(response.code)
        assert response.headers.getRawHeaders(b"x-ratelimit-limit")
        assert response.headers.getRawHeaders(b"x-ratelimit-remaining")
        assert response.headers.getRawHeaders(b"x-ratelimit-reset")
    assert codes == [200, 200, 200, 429, 429]
    assert int(response.headers.getRawHeaders(b"retry-after")[0]) >= 1
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert len(fake.inference_requests) == 3
    for path in ("/internal/health", "/internal/metrics"):
        for _ in range(5):
            response, _ = await daemon.request("GET", path)
            assert response.code == 200, path


@pytest_twisted.ensureDeferred
async def test_forwarded_for_is_trusted_only_from_trusted_proxies(daemon_factory, fake):
    """With trust_proxy_headers and a trusted peer, clients behind the proxy get separate buckets."""
    limits = {"per_ip_requests_per_minute": 60, "burst_size": 1, "trust_proxy_headers": True,
              "trusted_proxy_cidrs": ["127.0.0.0/8"]}
    daemon = await daemon_factory(config_for(fake, server={"rate_limits": limits}))
    a1, _ = await daemon.post_json(PATH, CHAT, {"x-forwarded-for": "203.0.113.1"})
    b1, _ = await daemon.post_json(PATH, CHAT, {"x-forwarded-for": "203.0.113.2"})
    a2, _ = await daemon.post_json(PATH, CHAT, {"x-forwarded-for": "203.0.113.1"})
    assert (a1.code, b1.code, a2.code) == (200, 200, 429)
    untrusted = {"per_ip_requests_per_minute": 60, "burst_size": 1}
    other = await daemon_factory(config_for(fake, server={"rate_limits": untrusted}))
    c1, _ = await other.post_json(PATH, CHAT, {"x-forwarded-for": "203.0.113.1"})
    c2, _ = await other.post_json(PATH, CHAT, {"x-forwarded-for": "203.0.113.9"})  # spoofing does not help
    assert (c1.code, c2.code) == (200, 429)


@pytest_twisted.ensureDeferred
async def test_outbound_auth_injected_and_never_shown(daemon_factory, fake, monkeypatch):
    """An endpoint's bearer token goes upstream (requests and health checks) but never into status output."""
    monkeypatch.setenv("DMR_TOKEN", "tok-123")
    daemon = await daemon_factory(config_for(fake, endpoint0={"auth": {"type": "bearer", "token_env": "DMR_TOKEN"}}))
    response, _ = await daemon.post_json(PATH, CHAT, {"authorization": "Bearer client-key"})
    assert response.code == 200
    assert fake.inference_requests[-1].headers["authorization"] == ["Bearer tok-123"]
    health_checks = [r for r in fake.requests if r.uri == "/engines/v1/models"]
    assert health_checks and health_checks[0].headers["authorization"] == ["Bearer tok-123"]
    for path in ("/internal/status/endpoints", "/internal/status", "/olla/models"):
        _, body = await daemon.request("GET", path)
        assert b"tok-123" not in body


@pytest_twisted.ensureDeferred
async def test_client_credentials_forwarded_only_when_asked(daemon_factory, fake):
    """forward_client_auth: true passes the client's Authorization through (when olladmr has no keys of its own)."""
    daemon = await daemon_factory(config_for(fake, endpoint0={"forward_client_auth": True}))
    await daemon.post_json(PATH, CHAT, {"authorization": "Bearer llama-key", "cookie": "a=b"})
    sent = fake.inference_requests[-1].headers
    assert sent["authorization"] == ["Bearer llama-key"] and sent["cookie"] == ["a=b"]


@pytest_twisted.ensureDeferred
async def test_upstream_cookies_and_olla_headers_are_dropped(daemon_factory, fake):
    """Set-Cookie, X-Olla-* spoofs and hop-by-hop headers from an upstream never reach the client."""
    daemon = await daemon_factory(config_for(fake))
    fake.extra_headers = [(b"set-cookie", b"s=1"), (b"x-olla-endpoint", b"spoof"), (b"x-kept", b"yes"),
                          (b"keep-alive", b"timeout=5"), (b"proxy-authenticate", b"Basic")]
    response, _ = await daemon.post_json(PATH, CHAT)
    assert response.headers.getRawHeaders(b"set-cookie") is None
    assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-a"]
    assert response.headers.getRawHeaders(b"keep-alive") is None
    assert response.headers.getRawHeaders(b"proxy-authenticate") is None
    assert response.headers.getRawHeaders(b"x-kept") == [b"yes"]


@pytest_twisted.ensureDeferred
async def test_cors_preflight_and_simple_requests(daemon_factory, fake):
    """Preflights from allowed origins get 204 with the Allow-* headers; others 403; responses carry ACAO."""
    cors = {"enabled": True, "allowed_origins": ["http://app.example"]}
    daemon = await daemon_factory(config_for(fake, server={"cors": cors}))
    pre = {"origin": "http://app.example", "access-control-request-method": "POST",
           "access-control-request-headers": "content-type"}
    response, _ = await daemon.request("OPTIONS", PATH, headers=pre)
    assert response.code == 204
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [b"http://app.example"]
    assert response.headers.getRawHeaders(b"access-control-allow-methods")
    response, body = await daemon.request("OPTIONS", PATH, headers={**pre, "origin": "http://evil.example"})
    assert response.code == 403 and json.loads(body)["error"]
    response, _ = await daemon.post_json(PATH, CHAT, {"origin": "http://app.example"})
    assert response.code == 200
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [b"http://app.example"]
    assert b"X-Olla-Endpoint" in b",".join(response.headers.getRawHeaders(b"access-control-expose-headers"))


@pytest_twisted.ensureDeferred
async def test_health_requests_per_minute_limits_the_health_route_only(daemon_factory, fake):
    """health_requests_per_minute is enforced on /internal/health (429 + Retry-After) and limits nothing else."""
    daemon = await daemon_factory(config_for(fake, server={"rate_limits": {"health_requests_per_minute": 2}}))
    codes = []
    for _ in range(3):
        response, body = await daemon.request("GET", "/internal/health")
        codes.append(response.code)
    assert codes == [200, 200, 429]
    assert response.headers.getRawHeaders(b"retry-after") and response.headers.getRawHeaders(b"x-ratelimit-limit") == [b"2"]
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    for _ in range(3):  # the inference routes have no limit configured
        response, _ = await daemon.post_json(PATH, CHAT)
        assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_concurrency_cap_alone_is_enforced(daemon_factory, fake):
    """max_concurrent_per_client works without any rate limit configured (it used to need one to be on)."""
    from twisted.internet.defer import Deferred

    daemon = await daemon_factory(config_for(fake, server={"rate_limits": {"max_concurrent_per_client": 1}}))
    fake.hold = Deferred()
    first = Deferred.fromCoroutine(daemon.post_json(PATH, {**CHAT, "stream": True}))
    from conftest import eventually

    await eventually(lambda: len(daemon.parts.inflight) == 1, 5, "the first request in flight")
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 429 and json.loads(body)["error"]["code"] == "too_many_concurrent_requests"
    fake.hold.callback(None)
    response, _ = await first
    assert response.code == 200
    response, _ = await daemon.post_json(PATH, CHAT)
    assert response.code == 200
