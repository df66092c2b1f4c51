"""Tests for the fake DMR that olladmr's end-to-end tests run against."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IResponse

from fakedmr import FakeDMR

CHAT = "/engines/v1/chat/completions"


@pytest_twisted.async_yield_fixture
async def fake() -> AsyncIterator[FakeDMR]:
    """A fresh fake DMR (shadows conftest's, so these tests need only fakedmr)."""
    server = FakeDMR()
    await server.start()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def http() -> AsyncIterator[HTTPClient]:
    """A treq client whose connections close after each response."""
    yield HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    await deferLater(reactor, 0)  # a reactor turn, so closing client sockets finish closing


async def call(http: HTTPClient, fake: FakeDMR, method: str, path: str, body: Any = None) -> tuple[IResponse, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = await http.request(method, fake.url + path, data=data)
    return response, await response.content()


def header(response: IResponse, name: str) -> list[str] | None:
    return response.headers.getRawHeaders(name)


class EventReader(Protocol):
    """Collects SSE events as they arrive; ``done`` fires with whether the body ended cleanly."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[str] = []
        self.first: Deferred[None] = Deferred()
        self.done: Deferred[bool] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        *complete, self.buffer = (self.buffer + data).split(b"\n\n")
        self.events += [event.removeprefix(b"data: ").decode() for event in complete]
        if self.events and not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback(reason.check(ResponseDone) is not None)


async def open_stream(http: HTTPClient, fake: FakeDMR, **extra: Any) -> EventReader:
    body = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": True} | extra
    response = await http.post(fake.url + CHAT, data=json.dumps(body).encode(), unbuffered=True)
    assert response.code == 200
    assert header(response, "content-type") == ["text/event-stream"]
    reader = EventReader()
    response.deliverBody(reader)
    return reader


@pytest_twisted.ensureDeferred
async def test_model_list_is_served_on_every_path(fake: FakeDMR, http: HTTPClient) -> None:
    """The OpenAI list is compact Go-style JSON with a trailing newline, whatever the engine segment."""
    expected = (
        b'{"object":"list","data":[{"id":"ai/smollm2","object":"model","created":1742816981,"owned_by":"docker"},'
        b'{"id":"ai/llama3.2","object":"model","created":1742816981,"owned_by":"docker"}]}\n'
    )
    for path in ["/engines/v1/models", "/engines/llama.cpp/v1/models", "/engines/foo/v1/models", "/v1/models"]:
        response, body = await call(http, fake, "GET", path)
        assert (response.code, header(response, "content-type"), body) == (200, ["application/json"], expected)
        assert header(response, "server") is None
    fake.models = []
    assert (await call(http, fake, "GET", "/engines/v1/models"))[1] == b'{"object":"list","data":[]}\n'


@pytest.mark.parametrize("listed", ["ai/smollm2", "ai/smollm2:latest"])
@pytest.mark.parametrize("sent", ["smollm2", "ai/smollm2", "AI/SmolLM2", " ai/smollm2 ", "ai/smollm2:latest"])
@pytest_twisted.ensureDeferred
async def test_model_aliases_resolve(fake: FakeDMR, http: HTTPClient, listed: str, sent: str) -> None:
    """DMR's normalisation makes every alias hit the listed model; the response echoes the request."""
    fake.models = [listed]
    request = {"model": sent, "messages": [{"role": "user", "content": "say hello please"}]}
    response, body = await call(http, fake, "POST", CHAT, request)
    assert response.code == 200
    assert header(response, "content-type") == ["application/json; charset=utf-8"]
    assert header(response, "server") == ["llama.cpp"]
    answer = json.loads(body)
    assert answer["model"] == sent and answer["id"].startswith("chatcmpl-")
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert answer["usage"] == {"completion_tokens": 4, "prompt_tokens": 3, "total_tokens": 7}
    one = json.loads((await call(http, fake, "GET", f"/engines/v1/models/{sent.strip()}"))[1])
    assert one["id"] == listed
    assert fake.inference_requests[0].json() == request


TOO_LARGE = b'{"model":"ai/smollm2","pad":"' + b"x" * (10 * 1024 * 1024) + b'"}'


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/engines/foo/v1/chat/completions", b"not json", 404, "backend not found"),
        ("POST", CHAT, TOO_LARGE, 400, "request too large"),
        ("POST", CHAT, b"{", 400, "invalid request"),
        ("POST", CHAT, b"[]", 400, "invalid request"),
        ("POST", "/v1/completions", b'{"model":5}', 400, "invalid request"),
        ("POST", CHAT, b"{}", 400, "model is required"),
        ("POST", CHAT, b"null", 400, "model is required"),
        ("POST", "/engines/llama.cpp/v1/embeddings", b'{"model":"smollm2:LATEST"}', 404,
         "error while getting model: get model '\"smollm2:LATEST\"': model not found"),
        ("GET", "/engines/v1/models/ai/x", None, 404, "error while getting model: get model '\"ai/x\"': model not found"),
        ("GET", CHAT, None, 404, "not found"),
        ("POST", "/engines/v1/models", b"{}", 404, "not found"),
        ("GET", "/health", None, 404, "404 page not found"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_dmr_errors_are_plain_text(
    fake: FakeDMR, http: HTTPClient, method: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    """DMR's own errors are Go http.Error bodies, and the request is recorded in full."""
    response, answer = await call(http, fake, method, path, body)
    assert (response.code, answer) == (status, message.encode() + b"\n")
    assert header(response, "content-type") == ["text/plain; charset=utf-8"]
    assert header(response, "x-content-type-options") == ["nosniff"]
    assert fake.requests[-1].body == (body or b"")
    assert fake.requests[-1].method == method


@pytest_twisted.ensureDeferred
async def test_engine_knobs(fake: FakeDMR, http: HTTPClient) -> None:
    """Legacy 503, load failure and context overflow use their documented dialects."""
    fake.loading_503 = 1
    request = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    response, body = await call(http, fake, "POST", CHAT, request)
    assert (response.code, json.loads(body)["error"]["message"]) == (503, "Loading model")
    assert (await call(http, fake, "POST", CHAT, request))[0].code == 200
    fake.load_failure = True
    response, body = await call(http, fake, "POST", CHAT, request)
    assert response.code == 500 and body.startswith(b"unable to load runner: error waiting for runner")
    fake.reset()
    overflow = {"model": "smollm2", "prompt": "x OVERFLOW"}
    response, body = await call(http, fake, "POST", "/engines/v1/completions", overflow)
    assert (response.code, json.loads(body)["error"]["type"]) == (400, "exceed_context_size_error")
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_embeddings_base64_matches_floats(fake: FakeDMR, http: HTTPClient) -> None:
    """Base64 embeddings are the little-endian float32 packing of the float vectors."""
    request: dict[str, Any] = {"model": "ai/llama3.2", "input": ["a", "b"]}
    floats = json.loads((await call(http, fake, "POST", "/v1/embeddings", request))[1])
    encoded = json.loads((await call(http, fake, "POST", "/v1/embeddings", request | {"encoding_format": "base64"}))[1])
    assert [d["index"] for d in floats["data"]] == [0, 1]
    for plain, packed in zip(floats["data"], encoded["data"]):
        assert list(struct.unpack("<8f", base64.b64decode(packed["embedding"]))) == plain["embedding"]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest_twisted.ensureDeferred
async def test_stream_sequence(fake: FakeDMR, http: HTTPClient, include_usage: bool) -> None:
    """Role chunk, one chunk per token, finish chunk, optional usage chunk, then [DONE]."""
    fake.chunk_delay = 0.001
    reader = await open_stream(http, fake, stream_options={"include_usage": include_usage})
    assert await reader.done
    assert reader.events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in reader.events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:5]] == fake.tokens
    assert chunks[5]["choices"][0] == {"finish_reason": "stop", "index": 0, "delta": {}}
    assert len(chunks) == (7 if include_usage else 6)
    if include_usage:
        assert chunks[6]["choices"] == [] and chunks[6]["usage"]["completion_tokens"] == 4
    assert "timings" in chunks[-1] and all("timings" not in c for c in chunks[:-1])
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


@pytest_twisted.ensureDeferred
async def test_hold_holds_the_stream(fake: FakeDMR, http: HTTPClient) -> None:
    """With hold set, only the role chunk is sent until the Deferred fires."""
    fake.hold = Deferred()
    reader = await open_stream(http, fake)
    await reader.first
    await deferLater(reactor, 0.05)
    assert len(reader.events) == 1 and not reader.done.called and fake.active == 1
    fake.hold.callback(None)
    assert await reader.done
    assert len(reader.events) == 7 and reader.events[-1] == "[DONE]"
    assert fake.active == 0


@pytest.mark.parametrize("knob", ["midstream_error", "truncate_stream"])
@pytest_twisted.ensureDeferred
async def test_stream_faults(fake: FakeDMR, http: HTTPClient, knob: str) -> None:
    """Faults strike after two content chunks and never send [DONE]."""
    setattr(fake, knob, True)
    reader = await open_stream(http, fake)
    assert await reader.done == (knob == "midstream_error")
    assert "[DONE]" not in reader.events
    if knob == "midstream_error":
        assert len(reader.events) == 4 and json.loads(reader.events[-1])["error"]["type"] == "server_error"
    else:
        assert len(reader.events) == 3
    assert fake.disconnects == 0


@pytest_twisted.ensureDeferred
async def test_client_disconnect_is_counted(fake: FakeDMR, http: HTTPClient) -> None:
    """A client leaving mid-stream is counted and wakes when_disconnected()."""
    fake.hold = Deferred()
    reader = await open_stream(http, fake)
    await reader.first
    assert reader.transport is not None
    reader.transport.stopProducing()
    await fake.when_disconnected()
    assert (fake.disconnects, fake.active) == (1, 0)
    await reader.done


@pytest_twisted.ensureDeferred
async def test_stop_kills_and_restart_reuses_port(fake: FakeDMR, http: HTTPClient) -> None:
    """stop() cuts in-flight streams and refuses connections; start(port) serves again."""
    fake.hold = Deferred()
    reader = await open_stream(http, fake)
    await reader.first
    port = fake.port
    await fake.stop()
    assert not await reader.done
    assert (fake.active, fake.disconnects) == (0, 0)
    with pytest.raises(ConnectionRefusedError):
        await http.get(fake.url + "/")
    assert await fake.start(port) == port
    response, body = await call(http, fake, "GET", "/")
    assert (response.code, body) == (200, b"Docker Model Runner is running")
