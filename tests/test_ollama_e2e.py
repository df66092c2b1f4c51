"""
DMR's Ollama API through olladmr (issue 20), with the official ``ollama``
Python client, against in-repo fake DMRs: list, ps, show, chat and generate
(plain and streamed), olladmr's own errors in Ollama's shape, writes that are
never forwarded, a cut NDJSON stream, a client that leaves mid-stream, a
client that stops reading, and each route byte for byte direct vs proxied.
(``test_ollama_realdmr.py`` runs the same client against real DMRs.)
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import ollama
import pytest
import pytest_twisted
from conftest import Daemon, config_for, raw_request, eventually, in_thread
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol


MODEL = "ai/smollm2"
API_KEY = "sk-ollama-test-0123456789"
_TIME = re.compile(rb'"(created_at|expires_at|modified_at)":"[^"]*"')


def client(daemon: Daemon, **kwargs: Any) -> ollama.Client:
    return ollama.Client(host=daemon.base + "/olla/dmr", timeout=20, **kwargs)


def masked(body: bytes) -> bytes:
    return _TIME.sub(rb'"\1":"<time>"', body)


@pytest_twisted.ensureDeferred
async def test_the_ollama_client_lists_shows_chats_and_generates(daemon_factory, fakes):
    daemon = await daemon_factory(config_for(*fakes))
    c = client(daemon)
    listed = await in_thread(c.list)
    names = sorted(m.model for m in listed.models)
    assert names and len(names) == len(set(names))  # each tag once, though every fake lists it
    answer = await in_thread(c.chat, model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=False)
    assert answer.message.role == "assistant" and answer.message.content == "Hello, world!" and answer.done
    parts = await in_thread(lambda: list(c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                stream=True)))
    assert "".join(p.message.content for p in parts) == "Hello, world!" and parts[-1].done
    assert not any(p.done for p in parts[:-1])
    generated = await in_thread(c.generate, model=MODEL, prompt="once upon", stream=False)
    assert generated.response == "Hello, world!" and generated.done
    pieces = await in_thread(lambda: list(c.generate(model=MODEL, prompt="once upon", stream=True)))
    assert "".join(p.response or "" for p in pieces) == "Hello, world!" and pieces[-1].done
    running = await in_thread(c.ps)
    (entry,) = [m for m in running.models if m.model.startswith(MODEL)]
    # DMR's /api/show answers only "details", which the ollama client's show() rejects: over plain HTTP
    response, body = await raw_request(daemon.base + "/olla/dmr/api/show", "POST", {"model": MODEL})
    assert response.code == 200 and set(json.loads(body)) == {"details"}
    response, body = await raw_request(daemon.base + "/olla/dmr/api/version")
    assert response.code == 200 and json.loads(body)["version"]


@pytest_twisted.ensureDeferred
async def test_the_same_bytes_direct_and_through_olladmr(daemon_factory, fake):
    """Chat, generate (plain and streamed) and show: byte for byte as the DMR sent them (timestamps masked);
    tags and ps are the DMR's entries plus the endpoints that hold each."""
    daemon = await daemon_factory(config_for(fake))
    for path, payload in (
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
        ("/api/generate", {"model": MODEL, "prompt": "hi"}),
        ("/api/show", {"model": MODEL}),
    ):
        direct, direct_body = await raw_request(fake.url + path, "POST", payload)
        proxied, proxied_body = await raw_request(daemon.base + "/olla/dmr" + path, "POST", payload)
        assert proxied.code == direct.code, path
        assert masked(proxied_body) == masked(direct_body), (path, payload)
        assert proxied.headers.getRawHeaders(b"content-type") == direct.headers.getRawHeaders(b"content-type")
    for path in ("/api/tags", "/api/ps"):
        direct, direct_body = await raw_request(fake.url + path)
        proxied, proxied_body = await raw_request(daemon.base + "/olla/dmr" + path)
        ours = json.loads(proxied_body)["models"]
        assert all(entry.pop("endpoints") == [fake.name] for entry in ours)
        assert ours == json.loads(direct_body)["models"], path


@pytest_twisted.ensureDeferred
async def test_olladmr_errors_are_ollama_shaped(daemon_factory, fake):
    """Unknown model, missing model, bad JSON, refused writes, a wrong method: {"error": "..."} the client raises."""
    daemon = await daemon_factory(config_for(fake))
    c = client(daemon)
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(c.chat, model="ai/nope", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert caught.value.status_code == 404 and "ai/nope" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(lambda: list(c.chat(model="ai/nope", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)))
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(c.pull, "ai/smollm2")
    assert caught.value.status_code == 403 and "does not forward" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(c.delete, "ai/smollm2")
    assert caught.value.status_code == 403
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(c.generate, model=MODEL, prompt="", keep_alive=0)  # (on DMR: unloads the model)
    assert caught.value.status_code == 403 and "unloads" in caught.value.error
    for path, body, status in (("/api/chat", b"{not json", 400), ("/api/chat", b'{"messages": []}', 400),
                               ("/api/embed", b"{}", 404)):
        response, data = await daemon.request("POST", "/olla/dmr" + path, body, {"content-type": "application/json"})
        assert response.code == status and isinstance(json.loads(data)["error"], str), path
    response, data = await daemon.request("GET", "/olla/dmr/api/chat")
    assert response.code == 405 and isinstance(json.loads(data)["error"], str)
    assert not [r for r in fake.inference_requests if r.uri != "/api/chat"]  # nothing refused was forwarded
    assert all(json.loads(r.body).get("model") == "ai/nope" for r in fake.inference_requests)


@pytest_twisted.ensureDeferred
async def test_api_keys_and_rate_limits_in_ollama_shape(daemon_factory, fake):
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    daemon = await daemon_factory(config_for(fake, server={
        "auth": {"api_keys": [digest]},
        "rate_limits": {"per_ip_requests_per_minute": 2, "burst_size": 2},
    }))
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(client(daemon).list)
    assert caught.value.status_code == 401 and "key" in caught.value.error.lower()
    keyed = client(daemon, headers={"authorization": f"Bearer {API_KEY}"})
    statuses = []
    for _ in range(4):
        try:
            await in_thread(keyed.list)
            statuses.append(200)
        except ollama.ResponseError as error:
            statuses.append(error.status_code)
            assert "rate" in error.error.lower()
    assert statuses[0] == 200 and 429 in statuses


@pytest_twisted.ensureDeferred
async def test_a_cut_ndjson_stream_ends_with_an_error_line_never_done(daemon_factory, fake):
    daemon = await daemon_factory(config_for(fake))
    fake.ollama_truncate_after = 2
    response, body = await daemon.post_json("/olla/dmr/api/chat", {"model": MODEL, "messages": []})
    assert response.code == 200 and body.endswith(b"\n")
    lines = [json.loads(line) for line in body.split(b"\n")[:-1]]
    assert len(lines) == 3 and not any(line.get("done") for line in lines)
    assert "error" in lines[-1] and isinstance(lines[-1]["error"], str)
    with pytest.raises(ollama.ResponseError):  # the client raises on the error line
        await in_thread(lambda: list(client(daemon).chat(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                         stream=True)))


class Reader(Protocol):
    """Reads an HTTP response off a raw socket; can stop reading, or leave."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.first: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b'"done":false' in self.data and not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


def ndjson_request(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return (b"POST /olla/dmr/api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_stream_cancels_the_upstream(daemon_factory, fake):
    daemon = await daemon_factory(config_for(fake))
    fake.hold = Deferred()  # the stream sends its first line, then waits
    reader = Reader(ndjson_request({"model": MODEL, "messages": []}))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), reader)
    await reader.first
    reader.transport.abortConnection()
    await eventually(lambda: fake.disconnects == 1, 10, "the fake to see olladmr close the upstream request")
    await eventually(lambda: not daemon.parts.inflight, 10, "the exchange to end")


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_relay(daemon_factory, fake):
    """20,000 lines (about 2 MB) to a client that reads nothing: olladmr holds little of it."""
    daemon = await daemon_factory(config_for(fake))
    fake.tokens = ["word "] * 20_000
    reader = Reader(ndjson_request({"model": MODEL, "messages": []}))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), reader)
    await reader.first
    reader.transport.pauseProducing()
    await eventually(lambda: bool(daemon.parts.inflight), 5, "the exchange")
    (exchange,) = daemon.parts.inflight
    transport = exchange.request.channel.transport
    await eventually(lambda: transport.producerPaused or exchange.request.finished, 10, "backpressure")
    buffered = len(transport.dataBuffer) + transport._tempDataLen
    assert buffered < 1024 * 1024, buffered
    reader.transport.resumeProducing()
    await reader.closed
    assert b'"done":true}\n' in reader.data and reader.data.count(b'"done":false') > 19_900  # (chunk heads cut some)
