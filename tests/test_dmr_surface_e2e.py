"""
One DMR made of many (issue 20), end to end against in-repo fake DMRs:
DMR's aliases and Olla's provider-named prefix, the fleet's read-only
management view (with and without admin keys), writes never forwarded,
Olla's translator statistics, a Responses follow-up whose owner died,
and distinct conversations under a model alias spreading.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import pytest_twisted
from conftest import config_for, in_thread

from olladmr.routes import canonical_path

MODEL = "ai/smollm2"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ADMIN_KEY = "admin-secret-key-0123456789"


@pytest.mark.parametrize(
    "given,expected",
    [
        (b"/olla/dmr/v1/chat/completions", b"/olla/dmr/engines/v1/chat/completions"),
        (b"/olla/dmr/v1/models/ai/smollm2", b"/olla/dmr/engines/v1/models/ai/smollm2"),
        (b"/olla/dmr/responses", b"/olla/dmr/engines/v1/responses"),
        (b"/olla/dmr/responses/resp_1/input_items", b"/olla/dmr/engines/v1/responses/resp_1/input_items"),
        (b"/olla/dmr/engines/responses/resp_1", b"/olla/dmr/engines/v1/responses/resp_1"),
        (b"/olla/dmr/rerank", b"/olla/dmr/engines/rerank"),
        (b"/olla/dmr/score", b"/olla/dmr/engines/score"),
        (b"/olla/docker-model-runner/v1/models", b"/olla/dmr/engines/v1/models"),
        (b"/olla/docker-model-runner/api/tags", b"/olla/dmr/api/tags"),
        (b"/olla/docker-model-runnerX/v1/models", b"/olla/docker-model-runnerX/v1/models"),
        (b"/olla/dmr/v1rerank", b"/olla/dmr/v1rerank"),
        (b"/olla/dmr/rerank/x", b"/olla/dmr/rerank/x"),
        (b"/olla/dmr/engines/v1/models", b"/olla/dmr/engines/v1/models"),
        (b"/internal/status", b"/internal/status"),
    ],
)
def test_dmr_aliases_resolve_as_dmr_maps_them(given: bytes, expected: bytes) -> None:
    assert canonical_path(given) == expected


@pytest_twisted.ensureDeferred
async def test_every_alias_answers_like_its_canonical_route(daemon_factory, fakes):
    """The /v1 base URL, the short Responses and rerank paths and Olla's provider-named prefix all serve."""
    daemon = await daemon_factory(config_for(*fakes))
    canonical, body = await daemon.request("GET", "/olla/dmr/engines/v1/models")
    assert canonical.code == 200
    for path in ("/olla/dmr/v1/models", "/olla/docker-model-runner/v1/models",
                 "/olla/docker-model-runner/engines/v1/models"):
        response, aliased = await daemon.request("GET", path)
        assert response.code == 200 and json.loads(aliased) == json.loads(body), path
    for path in ("/olla/dmr/v1/chat/completions", "/olla/docker-model-runner/v1/chat/completions",
                 "/olla/docker-model-runner/engines/v1/chat/completions"):
        response, answer = await daemon.post_json(path, CHAT)
        assert response.code == 200 and json.loads(answer)["choices"], path
        assert response.headers.getRawHeaders(b"x-olla-endpoint"), path
    response, answer = await daemon.post_json("/olla/dmr/rerank", {"model": MODEL, "query": "q", "documents": ["a"]})
    assert response.code == 200 and "results" in json.loads(answer)
    response, answer = await daemon.post_json("/olla/dmr/responses", {"model": MODEL, "input": "hello"})
    created = json.loads(answer)
    assert response.code == 200 and created["id"].startswith("resp")
    for path in (f"/olla/dmr/responses/{created['id']}", f"/olla/dmr/v1/responses/{created['id']}",
                 f"/olla/docker-model-runner/responses/{created['id']}"):
        response, answer = await daemon.request("GET", path)
        assert response.code == 200 and json.loads(answer)["id"] == created["id"], path
    # what reached the fakes: DMR's canonical paths only
    paths = {r.uri for f in fakes for r in f.inference_requests}
    assert paths <= {"/engines/v1/chat/completions", "/engines/rerank", "/engines/v1/responses"}, paths
    response, _ = await daemon.request("GET", "/olla/dmr/v1/rerank")  # DMR has no /v1/rerank either
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_the_management_view_merges_the_fleet(daemon_factory, fakes):
    """/models, /engines/ps, /engines/status, /engines/df and /version answer in DMR's shape, once per model."""
    daemon = await daemon_factory(config_for(*fakes))
    response, body = await daemon.request("GET", "/olla/dmr/models")
    models = json.loads(body)
    assert response.code == 200 and isinstance(models, list) and models
    ids = [m["id"] for m in models]
    assert len(ids) == len(set(ids))  # a model held by every endpoint appears once
    for entry in models:
        assert {"id", "tags", "created", "config"} <= set(entry)
        assert sorted(entry["endpoints"]) == sorted(f.name for f in fakes)
    tag = models[0]["tags"][0]
    response, body = await daemon.request("GET", f"/olla/dmr/models/{tag}")
    one = json.loads(body)
    assert response.code == 200 and one["id"] == models[0]["id"] and len(one["endpoints"]) == len(fakes)
    response, body = await daemon.request("GET", "/olla/dmr/models/ai/nope")
    assert response.code == 404 and json.loads(body)["error"]["code"] == "model_not_found"

    await daemon.post_json("/olla/dmr/engines/v1/chat/completions", CHAT)  # a runner loads somewhere
    response, body = await daemon.request("GET", "/olla/dmr/engines/ps")
    running = json.loads(body)
    assert response.code == 200 and isinstance(running, list)
    loaded = [entry for entry in running if entry["model_name"].startswith(MODEL)]
    assert len(loaded) == 1 and loaded[0]["endpoints"] and {"backend_name", "mode"} <= set(loaded[0])

    response, body = await daemon.request("GET", "/olla/dmr/engines/status")
    status = json.loads(body)
    assert response.code == 200 and all(isinstance(v, str) for v in status.values()) and status

    response, body = await daemon.request("GET", "/olla/dmr/engines/df")
    if response.code == 200:  # (a fake without /engines/df: no endpoint answers usably)
        df = json.loads(body)
        assert {"models_disk_usage", "default_backend_disk_usage"} <= set(df)
    else:
        assert response.code == 503

    response, body = await daemon.request("GET", "/olla/docker-model-runner/models")
    assert response.code == 200 and [m["id"] for m in json.loads(body)] == ids


@pytest_twisted.ensureDeferred
async def test_with_admin_keys_the_management_view_needs_one(daemon_factory, fake):
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    daemon = await daemon_factory(config_for(fake, server={"auth": {"admin_keys": [digest]}}))
    for path in ("/olla/dmr/models", "/olla/dmr/models/ai/smollm2", "/olla/dmr/engines/ps",
                 "/olla/dmr/engines/status", "/olla/dmr/engines/df", "/olla/dmr/version",
                 "/olla/docker-model-runner/models"):
        response, body = await daemon.request("GET", path)
        assert response.code == 401 and json.loads(body)["error"]["code"] == "invalid_admin_key", path
    response, body = await daemon.request("GET", "/olla/dmr/models", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.code == 200 and json.loads(body)
    # inference and the model list stay open (no API keys configured)
    response, _ = await daemon.request("GET", "/olla/dmr/v1/models")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_without_a_routable_endpoint_the_view_is_a_503(daemon_factory, fake):
    daemon = await daemon_factory(config_for(fake))
    daemon.parts.health.mark_offline(daemon.parts.fleet.get(fake.name), "test")
    response, body = await daemon.request("GET", "/olla/dmr/models")
    assert response.code == 503 and json.loads(body)["error"]["code"] == "no_endpoints_available"
    assert response.headers.getRawHeaders(b"retry-after")


@pytest_twisted.ensureDeferred
async def test_translator_stats_are_an_honest_empty_document(daemon_factory, fake):
    daemon = await daemon_factory(config_for(fake))
    response, body = await daemon.request("GET", "/internal/stats/translators")
    document = json.loads(body)
    assert response.code == 200 and document["translators"] == [] and document["timestamp"].endswith("Z")
    assert document["summary"]["total_requests"] == 0 and document["summary"]["total_translators"] == 0


@pytest_twisted.ensureDeferred
async def test_a_follow_up_whose_owner_refuses_is_a_503_not_a_502(daemon_factory, fakes):
    """The owner died (not yet marked down): its follow-up gets 503 response_endpoint_unavailable + Retry-After."""
    daemon = await daemon_factory(config_for(*fakes, proxy={"load_balancer": "round-robin"}))
    client = daemon.openai()
    first = await in_thread(client.responses.create, model=MODEL, input="hello")
    (owner,) = [f for f in fakes if first.id in f.stored_responses]
    await owner.stop()
    before = {f.name: len(f.inference_requests) for f in fakes}
    response, body = await daemon.post_json(
        "/olla/dmr/engines/v1/responses", {"model": MODEL, "input": "next", "previous_response_id": first.id}
    )
    error = json.loads(body)["error"]
    assert response.code == 503 and error["code"] == "response_endpoint_unavailable", body
    assert first.id in error["message"] and owner.name in error["message"]
    assert response.headers.getRawHeaders(b"retry-after")
    assert {f.name: len(f.inference_requests) for f in fakes} == before  # never sent to another endpoint
    await owner.start()  # (for the fixture's stop)


@pytest_twisted.ensureDeferred
async def test_distinct_conversations_under_an_alias_spread(daemon_factory, fakes):
    """An alias over two endpoints (a different real model on each): 12 distinct conversations use both."""
    a, b = fakes[0], fakes[1]
    a.models = ["ai/smollm2"]
    b.models = ["ai/llama3.2"]
    config = config_for(a, b, proxy={"load_balancer": "round-robin"}, endpoint0={"priority": 100}, endpoint1={"priority": 100},
                        model_aliases={"my-model": ["ai/smollm2", "ai/llama3.2"]})
    daemon = await daemon_factory(config)
    for fake, model in ((a, "ai/smollm2"), (b, "ai/llama3.2")):  # each endpoint has its real model loaded
        response, _ = await daemon.post_json("/olla/dmr/engines/v1/chat/completions", {**CHAT, "model": model})
        assert response.code == 200 and response.headers.getRawHeaders(b"x-olla-endpoint")[0].decode() == fake.name
    for state in daemon.parts.fleet:
        await daemon.parts.health.check(state)  # (its /engines/ps read now)
    served: dict[str, int] = {}
    for index in range(12):
        payload: dict[str, Any] = {
            "model": "my-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},  # shared, and short
                         {"role": "user", "content": f"task {index}"}],
        }
        response, _ = await daemon.post_json("/olla/dmr/engines/v1/chat/completions", payload)
        assert response.code == 200
        name = response.headers.getRawHeaders(b"x-olla-endpoint")[0].decode()
        served[name] = served.get(name, 0) + 1
    assert set(served) == {a.name, b.name} and min(served.values()) >= 3, served


@pytest_twisted.ensureDeferred
async def test_every_proxied_answer_says_how_long_olladmr_itself_took(daemon_factory, fake):
    """X-Olla-Overhead-Ms: olladmr's own time, apart from the upstream's (a slow upstream does not count)."""
    fake.header_delay = 0.25
    daemon = await daemon_factory(config_for(fake))
    for path, payload in (("/olla/dmr/engines/v1/chat/completions", CHAT),
                          ("/olla/dmr/engines/v1/chat/completions", {**CHAT, "stream": True})):
        response, _ = await daemon.post_json(path, payload)
        assert response.code == 200
        overhead = float(response.headers.getRawHeaders(b"x-olla-overhead-ms")[0])
        total = int(response.headers.getRawHeaders(b"x-olla-response-time")[0].rstrip(b"ms"))
        assert total >= 250 and 0 <= overhead < 100, (overhead, total)
    response, _ = await daemon.request("GET", "/olla/dmr/engines/v1/models/ai/smollm2")
    assert response.code == 200 and float(response.headers.getRawHeaders(b"x-olla-overhead-ms")[0]) >= 0
    response, _ = await daemon.post_json("/olla/dmr/engines/v1/chat/completions", {**CHAT, "model": "ai/nope"})
    assert response.code == 404 and not response.headers.hasHeader(b"x-olla-overhead-ms")  # olladmr's own answer
