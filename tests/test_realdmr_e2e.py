"""
olladmr in front of two real DMRs (the bundle: ``ai/tiny`` on llama.cpp), with
the official clients (issue 20): the ``ollama`` client's list, ps, chat and
generate (plain and streamed) and its error on an unknown model; ``/api/show``,
``/api/tags`` and a chat byte for byte direct vs proxied; DMR's ``/v1`` base
URL with the ``openai`` SDK; the short Responses path; the fleet's
management view; writes refused and never forwarded.  Slow: skipped without
the bundle.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any, AsyncIterator

import ollama
import pytest
import pytest_twisted
from conftest import Daemon, config_for, raw_request, in_thread
from realdmr import AVAILABLE, MISSING, RealDMRs
from twisted.internet import reactor

from olladmr import build as assembly

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not AVAILABLE, reason=MISSING)]

MODEL = "ai/tiny"
TAG = "docker.io/ai/tiny:latest"
OPTIONS = {"temperature": 0, "seed": 7, "num_predict": 6}
_TIME = re.compile(rb'"(created_at|expires_at|modified_at)":"[^"]*"')


@pytest_twisted.async_yield_fixture
async def fleet(tmp_path: Any) -> AsyncIterator[tuple[RealDMRs, Daemon]]:
    dmrs = RealDMRs(2, str(tmp_path))
    parts = None
    try:
        await dmrs.start()
        endpoints = [SimpleNamespace(url=url, name=f"dmr-{i}") for i, url in enumerate(dmrs.urls)]
        config = config_for(*endpoints, endpoint0={"priority": 100}, endpoint1={"priority": 100})
        parts = assembly.build(config, reactor=reactor, listen="tcp:0:interface=127.0.0.1")
        parts.service.startService()
        await parts.service.serving
        yield dmrs, Daemon(parts)
    finally:
        if parts is not None:
            await parts.service.stopService()
        await dmrs.stop()


def masked(body: bytes) -> bytes:
    return _TIME.sub(rb'"\1":"<time>"', body)


@pytest_twisted.ensureDeferred
async def test_the_ollama_client_against_two_real_dmrs(fleet):
    dmrs, daemon = fleet
    client = ollama.Client(host=daemon.base + "/olla/dmr", timeout=60)
    listed = await in_thread(client.list)
    names = [m.model for m in listed.models]
    assert names.count(TAG) == 1, names  # held by both DMRs, listed once
    answer = await in_thread(client.chat, model=MODEL, messages=[{"role": "user", "content": "hello"}],
                             options=OPTIONS, stream=False)
    assert answer.done and answer.message.role == "assistant" and answer.message.content
    parts = await in_thread(lambda: list(client.chat(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                                     options=OPTIONS, stream=True)))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == answer.message.content  # temperature 0: the same words
    generated = await in_thread(client.generate, model=MODEL, prompt="once upon", options=OPTIONS, stream=False)
    assert generated.done and generated.response
    pieces = await in_thread(lambda: list(client.generate(model=MODEL, prompt="once upon", options=OPTIONS,
                                                          stream=True)))
    assert pieces[-1].done and "".join(p.response or "" for p in pieces) == generated.response
    running = await in_thread(client.ps)
    assert [m.model for m in running.models].count(TAG) == 1
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(client.chat, model="ai/nope", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert caught.value.status_code == 404 and "ai/nope" in caught.value.error


@pytest_twisted.ensureDeferred
async def test_ollama_routes_byte_for_byte_direct_and_proxied(fleet):
    dmrs, daemon = fleet
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": OPTIONS, "stream": False}
    proxied, proxied_body = await raw_request(daemon.base + "/olla/dmr/api/chat", "POST", chat)
    assert proxied.code == 200
    served = proxied.headers.getRawHeaders(b"x-olla-endpoint")[0].decode()
    url = dmrs.urls[int(served.split("-")[1])]
    direct, direct_body = await raw_request(url + "/api/chat", "POST", chat)
    assert masked(proxied_body) == masked(direct_body)
    assert proxied.headers.getRawHeaders(b"content-type") == direct.headers.getRawHeaders(b"content-type")
    for path, payload in (("/api/show", {"model": MODEL}), ("/api/show", {"model": "ai/nope"})):
        direct, direct_body = await raw_request(dmrs.urls[0] + path, "POST", payload)
        proxied, proxied_body = await raw_request(daemon.base + "/olla/dmr" + path, "POST", payload)
        if direct.code == 200:
            assert proxied.code == 200 and proxied_body == direct_body, path
        else:  # an unknown model: olladmr's own 404, in Ollama's shape
            assert proxied.code == 404 and "ai/nope" in json.loads(proxied_body)["error"]
    direct, direct_body = await raw_request(dmrs.urls[0] + "/api/tags")
    proxied, proxied_body = await raw_request(daemon.base + "/olla/dmr/api/tags")
    ours = json.loads(proxied_body)["models"]
    assert all(sorted(entry.pop("endpoints")) == ["dmr-0", "dmr-1"] for entry in ours)
    assert sorted(ours, key=lambda m: m["name"]) == sorted(json.loads(direct_body)["models"], key=lambda m: m["name"])


@pytest_twisted.ensureDeferred
async def test_the_v1_base_url_responses_and_the_management_view(fleet):
    dmrs, daemon = fleet
    import openai

    sdk = openai.OpenAI(base_url=daemon.base + "/olla/dmr/v1", api_key="unused", max_retries=0, timeout=60)
    models = await in_thread(sdk.models.list)
    assert TAG in [m.id for m in models.data]
    completion = await in_thread(sdk.chat.completions.create, model=MODEL, max_tokens=4,
                                 messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content is not None
    response, body = await daemon.post_json("/olla/dmr/responses", {"model": MODEL, "input": "hi",
                                                                    "max_output_tokens": 4})
    created = json.loads(body)
    assert response.code == 200 and created["id"].startswith("resp"), body
    response, body = await daemon.request("GET", f"/olla/dmr/v1/responses/{created['id']}")
    assert response.code == 200 and json.loads(body)["id"] == created["id"]

    direct, direct_body = await raw_request(dmrs.urls[0] + "/models")
    response, body = await daemon.request("GET", "/olla/dmr/models")
    ours = json.loads(body)
    assert response.code == 200 and {m["id"] for m in ours} == {m["id"] for m in json.loads(direct_body)}
    assert all(sorted(m["endpoints"]) == ["dmr-0", "dmr-1"] for m in ours)
    response, body = await daemon.request("GET", f"/olla/dmr/models/{TAG}")
    assert response.code == 200 and TAG in json.loads(body)["tags"]
    for path in ("/engines/ps", "/engines/status", "/engines/df", "/version"):
        direct, direct_body = await raw_request(dmrs.urls[0] + path)
        response, body = await daemon.request("GET", "/olla/dmr" + path)
        assert response.code == 200 == direct.code, path
        mine, theirs = json.loads(body), json.loads(direct_body)
        assert type(mine) is type(theirs), path
        if isinstance(theirs, dict) and path != "/engines/status":
            assert set(theirs) <= set(mine), path
    response, body = await daemon.request("GET", "/olla/dmr/engines/status")
    assert json.loads(body)["llama.cpp"].startswith("Running")
    for method, path in (("POST", "/olla/dmr/engines/unload"), ("POST", "/olla/dmr/models/create"),
                         ("DELETE", f"/olla/dmr/models/{TAG}"), ("POST", "/olla/dmr/api/pull")):
        response, _ = await daemon.request(method, path, b"{}")
        assert response.code == 403, path
    response, body = await daemon.request("GET", f"/olla/dmr/models/{TAG}")
    assert response.code == 200  # still there: nothing was forwarded
