"""The whole DMR API through olladmr, end to end: every route answers as the fake DMR does directly."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import pytest_twisted
from conftest import Daemon, config_for
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from fakedmr import FakeDMR

ENGINES = ("/engines", "/engines/llama.cpp", "/engines/vllm")
MODEL = "ai/smollm2"
POSTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/messages", {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": "Hello there"}]}),
    ("/v1/messages/count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]}),
    ("/v1/responses", {"model": MODEL, "input": "Hello there"}),
    ("/rerank", {"model": MODEL, "query": "docker", "documents": ["a whale", "a docker container", "a ship"]}),
    ("/score", {"model": MODEL, "text_1": "docker", "text_2": "a docker container"}),
    ("/v1/images/generations", {"model": MODEL, "prompt": "a whale"}),
]
_VOLATILE = {"id", "created", "created_at", "system_fingerprint"}
_IDS = re.compile(r"\b(msg|resp|chatcmpl|rerank|score)[-_][A-Za-z0-9]+")


def masked(value: Any) -> Any:
    """``value`` with ids and timestamps (different on every call) replaced by placeholders."""
    if isinstance(value, dict):
        return {k: "<volatile>" if k in _VOLATILE else masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    if isinstance(value, str):
        return _IDS.sub(r"\1_<id>", value)
    return value


def shape(body: bytes, content_type: str) -> Any:
    """What must be equal between a direct and a proxied answer: the masked JSON, or the SSE event types in order."""
    if content_type.startswith("text/event-stream"):
        events = []
        for block in body.decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if lines:
                events.append((lines.get("event"), masked(json.loads(lines["data"])) if "data" in lines else None))
        return events
    try:
        return masked(json.loads(body))
    except ValueError:
        return body


async def direct(fake: FakeDMR, method: str, path: str, payload: Any = None) -> tuple[Any, bytes]:
    """The same request straight to the fake DMR."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        from twisted.web.client import FileBodyProducer
        import io

        body = FileBodyProducer(io.BytesIO(json.dumps(payload).encode())) if payload is not None else None
        headers = Headers({b"content-type": [b"application/json"]})
        response = await Agent(reactor, pool=pool).request(method.encode(), (fake.url + path).encode(), headers, body)
        return response, await readBody(response)
    finally:
        await pool.closeCachedConnections()


def content_type(response: Any) -> str:
    return (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()


async def same_answer(daemon: Daemon, fake: FakeDMR, method: str, path: str, payload: Any = None) -> Any:
    """Send ``method path`` direct and through olladmr (under /olla/dmr); assert status, type and shape are equal."""
    want, want_body = await direct(fake, method, path, payload)
    if payload is None:
        got, got_body = await daemon.request(method, "/olla/dmr" + path)
    else:
        got, got_body = await daemon.post_json("/olla/dmr" + path, payload)
    assert got.code == want.code, (path, got_body[:300])
    assert content_type(got) == content_type(want), path
    assert shape(got_body, content_type(got)) == shape(want_body, content_type(want)), path
    assert got.headers.getRawHeaders(b"x-olla-endpoint") == [fake.name.encode()], path
    return got, got_body


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("engine", ENGINES)
async def test_every_model_routed_post_answers_like_dmr(daemon_factory, fake, engine):
    """Messages, count_tokens, responses, rerank, score and images: same status, type and body as DMR, plain and streamed."""
    daemon = await daemon_factory(config_for(fake))
    for suffix, payload in POSTS:
        await same_answer(daemon, fake, "POST", engine + suffix, payload)
    for suffix, payload in POSTS[:1] + POSTS[2:3]:  # the two that stream
        got, body = await same_answer(daemon, fake, "POST", engine + suffix, {**payload, "stream": True})
        assert content_type(got).startswith("text/event-stream") and got.headers.getRawHeaders(b"x-accel-buffering")
    assert [r.uri for r in fake.inference_requests if r.uri.endswith("/rerank")][-2:] == [engine + "/rerank"] * 2


@pytest_twisted.ensureDeferred
async def test_anthropic_prefix_and_model_lookup_answer_like_dmr(daemon_factory, fake):
    """DMR's /anthropic prefix and GET /engines/v1/models/{ns}/{name} pass through; names with slashes work."""
    daemon = await daemon_factory(config_for(fake))
    await same_answer(daemon, fake, "POST", "/anthropic/v1/messages", POSTS[0][1])
    await same_answer(daemon, fake, "POST", "/anthropic/v1/messages/count_tokens", POSTS[1][1])
    for engine in ENGINES:
        got, body = await same_answer(daemon, fake, "GET", f"{engine}/v1/models/ai/smollm2")
        assert json.loads(body)["id"].startswith("ai/smollm2")
    got, body = await same_answer(daemon, fake, "GET", "/engines/v1/models/SmolLM2")  # DMR's normalisation
    assert got.code == 200


@pytest_twisted.ensureDeferred
async def test_model_lookup_of_an_unlisted_model_is_a_404_in_openai_shape(daemon_factory, fake):
    """No endpoint lists the model: olladmr answers 404 itself, as an OpenAI error naming what is available."""
    daemon = await daemon_factory(config_for(fake))
    response, body = await daemon.request("GET", "/olla/dmr/engines/v1/models/ai/nope")
    error = json.loads(body)["error"]
    assert response.code == 404 and error["code"] == "model_not_found" and "ai/smollm2" in error["message"]
    assert not [r for r in fake.requests if "nope" in r.uri]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("GET", "/olla/dmr/engines/v1/messages", b"POST"),
        ("PUT", "/olla/dmr/engines/vllm/rerank", b"POST"),
        ("GET", "/olla/dmr/anthropic/v1/messages/count_tokens", b"POST"),
        ("PUT", "/olla/dmr/engines/v1/responses/resp_abc", b"GET, DELETE, HEAD"),
        ("DELETE", "/olla/dmr/engines/v1/responses/resp_abc/input_items", b"GET, HEAD"),
        ("POST", "/olla/dmr/engines/v1/models/ai/smollm2", b"GET, HEAD"),
        ("DELETE", "/olla/anthropic/v1/models", b"GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_with_allow(daemon_factory, fake, method, path, allow):
    """Every new route refuses other methods with 405 and the Allow header, in the route's error shape."""
    daemon = await daemon_factory(config_for(fake))
    response, body = await daemon.request(method, path)
    assert response.code == 405 and response.headers.getRawHeaders(b"allow") == [allow]
    document = json.loads(body)
    if "/messages" in path or path.startswith("/olla/anthropic/"):
        assert document["type"] == "error" and document["error"]["type"] == "invalid_request_error"
    else:
        assert document["error"]["code"] == "method_not_allowed"
    assert not fake.inference_requests


@pytest_twisted.ensureDeferred
async def test_management_routes_stay_unforwarded(daemon_factory, fake):
    """DMR's model-management writes are never forwarded: 403 from olladmr, nothing reaches the upstream."""
    daemon = await daemon_factory(config_for(fake))
    for method, path in (("POST", "/olla/dmr/models/create"), ("POST", "/olla/dmr/engines/_configure"),
                         ("POST", "/olla/dmr/engines/llama.cpp/_configure"), ("POST", "/olla/dmr/engines/unload"),
                         ("DELETE", "/olla/dmr/models/ai/smollm2"), ("POST", "/olla/dmr/models/ai/smollm2/tag"),
                         ("POST", "/olla/dmr/engines/install-backend"), ("GET", "/olla/dmr/engines/requests"),
                         ("POST", "/olla/dmr/api/pull"), ("DELETE", "/olla/dmr/api/delete"),
                         ("POST", "/olla/docker-model-runner/models/create")):
        response, body = await daemon.request(method, path)
        document = json.loads(body)
        assert response.code == 403, (path, body)
        code = document["error"] if "/api/" in path else document["error"]["code"]
        assert code == "management_not_forwarded" or "does not forward" in code, path
    assert not [r for r in fake.requests if r.uri not in ("/engines/v1/models", "/engines/ps")]  # health checks only


@pytest_twisted.ensureDeferred
async def test_olla_client_routes(daemon_factory, fake):
    """Olla's provider-agnostic routes serve the DMR fleet with the same handlers, headers and shapes."""
    daemon = await daemon_factory(config_for(fake))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for base in ("/olla/proxy/v1", "/olla/openai/v1"):
        response, body = await daemon.post_json(f"{base}/chat/completions", chat)
        assert response.code == 200 and json.loads(body)["object"] == "chat.completion"
        assert response.headers.getRawHeaders(b"x-olla-endpoint") == [b"fake-a"]
        response, body = await daemon.request("GET", f"{base}/models")
        assert {m["id"] for m in json.loads(body)["data"]} >= {"ai/smollm2", "ai/llama3.2"}
    assert fake.inference_requests[-1].uri == "/engines/v1/chat/completions"
    response, body = await daemon.request("GET", "/olla/anthropic/v1/models")
    listing = json.loads(body)
    assert response.code == 200 and listing["has_more"] is False
    assert listing["first_id"] == listing["data"][0]["id"] and listing["last_id"] == listing["data"][-1]["id"]
    assert all(m["type"] == "model" and m["display_name"] and m["created_at"].endswith("Z") for m in listing["data"])
    response, body = await daemon.post_json("/olla/anthropic/v1/messages", POSTS[0][1])
    assert response.code == 200 and json.loads(body)["type"] == "message"
    assert response.headers.getRawHeaders(b"x-olla-mode") == [b"passthrough"]
    assert fake.inference_requests[-1].uri == "/anthropic/v1/messages"  # passed natively, not translated
    response, body = await daemon.request("GET", "/olla/models/ai/smollm2")
    entry = json.loads(body)
    assert response.code == 200 and entry["key"] == "ai/smollm2:latest" and entry["endpoints"][0]["name"] == "fake-a"
    response, body = await daemon.request("GET", "/olla/models/smollm2")  # any name DMR accepts
    assert response.code == 200 and json.loads(body)["key"] == "ai/smollm2:latest"
    response, body = await daemon.request("GET", "/olla/models/ai/nope")
    assert response.code == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    response, body = await daemon.request("GET", "/internal/stats/models")
    stats = json.loads(body)
    assert response.code == 200 and stats["summary"]["total_requests"] >= 3
    assert any(m["name"] == "ai/smollm2:latest" and m["total_requests"] >= 2 for m in stats["models"])
    response, body = await daemon.request("GET", "/internal/process")
    process = json.loads(body)
    assert response.code == 200 and process["memory"]["rss_bytes"] > 0 and process["threads"]["count"] >= 1
    assert process["runtime"]["twisted"] and "collections" in process["garbage_collection"]


@pytest_twisted.ensureDeferred
async def test_model_alias_routes_and_rewrites_only_the_model(daemon_factory, fakes):
    """An alias goes to an endpoint that lists one of its models; only "model" changes in the body upstream."""
    fakes[0].models = ["ai/llama3.2"]
    fakes[1].models = ["ai/smollm2:latest"]
    fakes[2].models = ["ai/qwen3"]
    aliases = {"model_aliases": {"gpt-4o-mini": ["ai/smollm2", "ai/llama3.2"]}}
    daemon = await daemon_factory(config_for(*fakes, **aliases))
    raw = b'{"model": "gpt-4o-mini",  "messages": [{"role": "user", "content": "caf\\u00e9 \xe2\x98\x95"}], "n": 1}'
    response, body = await daemon.request(
        "POST", "/olla/dmr/engines/v1/chat/completions", raw, {"content-type": "application/json"}
    )
    assert response.code == 200
    served = response.headers.getRawHeaders(b"x-olla-endpoint")[0].decode()
    assert served in ("fake-0", "fake-1")
    real = {"fake-0": "ai/llama3.2", "fake-1": "ai/smollm2:latest"}[served]
    assert response.headers.getRawHeaders(b"x-olla-model") == [real.encode()]
    assert response.headers.getRawHeaders(b"x-olla-model-alias") == [b"gpt-4o-mini"]
    (upstream,) = [r for f in fakes for r in f.inference_requests]
    assert upstream.body == raw.replace(b'"gpt-4o-mini"', json.dumps(real).encode())  # every other byte as sent
    assert int(upstream.headers["content-length"][0]) == len(upstream.body)
    response, body = await daemon.request("GET", "/olla/dmr/engines/v1/models")
    listed = {m["id"]: m for m in json.loads(body)["data"]}
    assert listed["gpt-4o-mini"]["owned_by"] == "docker" and "ai/qwen3" in listed
    response, body = await daemon.request("GET", "/olla/models/gpt-4o-mini")
    assert response.code == 200 and json.loads(body)["alias_of"] == ["ai/smollm2", "ai/llama3.2"]


@pytest_twisted.ensureDeferred
async def test_olla_style_integration_checklist(daemon_factory, fakes):
    """Olla's own acceptance checks, against olladmr's client routes: parallel ids, streams, bad bodies, shapes."""
    from twisted.internet.defer import Deferred, gatherResults

    same = {f"endpoint{i}": {"priority": 50} for i in range(3)}  # one tier: sessions spread over all three
    daemon = await daemon_factory(config_for(*fakes, proxy={"load_balancer": "round-robin"}, **same))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for fake in fakes:  # the model loaded everywhere (else loaded-model awareness rightly keeps traffic on warm ones)
        await direct(fake, "POST", "/engines/v1/chat/completions", chat)
    for endpoint in daemon.parts.fleet:
        await daemon.parts.health.poll_loaded(endpoint)
        assert endpoint.model_loaded("ai/smollm2:latest") is True
    # 1 + 14: X-Olla-* headers on every answer; 50 parallel requests all 200 with unique request ids
    answers = await gatherResults(
        [
            Deferred.fromCoroutine(
                daemon.post_json("/olla/proxy/v1/chat/completions", chat, {"x-olla-session-id": f"session-{i}"})
            )
            for i in range(50)
        ]
    )
    ids = set()
    for response, _ in answers:
        assert response.code == 200
        for name in (b"x-olla-endpoint", b"x-olla-model", b"x-olla-backend-type", b"x-olla-response-time"):
            assert response.headers.getRawHeaders(name), name
        ids.add(response.headers.getRawHeaders(b"x-olla-request-id")[0])
    assert len(ids) == 50
    assert len({r.headers.getRawHeaders(b"x-olla-endpoint")[0] for r, _ in answers}) == 3  # 50 sessions spread
    assert {r.headers.getRawHeaders(b"x-olla-sticky-key-source")[0] for r, _ in answers} == {b"session_header"}
    # 19 + 20: a stream ends with [DONE] and carries the headers
    response, body = await daemon.post_json("/olla/openai/v1/chat/completions", {**chat, "stream": True})
    assert body.endswith(b"data: [DONE]\n\n") and response.headers.getRawHeaders(b"x-olla-endpoint")
    # 22 + 28: malformed bodies are 4xx, never 5xx or a hang, in each route's shape
    for path in ("/olla/proxy/v1/chat/completions", "/olla/anthropic/v1/messages"):
        response, body = await daemon.request("POST", path, b'{"model":', {"content-type": "application/json"})
        assert 400 <= response.code < 500
        document = json.loads(body)
        assert (document["type"] == "error") if "anthropic" in path else ("error" in document)
    # 25: Anthropic stream event order
    response, body = await daemon.post_json(
        "/olla/anthropic/v1/messages", {**POSTS[0][1], "stream": True}
    )
    events = [line[len("event: "):] for line in body.decode().splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
    assert events.index("content_block_start") < events.index("content_block_stop") < events.index("message_delta")
    # 27: count_tokens
    response, body = await daemon.post_json("/olla/anthropic/v1/messages/count_tokens", POSTS[1][1])
    assert response.code == 200 and json.loads(body)["input_tokens"] > 0
    # 31 + 32: the ops routes never 5xx; an unknown model id is 404
    for path in ("/internal/health", "/internal/status", "/internal/status/endpoints", "/internal/status/models",
                 "/internal/stats/models", "/internal/process", "/version", "/olla/models"):
        response, _ = await daemon.request("GET", path)
        assert response.code == 200, path
    response, _ = await daemon.request("GET", "/olla/models/ai/does-not-exist")
    assert response.code == 404
