"""Tests for the fake DMR that olladmr's end-to-end tests run against."""

from __future__ import annotations

import base64
import itertools
import json
import re
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IResponse

from fakedmr import GO_ZERO_TIME, BackendState, FakeDMR, Lease, Machine

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


# -- routes beyond the seed's: Anthropic, Responses, rerank/score/images, model lookup, ps ------------------------


def named_events(body: bytes) -> list[tuple[str, Any]]:
    """Parse an ``event:`` + ``data:`` SSE body into (event, decoded data) pairs, checking the framing."""
    assert body.endswith(b"\n\n") or not body
    events = []
    for block in body.decode().split("\n\n")[:-1]:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: "), block
        events.append((event[len("event: ") :], json.loads(data[len("data: ") :])))
    return events


def sdk_openai(fake: FakeDMR) -> Any:
    import openai

    return openai.OpenAI(base_url=fake.url + "/engines/v1", api_key="x", max_retries=0, timeout=10)


def sdk_anthropic(fake: FakeDMR, prefix: str) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=fake.url + prefix, api_key="sk-ant-x", max_retries=0, timeout=10)


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    """Run a blocking SDK call off the reactor thread (as conftest's in_thread)."""
    from twisted.internet import threads

    return threads.deferToThread(fn, *args, **kwargs)


MESSAGE = {"model": "ai/smollm2", "max_tokens": 64, "system": "be brief",
           "messages": [{"role": "user", "content": [{"type": "text", "text": "say hello"}]}]}


@pytest.mark.parametrize("prefix", ["/anthropic", "/engines", "/engines/llama.cpp"])
@pytest_twisted.ensureDeferred
async def test_anthropic_sdk_create_stream_and_count_tokens(fake: FakeDMR, prefix: str) -> None:
    """The official anthropic SDK creates, streams and counts tokens against either prefix."""
    import anthropic

    client = sdk_anthropic(fake, prefix)

    def work() -> tuple[Any, str, Any, Any]:
        message = client.messages.create(**MESSAGE)
        with client.messages.stream(**MESSAGE) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        count = client.messages.count_tokens(model="smollm2", messages=MESSAGE["messages"], system="be brief")
        return message, text, final, count

    message, text, final, count = await in_thread(work)
    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].text == text == final.content[0].text == "".join(fake.tokens)
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("end_turn", 4, 4)
    assert (final.stop_reason, final.usage.output_tokens) == ("end_turn", 4)
    assert count.input_tokens == 4  # "be brief" + "say hello"
    assert [r.uri for r in fake.inference_requests] == [prefix + "/v1/messages"] * 2 + [prefix + "/v1/messages/count_tokens"]
    sent = fake.inference_requests[0].headers
    assert len(sent["anthropic-version"]) == 1  # recorded like any header; this SDK sends its key as a bearer token
    assert sent.get("x-api-key", sent.get("authorization")) in (["sk-ant-x"], ["Bearer sk-ant-x"])


@pytest_twisted.ensureDeferred
async def test_anthropic_wire_format(fake: FakeDMR, http: HTTPClient) -> None:
    """llama.cpp's native Anthropic JSON and named-event stream (with the ping knob), never a [DONE]."""
    import anthropic
    from pydantic import TypeAdapter

    headers = {"x-api-key": ["k"], "anthropic-version": ["2023-06-01"], "anthropic-beta": ["tools-2024-04-04"]}
    response = await http.post(fake.url + "/engines/v1/messages", data=json.dumps(MESSAGE).encode(), headers=headers)
    body = await response.content()
    assert {k: fake.requests[-1].headers[k] for k in headers} == headers
    assert header(response, "content-type") == ["application/json; charset=utf-8"]
    assert header(response, "server") == ["llama.cpp"]
    answer = json.loads(body)
    assert list(answer) == ["id", "type", "role", "content", "model", "stop_reason", "stop_sequence", "usage"]
    assert answer["id"].startswith("msg_") and len(answer["id"]) == 28 and answer["id"][4:].isalnum()
    assert answer["content"] == [{"type": "text", "text": "Hello, world!"}] and answer["stop_sequence"] is None
    anthropic.types.Message.model_validate(answer)
    fake.anthropic_ping = True
    response, body = await call(http, fake, "POST", "/anthropic/v1/messages", MESSAGE | {"stream": True})
    assert header(response, "content-type") == ["text/event-stream"] and b"[DONE]" not in body
    events = named_events(body)
    assert [e for e, _ in events] == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 4 + [
        "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"] == {"input_tokens": 4, "output_tokens": 0}
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [d["delta"] for _, d in events[3:7]] == [{"type": "text_delta", "text": t} for t in fake.tokens]
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": 4}}
    adapter: Any = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for name, data in events:
        if name != "ping":
            adapter.validate_python(data)
    response, body = await call(http, fake, "POST", "/engines/vllm/v1/messages", MESSAGE | {"max_tokens": 2})
    assert (json.loads(body)["stop_reason"], json.loads(body)["content"][0]["text"]) == ("max_tokens", "Hello,")
    response, body = await call(http, fake, "POST", "/v1/messages/count_tokens", MESSAGE)
    assert (response.code, body, header(response, "server")) == (200, b'{"input_tokens":4}', ["llama.cpp"])


ANTHROPIC_TOO_LARGE = b'{"model":"ai/smollm2","pad":"' + b"x" * (10 * 1024 * 1024) + b'"}'


@pytest.mark.parametrize(
    ("body", "status", "kind", "message", "plain"),
    [
        (b"{", 400, "invalid_request_error", "Invalid JSON in request body", "invalid request"),
        (b"[]", 400, "invalid_request_error", "Invalid JSON in request body", "invalid request"),
        (b'{"model":5}', 400, "invalid_request_error", "Invalid JSON in request body", "invalid request"),
        (b"null", 400, "invalid_request_error", "Missing required field: model", "model is required"),
        (b'{"messages":[]}', 400, "invalid_request_error", "Missing required field: model", "model is required"),
        (b'{"model":"ai/nope"}', 404, "not_found_error", "Model not found: ai/nope",
         "error while getting model: get model '\"ai/nope\"': model not found"),
        (ANTHROPIC_TOO_LARGE, 413, "request_too_large", "Request body too large", "request too large"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_anthropic_prefix_errors_are_anthropic_shaped(
    fake: FakeDMR, http: HTTPClient, body: bytes, status: int, kind: str, message: str, plain: str
) -> None:
    """/anthropic validates first in Anthropic's error shape; /engines/v1/messages answers DMR's plain text."""
    response, answer = await call(http, fake, "POST", "/anthropic/v1/messages/count_tokens", body)
    assert (response.code, header(response, "content-type")) == (status, ["application/json"])
    assert answer == json.dumps({"type": "error", "error": {"type": kind, "message": message}},
                                separators=(",", ":")).encode() + b"\n"
    response, answer = await call(http, fake, "POST", "/engines/v1/messages", body)
    assert (response.code, answer) == (400 if status == 413 else status, plain.encode() + b"\n")
    assert header(response, "content-type") == ["text/plain; charset=utf-8"]


@pytest_twisted.ensureDeferred
async def test_anthropic_stream_faults_and_engine_knobs(fake: FakeDMR, http: HTTPClient) -> None:
    """midstream_error ends with an in-band error event, truncate_stream cuts, load_failure is DMR's plain 500."""
    fake.midstream_error = True
    response, body = await call(http, fake, "POST", "/anthropic/v1/messages", MESSAGE | {"stream": True})
    events = named_events(body)
    assert [e for e, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                      "content_block_delta", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message": ANY_STR}}
    fake.reset()
    fake.truncate_stream = True
    body = json.dumps(MESSAGE | {"stream": True}).encode()
    response = await http.post(fake.url + "/engines/v1/messages", data=body, unbuffered=True)
    reader = EventReader()
    response.deliverBody(reader)
    assert not await reader.done  # the connection was cut, the chunked body never terminated
    assert len(reader.events) == 4 and reader.events[-1].startswith("event: content_block_delta")
    fake.reset()
    fake.load_failure = True
    response, answer = await call(http, fake, "POST", "/anthropic/v1/messages", MESSAGE)
    assert response.code == 500 and answer.startswith(b"unable to load runner:")
    assert header(response, "content-type") == ["text/plain; charset=utf-8"]
    response, answer = await call(http, fake, "POST", "/engines/nope/v1/messages", b"not json")
    assert (response.code, answer) == (404, b"backend not found\n")


class _AnyStr:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_STR: Any = _AnyStr()


@pytest.mark.parametrize(
    ("method", "path", "status", "allow", "body"),
    [
        ("GET", "/anthropic/v1/messages", 405, "POST", b"Method Not Allowed\n"),
        ("DELETE", "/anthropic/v1/messages/count_tokens", 405, "POST", b"Method Not Allowed\n"),
        ("POST", "/anthropic/v1/complete", 404, None, b"404 page not found\n"),
        ("GET", "/responses", 405, "POST", b"Method Not Allowed\n"),
        ("PUT", "/engines/v1/responses/resp_x", 405, "DELETE, GET, HEAD", b"Method Not Allowed\n"),
        ("POST", "/v1/responses/resp_x/input_items", 405, "GET, HEAD", b"Method Not Allowed\n"),
        ("GET", "/responses/resp_x/input_items/more", 404, None, b"404 page not found\n"),
        ("GET", "/engines/v1/responses/resp_x/input_items/more", 404, None, b"not found\n"),
        ("GET", "/engines/v1/messages", 404, None, b"not found\n"),
        ("GET", "/engines/rerank", 404, None, b"not found\n"),
        ("PUT", "/engines/llama.cpp/v1/images/generations", 404, None, b"not found\n"),
        ("POST", "/engines/ps", 404, None, b"not found\n"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_methods_and_paths(
    fake: FakeDMR, http: HTTPClient, method: str, path: str, status: int, allow: str | None, body: bytes
) -> None:
    """/engines/* answers 404 not found; the Anthropic and Responses muxes answer Go's 405 with Allow."""
    response, answer = await call(http, fake, method, path)
    assert (response.code, answer, header(response, "content-type")) == (status, body, ["text/plain; charset=utf-8"])
    assert header(response, "allow") == (None if allow is None else [allow])


@pytest_twisted.ensureDeferred
async def test_anthropic_root_redirects(fake: FakeDMR, http: HTTPClient) -> None:
    """Like Go's ServeMux, the subtree root without its slash is a 301 to /anthropic/."""
    response = await http.get(fake.url + "/anthropic?x=1", allow_redirects=False)
    await response.content()
    assert (response.code, header(response, "location")) == (301, ["/anthropic/?x=1"])


@pytest_twisted.ensureDeferred
async def test_openai_sdk_responses_lifecycle(fake: FakeDMR, http: HTTPClient) -> None:
    """The openai SDK creates, retrieves, lists input items of and deletes a stored response."""
    import openai

    client = sdk_openai(fake)

    def work() -> tuple[Any, ...]:
        created = client.responses.create(
            model="smollm2", instructions="be brief",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "say hello"}]},
                   {"type": "message", "role": "user", "content": "twice"}],
        )
        retrieved = client.responses.retrieve(created.id)
        items = client.responses.input_items.list(created.id)
        deleted = client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError) as gone:
            client.responses.retrieve(created.id)
        return created, retrieved, items, deleted, gone.value

    created, retrieved, items, deleted, gone = await in_thread(work)
    assert created.id.startswith("resp_") and len(created.id) == 29 and created.id[5:].isalnum()
    assert (created.status, created.output_text, created.model) == ("completed", "Hello, world! [turn 1]", "smollm2")
    assert created.output[0].id.startswith("msg_") and created.output[0].content[0].annotations == []
    assert (created.usage.input_tokens, created.usage.output_tokens, created.usage.total_tokens) == (5, 5, 10)
    assert (created.instructions, created.previous_response_id, created.store) == ("be brief", None, True)
    assert retrieved.model_dump() == created.model_dump()
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "say hello"), ("user", "twice")]
    assert items.first_id == items.data[0].id and items.last_id == items.data[1].id and not items.has_more
    assert deleted is None and gone.status_code == 404
    assert gone.body == {"code": "not_found", "message": "Response not found"}
    assert fake.stored_responses == {}
    response, body = await call(http, fake, "POST", "/responses", {"model": "ai/smollm2", "input": "x"})
    assert (response.code, header(response, "content-type"), body[-1:]) == (200, ["application/json"], b"\n")
    from openai.types.responses import Response

    Response.model_validate(json.loads(body))  # strict: every field the SDK requires is there
    rid = json.loads(body)["id"]
    response, body = await call(http, fake, "DELETE", f"/engines/vllm/v1/responses/{rid}")
    assert json.loads(body) == {"id": rid, "object": "response.deleted", "deleted": True}


@pytest_twisted.ensureDeferred
async def test_openai_sdk_responses_stream(fake: FakeDMR, http: HTTPClient) -> None:
    """stream=True yields DMR's event sequence; the response is stored once completed."""
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    client = sdk_openai(fake)
    fake.chunk_delay = 0.001
    events = await in_thread(lambda: list(client.responses.create(model="ai/smollm2", input="hi", stream=True)))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * 5 + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    assert events[0].response.status == "in_progress" and events[0].response.id == events[-1].response.id
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == [*fake.tokens, " [turn 1]"]
    final = events[-1].response
    assert (final.status, final.output_text, final.usage.output_tokens) == ("completed", "".join(deltas), 5)
    stored = await in_thread(client.responses.retrieve, final.id)
    assert stored.output_text == final.output_text and fake.stored_responses[final.id].turn == 1
    response, body = await call(http, fake, "POST", "/v1/responses", {"model": "ai/smollm2", "input": "x", "stream": True})
    assert header(response, "content-type") == ["text/event-stream"] and b"[DONE]" not in body
    assert header(response, "cache-control") == ["no-cache"] and header(response, "server") == ["llama.cpp"]
    adapter: Any = TypeAdapter(ResponseStreamEvent)
    for name, data in named_events(body):
        assert data["type"] == name
        adapter.validate_python(data)


@pytest_twisted.ensureDeferred
async def test_responses_chain_lives_in_one_instance(fake: FakeDMR) -> None:
    """A 3-turn previous_response_id chain works on one fake; its second turn on another fake is DMR's 400."""
    import openai

    other = FakeDMR(name="other")
    await other.start()
    try:
        client, elsewhere = sdk_openai(fake), sdk_openai(other)

        def work() -> tuple[list[Any], Any]:
            turns, previous = [], None
            for n in range(3):
                turns.append(client.responses.create(model="ai/smollm2", input=f"turn {n}",
                                                     previous_response_id=previous))
                previous = turns[-1].id
            with pytest.raises(openai.BadRequestError) as refused:
                elsewhere.responses.create(model="ai/smollm2", input="turn 1", previous_response_id=turns[0].id)
            return turns, refused.value

        turns, refused = await in_thread(work)
    finally:
        await other.stop()
    assert [t.output_text for t in turns] == [f"Hello, world! [turn {n}]" for n in (1, 2, 3)]
    assert [t.previous_response_id for t in turns] == [None, turns[0].id, turns[1].id]
    assert [t.usage.input_tokens for t in turns] == [2, 2 + 4, 2 + 4 + 4]  # DMR replays the earlier outputs
    assert refused.status_code == 400
    assert refused.body == {"code": "invalid_request",
                            "message": f'previous_response_id "{turns[0].id}" was not found'}
    assert other.stored_responses == {} and len(fake.stored_responses) == 3


RESPONSES_TOO_LARGE = b'{"model":"ai/smollm2","input":"' + b"x" * (10 * 1024 * 1024) + b'"}'


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (b"{", 400, "invalid_request", "Invalid JSON: unexpected end of JSON input"),
        (b"{x", 400, "invalid_request", "Invalid JSON: invalid character 'x' looking for beginning of value"),
        (b"[]", 400, "invalid_request",
         "Invalid JSON: json: cannot unmarshal array into Go value of type responses.CreateRequest"),
        (b'{"model":7}', 400, "invalid_request",
         "Invalid JSON: json: cannot unmarshal number into Go struct field CreateRequest.model of type string"),
        (b"null", 400, "invalid_request", "model is required"),
        (b'{"input":"hi"}', 400, "invalid_request", "model is required"),
        (b'{"model":"ai/smollm2","conversation":"conv_1"}', 400, "invalid_request",
         "conversation is not supported by Docker Model Runner Responses compatibility layer; "
         "use previous_response_id instead"),
        (b'{"model":"ai/smollm2","previous_response_id":"resp_000000000000000000000000"}', 400, "invalid_request",
         'previous_response_id "resp_000000000000000000000000" was not found'),
        (b'{"model":"ai/smollm2","input":5}', 400, "invalid_request",
         "failed to parse input: input must be a string or array of items: json: cannot unmarshal number "
         "into Go value of type []responses.InputItem"),
        (b'{"model":"ai/smollm2","tools":[{"type":"web_search"}]}', 400, "invalid_request",
         'tool type "web_search" is not supported by Docker Model Runner Responses compatibility layer'),
        (RESPONSES_TOO_LARGE, 413, "request_too_large", "Request body too large (max 10485760 bytes)"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_responses_create_errors(
    fake: FakeDMR, http: HTTPClient, body: bytes, status: int, code: str, message: str
) -> None:
    """The Responses handler's own checks answer {"error":{"code","message"}} as Go JSON."""
    response, answer = await call(http, fake, "POST", "/engines/llama.cpp/v1/responses", body)
    assert (response.code, header(response, "content-type")) == (status, ["application/json"])
    assert answer == json.dumps({"error": {"code": code, "message": message}}).replace(", ", ",").replace(
        '": ', '":').encode() + b"\n"


@pytest.mark.parametrize("path", ["/responses/resp_nope", "/v1/responses/resp_nope/input_items",
                                  "/engines/responses/resp_nope", "/engines/vllm/v1/responses/resp_nope"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_responses_unknown_id_is_404(fake: FakeDMR, http: HTTPClient, path: str, method: str) -> None:
    """Retrieving, listing or deleting an id this instance never stored is DMR's JSON 404."""
    if method == "DELETE" and path.endswith("input_items"):
        path = path.removesuffix("/input_items")
    response, answer = await call(http, fake, method, path)
    assert (response.code, answer) == (404, b'{"error":{"code":"not_found","message":"Response not found"}}\n')


@pytest_twisted.ensureDeferred
async def test_responses_store_false_ttl_and_reset(fake: FakeDMR, http: HTTPClient) -> None:
    """store:false skips the store, entries expire after response_ttl, reset() and stop() forget them."""
    response, body = await call(http, fake, "POST", "/responses", {"model": "ai/smollm2", "input": "x", "store": False})
    unstored = json.loads(body)
    assert response.code == 200 and unstored["store"] is False and fake.stored_responses == {}
    assert (await call(http, fake, "GET", f"/responses/{unstored['id']}"))[0].code == 404
    fake.response_ttl = 0.02
    rid = json.loads((await call(http, fake, "POST", "/responses", {"model": "ai/smollm2", "input": "x"}))[1])["id"]
    assert (await call(http, fake, "GET", f"/responses/{rid}"))[0].code == 200
    await deferLater(reactor, 0.05)
    assert (await call(http, fake, "GET", f"/responses/{rid}"))[0].code == 404
    chained = {"model": "ai/smollm2", "input": "x", "previous_response_id": rid}
    assert (await call(http, fake, "POST", "/responses", chained))[0].code == 400
    fake.reset()
    rid = json.loads((await call(http, fake, "POST", "/responses", {"model": "ai/smollm2", "input": "x"}))[1])["id"]
    fake.reset()
    assert (await call(http, fake, "GET", f"/responses/{rid}"))[0].code == 404


@pytest_twisted.ensureDeferred
async def test_responses_upstream_failures(fake: FakeDMR, http: HTTPClient) -> None:
    """Scheduler and engine failures come back wrapped as DMR does: a failed response, or two events on a 200."""
    request = {"model": "ai/nope", "input": "hi"}
    response, body = await call(http, fake, "POST", "/v1/responses", request)
    failed = json.loads(body)
    assert (response.code, failed["status"]) == (404, "failed")
    assert failed["error"] == {"code": "upstream_error",
                               "message": "error while getting model: get model '\"ai/nope\"': model not found\n"}
    assert fake.stored_responses[failed["id"]].response["status"] == "failed"
    response, body = await call(http, fake, "POST", "/engines/foo/v1/responses", request | {"model": "smollm2"})
    assert (response.code, json.loads(body)["error"]["message"]) == (404, "backend not found\n")
    response, body = await call(http, fake, "POST", "/v1/responses", request | {"stream": True})
    assert (response.code, header(response, "content-type")) == (200, ["text/plain; charset=utf-8"])
    events = named_events(body)
    assert [e for e, _ in events] == ["error", "response.failed"]
    assert events[0][1] == {"type": "error", "sequence_number": 1, "error": {
        "code": "upstream_error", "message": "Upstream service returned status code: 404"}}
    assert events[1][1]["response"]["status"] == "failed"
    fake.load_failure = True
    response, body = await call(http, fake, "POST", "/v1/responses", {"model": "smollm2", "input": "hi"})
    assert response.code == 500 and json.loads(body)["error"]["message"].startswith("unable to load runner: ")
    fake.reset()
    overflow = {"model": "smollm2", "input": "x OVERFLOW", "stream": True}
    response, body = await call(http, fake, "POST", "/v1/responses", overflow)
    assert header(response, "content-type") == ["application/json; charset=utf-8"]
    assert [e for e, _ in named_events(body)] == ["error", "response.failed"]


@pytest_twisted.ensureDeferred
async def test_responses_stream_knobs(fake: FakeDMR, http: HTTPClient) -> None:
    """hold pauses after created/in_progress, midstream_error ends cleanly without completing, max_output_tokens cuts."""
    fake.hold = Deferred()
    body = json.dumps({"model": "ai/smollm2", "input": "x", "stream": True}).encode()
    response = await http.post(fake.url + "/responses", data=body, unbuffered=True)
    reader = EventReader()
    response.deliverBody(reader)
    await reader.first
    await deferLater(reactor, 0.02)
    assert [e.split("\n")[0] for e in reader.events] == ["event: response.created", "event: response.in_progress"]
    assert fake.active == 1 and fake.stored_responses == {}
    fake.hold.callback(None)
    assert await reader.done and len(fake.stored_responses) == 1
    fake.reset()
    fake.midstream_error = True
    response, raw = await call(http, fake, "POST", "/responses", {"model": "ai/smollm2", "input": "x", "stream": True})
    assert [e for e, _ in named_events(raw)][-3:] == ["response.content_part.added"] + ["response.output_text.delta"] * 2
    assert fake.stored_responses == {}
    fake.reset()
    capped = {"model": "ai/smollm2", "input": "x", "max_output_tokens": 2}
    answer = json.loads((await call(http, fake, "POST", "/responses", capped))[1])
    assert (answer["output_text"], answer["usage"]["output_tokens"], answer["max_output_tokens"]) == ("Hello,", 2, 2)


@pytest_twisted.ensureDeferred
async def test_rerank_score_and_images(fake: FakeDMR, http: HTTPClient) -> None:
    """Rerank (llama.cpp), score (vLLM) and images (diffusers) answer their engines' shapes, routed by model."""
    documents = ["a whale", "a docker container on a ship", "docker"]
    rerank = {"model": "smollm2", "query": "docker ship", "documents": documents}
    for path in ["/engines/rerank", "/engines/llama.cpp/rerank", "/rerank"]:
        response, body = await call(http, fake, "POST", path, rerank)
        assert (response.code, header(response, "server")) == (200, ["llama.cpp"])
        assert json.loads(body) == {"model": "smollm2", "object": "list",
                                    "usage": {"prompt_tokens": 15, "total_tokens": 15},
                                    "results": [{"index": 1, "relevance_score": 1.0},
                                                {"index": 2, "relevance_score": 0.5},
                                                {"index": 0, "relevance_score": 0.0}]}
    top = json.loads((await call(http, fake, "POST", "/engines/rerank", rerank | {"top_n": 1}))[1])
    assert top["results"] == [{"index": 1, "relevance_score": 1.0}]
    response, body = await call(http, fake, "POST", "/engines/rerank", {"model": "smollm2", "documents": documents})
    assert (response.code, json.loads(body)["error"]["type"]) == (400, "invalid_request_error")
    assert (await call(http, fake, "POST", "/v1/rerank", rerank))[1] == b"backend not found\n"  # backend "v1"
    response, body = await call(http, fake, "POST", "/score", {"model": "ai/llama3.2", "text_1": "docker", "text_2": "docker ship"})
    score = json.loads(body)
    assert (response.code, header(response, "server"), header(response, "content-type")) == (
        200, ["uvicorn"], ["application/json"])
    assert list(score) == ["id", "object", "created", "model", "data", "usage"] and score["object"] == "list"
    assert score["data"] == [{"index": 0, "object": "score", "score": 1.0}] and score["usage"]["prompt_tokens"] == 3
    response, body = await call(http, fake, "POST", "/engines/vllm/score", {"model": "ai/x", "text_1": "a", "text_2": "b"})
    assert (response.code, body) == (404, b"error while getting model: get model '\"ai/x\"': model not found\n")
    images = {"model": "ai/smollm2", "prompt": "a whale", "n": 2}
    response, body = await call(http, fake, "POST", "/engines/diffusers/v1/images/generations", images)
    answer = json.loads(body)
    assert (response.code, list(answer), len(answer["data"])) == (200, ["created", "data"], 2)
    png = base64.b64decode(answer["data"][0]["b64_json"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR" and struct.unpack(">II", png[16:24]) == (1, 1)
    assert zlib.crc32(png[12:29]) == struct.unpack(">I", png[29:33])[0] and png.endswith(b"IEND\xaeB`\x82")
    response, body = await call(http, fake, "POST", "/v1/images/generations", {"model": "ai/smollm2"})
    assert (response.code, json.loads(body)["detail"][0]["loc"]) == (422, ["body", "prompt"])
    assert [r.uri for r in fake.inference_requests][-2:] == ["/engines/diffusers/v1/images/generations",
                                                             "/v1/images/generations"]


@pytest_twisted.ensureDeferred
async def test_model_lookup_with_slashes(fake: FakeDMR, http: HTTPClient) -> None:
    """GET /engines[/{b}]/v1/models/{name...} resolves names with slashes and tags; unknown is DMR's plain 404."""
    fake.models = ["ai/smollm2:latest", "huggingface.co/org/repo:Q4"]
    for name, listed in [("ai/smollm2", "ai/smollm2:latest"), ("ai/smollm2:latest", "ai/smollm2:latest"),
                         ("huggingface.co/org/repo:Q4", "huggingface.co/org/repo:Q4"),
                         ("hf.co/Org/Repo:Q4", "huggingface.co/org/repo:Q4")]:
        for prefix in ["/engines/v1", "/engines/llama.cpp/v1", "/v1"]:
            response, body = await call(http, fake, "GET", f"{prefix}/models/{name}")
            assert (response.code, json.loads(body)["id"]) == (200, listed), (prefix, name)
    response, body = await call(http, fake, "GET", "/engines/v1/models/huggingface.co/org/repo:q4")
    assert (response.code, body) == (
        404, b"error while getting model: get model '\"huggingface.co/org/repo:q4\"': model not found\n")


@pytest_twisted.ensureDeferred
async def test_engines_ps(fake: FakeDMR, http: HTTPClient) -> None:
    """/engines/ps lists loading, in-use and idle runners like DMR's BackendStatus, and is empty after reset."""
    assert (await call(http, fake, "GET", "/engines/ps"))[1] == b"[]\n"
    fake.cold_load_delay = 0.05
    pending = Deferred.fromCoroutine(call(http, fake, "POST", "/engines/v1/embeddings", {"model": "AI/SmolLM2", "input": "x"}))
    await deferLater(reactor, 0.01)
    response, body = await call(http, fake, "GET", "/engines/ps")
    assert header(response, "content-type") == ["application/json"]
    assert json.loads(body) == [{"backend_name": "llama.cpp", "model_name": "AI/SmolLM2", "mode": "embedding",
                                 "last_used": "0001-01-01T00:00:00Z", "loading": True}]
    assert (await pending)[0].code == 200
    fake.cold_load_delay = 0
    fake.hold = Deferred()
    reader = await open_stream(http, fake)
    await reader.first
    busy = json.loads((await call(http, fake, "GET", "/engines/ps"))[1])
    assert [(e["mode"], e.get("in_use"), e["last_used"]) for e in busy] == [
        ("embedding", None, ANY_STR), ("completion", True, "0001-01-01T00:00:00Z")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", busy[0]["last_used"])
    fake.hold.callback(None)
    await reader.done
    await call(http, fake, "POST", "/engines/vllm/rerank", {"model": "ai/llama3.2", "query": "q", "documents": ["d"]})
    idle = json.loads((await call(http, fake, "GET", "/engines/ps"))[1])
    assert [(e["backend_name"], e["model_name"], e["mode"], "in_use" in e) for e in idle] == [
        ("llama.cpp", "AI/SmolLM2", "embedding", False), ("llama.cpp", "ai/smollm2", "completion", False),
        ("vllm", "ai/llama3.2", "reranking", False)]
    fake.reset()
    assert (await call(http, fake, "GET", "/engines/ps"))[1] == b"[]\n"


@pytest_twisted.ensureDeferred
async def test_new_routes_share_cold_loads_and_count_as_inference(fake: FakeDMR, http: HTTPClient) -> None:
    """Messages, count_tokens and Responses share the chat runner's cold load and are inference requests."""
    fake.cold_load_delay = 0.05
    started = reactor.seconds()
    answers = await gatherResults([
        Deferred.fromCoroutine(call(http, fake, "POST", "/anthropic/v1/messages", MESSAGE)),
        Deferred.fromCoroutine(call(http, fake, "POST", "/v1/messages/count_tokens", MESSAGE)),
        Deferred.fromCoroutine(call(http, fake, "POST", "/responses", {"model": "ai/smollm2", "input": "x"})),
    ])
    assert [r.code for r, _ in answers] == [200, 200, 200] and 0.05 <= reactor.seconds() - started < 0.5
    assert len(fake.inference_requests) == 3 and fake.active == 0
    started = reactor.seconds()
    await call(http, fake, "POST", CHAT, {"model": "ai/smollm2", "messages": []})
    assert reactor.seconds() - started < 0.05  # the same (completion) runner: already warm
    await call(http, fake, "GET", "/responses/" + json.loads(answers[2][1])["id"])
    assert len(fake.inference_requests) == 4


# -- BackendState: resident models and prefix cache -------------------------------------------

SMOL, LLAMA, QWEN = "ai/smollm2:latest", "ai/llama3.2:latest", "ai/qwen3:latest"


def words(n: int, stem: str = "w") -> str:
    """``n`` distinct words: w0 w1 …"""
    return " ".join(f"{stem}{i}" for i in range(n))


def got(d: Deferred[Lease]) -> Lease:
    """The lease a Deferred has already fired with."""
    results: list[Lease] = []
    d.addCallback(results.append)
    assert results, "not granted yet"
    return results[0]


def test_state_cold_load_is_shared_and_evicts_the_lru_model() -> None:
    """One load serves concurrent requests; at capacity the least recently used idle model goes."""
    clock = Clock()
    state = BackendState(resident_capacity=2, cold_load=2.0, clock=clock)
    first, second = state.acquire(SMOL, ref="smollm2"), state.acquire(SMOL)
    assert (first.called, second.called, state.loading, state.cold_loads) == (False, False, [SMOL], 1)
    assert state.ps() == [{"backend_name": "llama.cpp", "model_name": "smollm2", "mode": "completion",
                           "last_used": GO_ZERO_TIME, "loading": True}]
    clock.advance(1.999)
    assert not first.called
    clock.advance(0.001)
    a, b = got(first), got(second)
    assert a.cold and b.cold and state.resident == [SMOL] and state.loading == []
    assert state.ps() == [{"backend_name": "llama.cpp", "model_name": "smollm2", "mode": "completion",
                           "last_used": GO_ZERO_TIME, "in_use": True}]
    state.release(a)
    state.release(b)
    state.release(b)  # idempotent
    assert state.ps()[0] == {"backend_name": "llama.cpp", "model_name": "smollm2", "mode": "completion",
                             "last_used": "1970-01-01T00:00:02Z"}
    loading = state.acquire(LLAMA, mode="embedding")
    clock.advance(2)
    state.release(got(loading))
    hit = got(state.acquire(SMOL))  # no load: SMOL becomes the most recently used
    state.release(hit)
    assert not hit.cold and state.resident == [LLAMA, SMOL]
    loading = state.acquire(QWEN)
    assert (state.resident, state.loading, state.evictions) == ([SMOL], [QWEN], 1)
    assert [e.get("loading", False) for e in state.ps()] == [False, True]
    clock.advance(2)
    state.release(got(loading))
    assert state.resident == [SMOL, QWEN] and state.cold_loads == 3
    assert [(r.model, r.cold, r.admitted) for r in state.records] == [
        (SMOL, True, 2.0), (SMOL, True, 2.0), (LLAMA, True, 4.0), (SMOL, False, 4.0), (QWEN, True, 6.0)]


def test_state_waits_while_every_resident_model_is_busy() -> None:
    """A load needing room waits (FIFO) for a resident model to be released; cancelling withdraws."""
    clock = Clock()
    state = BackendState(resident_capacity=1, cold_load=1.0, clock=clock)
    pending = state.acquire(SMOL)
    clock.advance(1)
    busy = got(pending)
    waiting, withdrawn = state.acquire(LLAMA), state.acquire(QWEN)
    clock.advance(10)
    assert (waiting.called, state.loading, state.resident) == (False, [], [SMOL])
    withdrawn.cancel()
    withdrawn.addErrback(lambda failure: failure.trap(CancelledError))
    also = got(state.acquire(SMOL))  # a resident model is served at once, queue or not
    state.release(busy)
    assert state.loading == [] and not waiting.called  # still in use
    state.release(also)
    assert (state.loading, state.resident, state.evictions) == ([LLAMA], [], 1)
    clock.advance(1)
    assert got(waiting).cold and state.resident == [LLAMA] and state.cold_loads == 2


def test_state_prefix_cache_times_the_first_token() -> None:
    """TTFT = base + per_token × uncached tokens; a later turn finds its earlier turn cached, elsewhere not."""
    here, there = (BackendState(cold_load=0, base=0.02, per_token=0.001, clock=Clock()) for _ in range(2))
    turn1 = ["be brief", words(150)]  # 152 tokens
    lease = got(here.acquire(SMOL))
    assert lease.cold and here.prefill(lease, turn1) == pytest.approx(0.02 + 0.152)
    here.remember(lease, "Hello, world!")
    here.release(lease)
    assert here.entries == [(SMOL, 154)] and here.cache_used == 154
    turn2 = [*turn1, "Hello, world!", "now some more words"]  # 158 tokens
    lease = got(here.acquire(SMOL))
    assert here.prefill(lease, turn2) == pytest.approx(0.02 + 0.004)
    record = lease.record
    assert (record.prompt_tokens, record.cached_tokens, record.cold) == (158, 154, False)
    here.remember(lease, "Hello, world!")
    assert here.entries == [(SMOL, 160)]  # the longer entry replaced the one it extends
    here.prefill(lease, turn1)
    here.remember(lease)
    assert here.entries == [(SMOL, 160)]  # and holds this one already
    elsewhere = got(there.acquire(SMOL))
    assert there.prefill(elsewhere, turn2) == pytest.approx(0.02 + 0.158) and elsewhere.record.cached_tokens == 0
    assert here.lookup(SMOL, turn2 + ["Hello, world!"]) == 159  # like llama.cpp, the last token is processed
    assert here.lookup(SMOL, ["be brief", words(70) + " different"]) == 72  # a match ending mid-chunk
    assert here.lookup(SMOL, ["be", "brief w0"]) == 2 and here.lookup(LLAMA, turn1) == 0
    assert (here.cache_hits_tokens, here.cache_miss_tokens) == (154 + 151, 152 + 4 + 1)


def test_state_cache_is_bounded_and_dies_with_its_model() -> None:
    """At most cache_tokens tokens, least recently used entries first; evicting a model drops its entries."""
    state = BackendState(resident_capacity=1, cold_load=0, cache_tokens=300, clock=Clock())
    lease = got(state.acquire(SMOL))
    conversation = [[f"conversation{n} " + words(99)] for n in range(5)]
    for prompt in conversation[:4]:
        state.prefill(lease, prompt)
        state.remember(lease)
    assert state.entries == [(SMOL, 100)] * 3 and state.cache_used == 300
    assert [state.lookup(SMOL, prompt) for prompt in conversation[:4]] == [0, 99, 99, 99]
    state.prefill(lease, conversation[1])  # a hit makes its entry the most recently used
    state.prefill(lease, conversation[4])
    state.remember(lease)
    assert [state.lookup(SMOL, prompt) for prompt in conversation] == [0, 99, 0, 99, 99]
    state.prefill(lease, [words(500)])
    state.remember(lease, "more")
    assert state.entries == [(SMOL, 300)] and state.lookup(SMOL, [words(400)]) == 300
    state.release(lease)
    got(state.acquire(LLAMA))
    assert (state.resident, state.entries, state.cache_used) == ([LLAMA], [], 0)


def test_state_slots_queue_prefills() -> None:
    """With slots=1, a second request on the model waits for the first to finish."""
    state = BackendState(cold_load=0, slots=1, clock=Clock())
    first, second = got(state.acquire(SMOL)), got(state.acquire(SMOL))
    assert state.slot(first).called
    waiting = state.slot(second)
    assert not waiting.called
    state.release(first)
    assert waiting.called


def test_state_clear_reset_and_one_owner() -> None:
    """clear() forgets models, loads and cache but not counters; reset() zeroes those; one fake per state."""
    clock = Clock()
    state = BackendState(cold_load=1.0, clock=clock)
    loading = state.acquire(SMOL)
    clock.advance(1)
    lease = got(loading)
    state.prefill(lease, [words(10)])
    state.remember(lease, "ok")
    state.release(lease)
    pending = state.acquire(LLAMA)
    state.clear()
    assert (state.resident, state.loading, state.entries, state.cache_used, state.ps()) == ([], [], [], 0, [])
    assert state.cold_loads == 2 and len(state.records) == 2
    clock.advance(5)
    assert not pending.called  # its load was cancelled
    state.reset()
    assert (state.cold_loads, state.evictions, state.cache_hits_tokens, state.cache_miss_tokens, state.records) == (
        0, 0, 0, 0, [])
    one, two = FakeDMR(reactor=clock), FakeDMR(reactor=clock)
    one.state = state
    assert state.clock is clock
    with pytest.raises(ValueError):
        two.state = state
    one.state = None
    two.state = state


class ClockReactor(Clock):
    """The fake's timers on a Clock; its sockets on the real reactor."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)


@pytest_twisted.async_yield_fixture
async def clocked() -> AsyncIterator[tuple[list[FakeDMR], ClockReactor]]:
    """Two fakes with three models and a BackendState each, timed by one ClockReactor."""
    clock = ClockReactor()
    fakes = [FakeDMR(("ai/smollm2", "ai/llama3.2", "ai/qwen3"), name=f"clocked-{i}", reactor=clock) for i in range(2)]
    for fake in fakes:
        fake.state = BackendState(resident_capacity=2, cold_load=2.0, base=0.02, per_token=0.00025)
        await fake.start()
    yield fakes, clock
    for fake in fakes:
        await fake.stop()


HANG = 10.0
"""Real seconds after which ``until`` and ``drive`` give up (a hang guard, not a timing check)."""


def fired(d: Deferred[Any]) -> Callable[[], bool]:
    """Whether ``d`` has its result (``d.called`` is already true while it waits on a Deferred it got)."""
    done: list[bool] = []

    def note(result: object) -> object:
        done.append(True)
        return result

    d.addBoth(note)
    return lambda: bool(done)


async def until(predicate: Any, what: str) -> None:
    """Let the real reactor run (the fake's clock stands still) until ``predicate()``."""
    deadline = reactor.seconds() + HANG
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.001)


async def drive(clock: Clock, *pending: Deferred[Any]) -> list[Any]:
    """Let real I/O run and move ``clock`` to its next timer, turn after turn, until ``pending`` all fired."""
    deadline = reactor.seconds() + HANG
    done = [fired(d) for d in pending]
    while not all(check() for check in done):
        if reactor.seconds() > deadline:
            raise AssertionError("the fake never answered")
        await deferLater(reactor, 0.001)
        due = [call.getTime() for call in clock.getDelayedCalls()]
        if due:
            clock.advance(max(0.0, min(due) - clock.seconds()))
    return [await d for d in pending]


def post(http: HTTPClient, fake: FakeDMR, path: str, body: Any) -> Deferred[tuple[IResponse, bytes]]:
    return Deferred.fromCoroutine(call(http, fake, "POST", path, body))


def chat(model: str, *contents: str, **extra: Any) -> dict[str, Any]:
    roles = itertools.cycle(["user", "assistant"])
    return {"model": model, "messages": [{"role": next(roles), "content": c} for c in contents]} | extra


@pytest_twisted.ensureDeferred
async def test_state_cold_load_before_headers_and_engines_ps(
    clocked: tuple[list[FakeDMR], ClockReactor], http: HTTPClient
) -> None:
    """Concurrent requests share one load before their headers; /engines/ps shows loading, then resident, models."""
    (fake, _), clock = clocked
    state = fake.state
    assert state is not None
    first = post(http, fake, CHAT, chat("smollm2", "hi"))
    await until(lambda: len(state.records) == 1, "the first request")  # it loads, under its name
    second = post(http, fake, CHAT, chat("AI/SmolLM2", "hi"))
    answered = fired(gatherResults([first, second], consumeErrors=True))
    await until(lambda: len(state.records) == 2, "the second request")
    assert json.loads((await call(http, fake, "GET", "/engines/ps"))[1]) == [
        {"backend_name": "llama.cpp", "model_name": "smollm2", "mode": "completion", "last_used": GO_ZERO_TIME,
         "loading": True}]
    clock.advance(2.0)  # loaded; the prefill (0.02025 s) still holds the headers
    await deferLater(reactor, 0.02)
    assert not answered()
    (one, _), (two, _) = await drive(clock, first, second)
    assert (one.code, two.code, state.cold_loads) == (200, 200, 1)
    assert [(r.cold, r.admitted - r.arrived, r.ttft) for r in state.records] == [
        (True, 2.0, pytest.approx(0.02 + 0.00025))] * 2
    for model in ("ai/llama3.2", "ai/qwen3"):
        await drive(clock, post(http, fake, CHAT, chat(model, "hi")))
    ps = json.loads((await call(http, fake, "GET", "/engines/ps"))[1])
    assert [(e["model_name"], e["mode"], "in_use" in e, "loading" in e) for e in ps] == [
        ("ai/llama3.2", "completion", False, False), ("ai/qwen3", "completion", False, False)]
    assert (state.resident, state.cold_loads, state.evictions) == ([LLAMA, QWEN], 3, 1)


@pytest_twisted.ensureDeferred
async def test_state_second_turn_is_cached_only_where_the_first_ran(
    clocked: tuple[list[FakeDMR], ClockReactor], http: HTTPClient
) -> None:
    """Turn 2 on the same fake pays for its new tokens only, on another fake for all; a stream's headers
    come before the prefill."""
    (here, there), clock = clocked
    system, question = "answer briefly " * 100, words(1800)  # 2000 tokens
    turn1 = {"model": "ai/smollm2", "messages": [{"role": "system", "content": system},
                                                 {"role": "user", "content": question}]}
    (_, body), = await drive(clock, post(http, here, CHAT, turn1))
    answer = json.loads(body)["choices"][0]["message"]
    turn2 = turn1 | {"stream": True, "messages": [*turn1["messages"], answer,
                                                  {"role": "user", "content": "and then? " * 10}]}
    for fake in (here, there):
        assert fake.state is not None
        if fake is there:
            await drive(clock, post(http, fake, CHAT, chat("ai/smollm2", "warm up")))
        pending = http.post(fake.url + CHAT, data=json.dumps(turn2).encode(), unbuffered=True)
        await until(fired(pending), "the stream's headers")  # the clock stands still: no prefill yet
        response = await pending
        record = fake.state.records[-1]
        assert response.code == 200 and record.first_token is None and record.prompt_tokens == 2022
        reader = EventReader()
        response.deliverBody(reader)
        assert await drive(clock, reader.done) == [True] and reader.events[-1] == "[DONE]"
        assert record.latency == pytest.approx(record.ttft)
    mine, theirs = here.state.records[-1], there.state.records[-1]  # type: ignore[union-attr]
    assert (mine.cached_tokens, mine.ttft) == (2002, pytest.approx(0.02 + 20 * 0.00025))
    assert (theirs.cached_tokens, theirs.ttft) == (0, pytest.approx(0.02 + 2022 * 0.00025))
    assert here.state.cache_hits_tokens == 2002  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_state_anthropic_and_responses_turns_reuse_the_cache(
    clocked: tuple[list[FakeDMR], ClockReactor], http: HTTPClient
) -> None:
    """Anthropic prompts are system + messages; a Responses chain replays its inputs and outputs."""
    (fake, _), clock = clocked
    state = fake.state
    assert state is not None
    first = {"model": "ai/smollm2", "max_tokens": 64, "system": "be brief",
             "messages": [{"role": "user", "content": words(100)}]}
    (_, body), = await drive(clock, post(http, fake, "/anthropic/v1/messages", first))
    reply = {"role": "assistant", "content": json.loads(body)["content"]}
    second = first | {"stream": True, "messages": [*first["messages"], reply, {"role": "user", "content": "go on"}]}
    await drive(clock, post(http, fake, "/anthropic/v1/messages", second))
    await drive(clock, post(http, fake, "/anthropic/v1/messages/count_tokens", second))
    one = {"model": "ai/llama3.2", "instructions": "be brief", "input": words(100)}
    (_, body), = await drive(clock, post(http, fake, "/v1/responses", one))
    two = one | {"previous_response_id": json.loads(body)["id"], "input": "go on", "stream": True}
    await drive(clock, post(http, fake, "/v1/responses", two))
    assert [(r.endpoint, r.cold, r.prompt_tokens, r.cached_tokens, r.first_token is None) for r in state.records] == [
        ("messages", True, 102, 0, False), ("messages", False, 106, 104, False),
        ("messages/count_tokens", False, 0, 0, True),
        ("responses", True, 102, 0, False), ("responses", False, 108, 106, False)]  # "Hello, world! [turn 1]"


@pytest_twisted.ensureDeferred
async def test_state_stop_and_reset_forget_everything(
    clocked: tuple[list[FakeDMR], ClockReactor], http: HTTPClient
) -> None:
    """A stopped (restarted) fake has nothing loaded or cached; reset() also zeroes the counters."""
    (fake, _), clock = clocked
    state = fake.state
    assert state is not None
    prompt = chat("ai/smollm2", words(300))
    await drive(clock, post(http, fake, CHAT, prompt))
    assert (state.resident, state.entries) == ([SMOL], [(SMOL, 302)])
    port = fake.port
    await fake.stop()
    assert (state.resident, state.entries, state.cold_loads) == ([], [], 1)
    await fake.start(port)
    assert (await call(http, fake, "GET", "/engines/ps"))[1] == b"[]\n"
    await drive(clock, post(http, fake, CHAT, prompt))
    assert [(r.cold, r.cached_tokens) for r in state.records] == [(True, 0), (True, 0)] and state.cold_loads == 2
    fake.reset()
    assert fake.state is state and (state.resident, state.records, state.cold_loads) == ([], [], 0)


# -- BackendState: engine knobs (prefill turns, batches, contention, sharing, cache bounds, tokens) --------------


def test_state_prefill_parallel_takes_turns_across_models() -> None:
    """prefill_parallel=1: one prefill at a time per endpoint, FIFO, whatever the model; the others wait."""
    clock = Clock()
    state = BackendState(cold_load=0, base=0.01, per_token=0.001, prefill_parallel=1, clock=clock)
    a, b, c = got(state.acquire(SMOL)), got(state.acquire(LLAMA)), got(state.acquire(SMOL))
    first, second, third = (fired(state.begin(lease, [words(n)])) for lease, n in ((a, 90), (b, 40), (c, 40)))
    assert (state.prefilling, state.waiting, state.max_queue) == (1, 2, 2)
    clock.advance(0.1)
    assert first() and not second() and state.prefilling == 1
    clock.advance(0.05)
    assert second() and not third()
    clock.advance(0.05)
    assert third() and (state.prefilling, state.waiting) == (0, 0)
    assert [r.queued for r in state.records] == [0, pytest.approx(0.1), pytest.approx(0.15)]
    assert state.queue_wait == pytest.approx(0.25)
    unbounded = BackendState(cold_load=0, base=0.01, per_token=0.001, clock=Clock())
    leases = [got(unbounded.acquire(SMOL)) for _ in range(3)]
    for lease in leases:
        unbounded.begin(lease, [words(90)])
    assert (unbounded.prefilling, unbounded.max_queue) == (3, 0)


def test_state_contention_slows_a_prefill_that_starts_beside_others() -> None:
    """The work (not base) of a prefill costs 1 + contention × (running − 1) more, fixed when it starts."""
    clock = Clock()
    state = BackendState(cold_load=0, base=0.01, per_token=0.001, contention=0.5, clock=clock)
    a, b, c = (got(state.acquire(SMOL)) for _ in range(3))
    first = fired(state.begin(a, [words(100)]))  # alone: 0.01 + 0.1
    clock.advance(0.05)
    second = fired(state.begin(b, [words(100)]))  # beside one: 0.01 + 0.1 × 1.5
    clock.advance(0.06)
    assert first() and not second()
    third = fired(state.begin(c, [words(100)]))  # beside one again (the first ended): 0.01 + 0.15
    clock.advance(0.16 - 0.06 - 0.001)
    assert not second()
    clock.advance(0.001)
    assert second() and not third()
    assert [round(r.ttft, 6) for r in state.records[:2]] == [0.11, 0.16]
    clock.advance(0.16)
    assert third() and state.records[2].ttft == pytest.approx(0.16)


def test_state_batches_share_one_slower_batch_or_wait_for_it() -> None:
    """batch: prefills waiting when the engine is free run as one batch (all first tokens at its end);
    a prefill arriving during a batch waits for the next one; batch_window gathers simultaneous ones."""
    clock = Clock()
    state = BackendState(cold_load=0, base=0.01, per_token=0.001, batch=True, contention=0.5, clock=clock)
    a, b, c = (got(state.acquire(SMOL)) for _ in range(3))
    first = fired(state.begin(a, [words(100)]))  # a batch of one: 0.01 + 0.1
    clock.advance(0.02)
    second, third = fired(state.begin(b, [words(100)])), fired(state.begin(c, [words(60)]))
    assert state.prefilling == 1 and state.waiting == 2
    clock.advance(0.09)
    assert first() and not second() and state.prefilling == 2  # the next batch: both at once
    clock.advance(0.01 + 0.16 * 1.5 - 0.001)
    assert not second() and not third()
    clock.advance(0.001)
    assert second() and third() and [r.ttft for r in state.records[1:]] == [pytest.approx(0.25)] * 2
    gathered = BackendState(cold_load=0, base=0.01, per_token=0.001, batch=True, batch_window=0.005, clock=clock)
    x, y = got(gathered.acquire(SMOL)), got(gathered.acquire(SMOL))
    one = fired(gathered.begin(x, [words(100)]))
    clock.advance(0.004)
    two = fired(gathered.begin(y, [words(100)]))
    assert (gathered.prefilling, gathered.waiting, gathered.max_queue) == (0, 0, 0)  # gathering, not queued
    clock.advance(0.001)  # the window closes: one batch of both
    assert gathered.prefilling == 2
    clock.advance(0.01 + 0.2 - 0.0001)
    assert not one() and not two()
    clock.advance(0.0001)
    assert one() and two() and [r.queued for r in gathered.records] == [pytest.approx(0.005), pytest.approx(0.001)]


def test_state_machine_contention_counts_other_endpoints_prefills() -> None:
    """States sharing a Machine: a prefill starting while another endpoint prefills costs machine_contention more."""
    clock = Clock()
    machine = Machine()
    here, there = (BackendState(cold_load=0, base=0.01, per_token=0.001, machine=machine, machine_contention=1.0,
                                clock=clock) for _ in range(2))
    alone = BackendState(cold_load=0, base=0.01, per_token=0.001, machine_contention=1.0, clock=clock)
    a, b, c = got(here.acquire(SMOL)), got(there.acquire(SMOL)), got(alone.acquire(SMOL))
    here.begin(a, [words(100)])
    assert machine.prefilling == 1
    slowed, unaffected = fired(there.begin(b, [words(100)])), fired(alone.begin(c, [words(100)]))
    clock.advance(0.11)
    assert unaffected() and not slowed() and machine.prefilling == 1
    clock.advance(0.1)
    assert slowed() and there.records[0].ttft == pytest.approx(0.21) and machine.prefilling == 0


def test_state_share_busy_false_keeps_a_running_requests_prefix() -> None:
    """share_busy=False: the entry a running request matched is its own until it ends (others prefill
    it all); its complete answer leaves its prompt (+ answer) cached, an incomplete one the old entry."""
    for share in (True, False):
        state = BackendState(cold_load=0, base=0.0, per_token=0.001, share_busy=share, clock=Clock())
        head = words(200, "h")
        warm = got(state.acquire(SMOL))
        state.prefill(warm, [head])
        state.remember(warm, "done")
        state.release(warm)
        one, two = got(state.acquire(SMOL)), got(state.acquire(SMOL))
        state.prefill(one, [head, "one more"])
        state.prefill(two, [head, "two more"])
        assert [r.cached_tokens for r in state.records[1:]] == ([200, 200] if share else [200, 0])
        assert state.lookup(SMOL, [head, "x"]) == (200 if share else 0)
        if share:
            continue
        state.release(one)  # ended without an answer: the entry it held is back
        assert state.lookup(SMOL, [head, "x"]) == 200 and state.entries == [(SMOL, 201)]
        three = got(state.acquire(SMOL))
        state.prefill(three, [head, "three more"])
        state.remember(three, "answer")
        assert state.lookup(SMOL, [head, "x"]) == 200 and state.entries == [(SMOL, 203)]  # its prompt + answer
        state.release(three)
        state.release(two)


def test_state_cache_prompts_bounds_the_entries() -> None:
    """cache_prompts: at most that many entries, the least recently used dropped first."""
    for bound, kept in ((0, 4), (2, 2)):
        state = BackendState(cold_load=0, cache_prompts=bound, clock=Clock())
        lease = got(state.acquire(SMOL))
        prompts = [[f"conversation{n} " + words(99)] for n in range(4)]
        for prompt in prompts:
            state.prefill(lease, prompt)
            state.remember(lease)
        assert len(state.entries) == kept
        assert [state.lookup(SMOL, p) for p in prompts] == ([99] * 4 if not bound else [0, 0, 99, 99])


def test_state_recompute_answer_caches_the_prompt_only() -> None:
    """recompute_answer: the next turn, which sends the answer back, prefills it again."""
    for recompute, cached in ((False, 104), (True, 101)):
        state = BackendState(cold_load=0, recompute_answer=recompute, clock=Clock())
        lease = got(state.acquire(SMOL))
        turn1 = ["be brief", words(99)]  # 101 words
        state.prefill(lease, turn1)
        state.remember(lease, "the answer here")
        state.prefill(lease, [*turn1, "the answer here", "and now?"])
        assert lease.record.cached_tokens == cached and state.entries[0][1] == (101 if recompute else 104)


def test_state_per_token_ctx_and_slot_switch_price_the_prefill() -> None:
    """per_token_ctx: tokens cost more further into the context; slot_switch: a prefill with under 10 % of
    its prompt cached costs more."""
    state = BackendState(cold_load=0, base=0.01, per_token=0.001, per_token_ctx=0.00001, slot_switch=0.02,
                         clock=Clock())
    lease = got(state.acquire(SMOL))
    assert state.prefill(lease, [words(100)]) == pytest.approx(0.01 + 0.02 + 0.1 + 0.00001 * 100 * 100 / 2)
    state.remember(lease)
    assert state.prefill(lease, [words(100), words(50, "x")]) == pytest.approx(0.01 + 0.05 + 0.00001 * (150 ** 2 - 100 ** 2) / 2)
    assert state.prefill(lease, [words(5), words(95, "y")]) == pytest.approx(0.01 + 0.02 + 0.095 + 0.00001 * (100 ** 2 - 5 ** 2) / 2)
    plain = BackendState(cold_load=0, base=0.01, per_token=0.001, clock=Clock())
    assert plain.prefill(got(plain.acquire(SMOL)), [words(100)]) == pytest.approx(0.11)


def test_state_tokenizer_chars_and_message_tokens() -> None:
    """tokenizer="chars": a character is a token; message_tokens: template tokens around every message."""
    chars = BackendState(cold_load=0, tokenizer="chars", message_tokens=11, clock=Clock())
    assert len(chars.prompt(["hello there"])) == 33  # the real ai/small: 11 + 11 + 11
    assert len(chars.prompt(["abc", "hello there"])) == 47
    words_state = BackendState(cold_load=0, message_tokens=2, clock=Clock())
    assert len(words_state.prompt(["hello there", "x"])) == 2 + 2 + 2 + 1 + 2
    assert len(BackendState(clock=Clock()).prompt(["hello there", "x"])) == 3
    lease = got(chars.acquire(SMOL))
    chars.prefill(lease, ["system text", "question"])
    chars.remember(lease, " sun model")
    assert chars.entries == [(SMOL, 11 + 11 + 11 + 8 + 11 + 10)]
    assert chars.lookup(SMOL, ["system text", "question", " sun model", "next"]) == 52 + 10
    with pytest.raises(ValueError):
        BackendState(tokenizer="bpe")


def test_state_withdrawn_prefills_free_their_turn() -> None:
    """Cancelling a waiting or running prefill (or releasing its lease) gives its turn to the next one."""
    for batch in (False, True):
        clock = Clock()
        state = BackendState(cold_load=0, base=0.01, per_token=0.001, prefill_parallel=1, batch=batch, clock=clock)
        a, b, c = (got(state.acquire(SMOL)) for _ in range(3))
        running, waiting, last = state.begin(a, [words(100)]), state.begin(b, [words(100)]), state.begin(c, [words(10)])
        done = fired(last)
        waiting.addErrback(lambda failure: failure.trap(CancelledError))
        waiting.cancel()
        assert state.waiting == 1
        state.release(a)  # the running one goes: the last one starts now
        assert not running.called and state.prefilling == 1 and state.waiting == 0
        clock.advance(0.02)
        assert done() and clock.getDelayedCalls() == []


def test_state_presets() -> None:
    """real_engine() and gpu_kv(): the calibrated knobs, overridable."""
    real = BackendState.real_engine(clock=Clock(), slots=2)
    assert (real.slots, real.share_busy, real.recompute_answer, real.batch, real.tokenizer, real.context) == (
        2, False, True, True, "chars", 4096)
    assert real.per_token_ctx > 0 and real.contention > 0 and real.cache_tokens >= 1 << 24
    gpu = BackendState.gpu_kv(clock=Clock())
    assert (gpu.prefill_parallel, gpu.base, gpu.per_token, gpu.cache_prompts, gpu.share_busy, gpu.batch) == (
        1, 0.015, 0.0001, 6, True, False)
    default = BackendState(clock=Clock())
    assert (default.prefill_parallel, default.contention, default.batch, default.share_busy, default.cache_prompts,
            default.recompute_answer, default.tokenizer, default.per_token_ctx) == (0, 0.0, False, True, 0, False,
                                                                                  "words", 0.0)


@pytest_twisted.ensureDeferred
async def test_state_answers_carry_its_counts_and_the_context_bound(http: HTTPClient) -> None:
    """With a state: usage and timings report its tokens (cached, computed, prefill time); a prompt
    over ``context`` gets llama.cpp's 400 with the numbers; a stream's prefill waits for its turn."""
    clock = ClockReactor()
    fake = FakeDMR(("ai/small",), reactor=clock)
    fake.state = BackendState(cold_load=0, base=0.01, per_token=0.001, tokenizer="chars", message_tokens=1,
                              context=300, recompute_answer=True, prefill_parallel=1)
    await fake.start()
    try:
        turn1 = chat("ai/small", "x" * 100)
        (_, body), = await drive(clock, post(http, fake, CHAT, turn1))
        answer = json.loads(body)
        usage, timings = answer["usage"], answer["timings"]
        assert usage["prompt_tokens"] == 102 and usage["prompt_tokens_details"] == {"cached_tokens": 0}
        assert (timings["cache_n"], timings["prompt_n"], timings["prompt_ms"]) == (0, 102, pytest.approx(112.0))
        turn2 = chat("ai/small", "x" * 100, answer["choices"][0]["message"]["content"], "y" * 10,
                     stream=True, stream_options={"include_usage": True})
        state = fake.state
        first = post(http, fake, CHAT, turn2)
        await until(lambda: state.prefilling == 1, "the stream's prefill")  # the clock stands still
        second = post(http, fake, CHAT, chat("ai/small", "z" * 50))
        await until(lambda: state.waiting == 1, "the second request waiting for its turn")
        (_, streamed), (_, other) = await drive(clock, first, second)
        events = [json.loads(e[len("data: "):]) for e in streamed.decode().split("\n\n") if e.startswith("data: {")]
        final = events[-1]
        assert final["usage"]["prompt_tokens"] == 127 and final["timings"]["cache_n"] == 102  # the answer again
        assert final["timings"]["prompt_n"] == 25 and final["timings"]["prompt_ms"] == pytest.approx(35.0)
        assert json.loads(other)["timings"]["prompt_ms"] == pytest.approx(61.0)  # its template token is cached
        one, two = state.records[-2:]  # the second waited for the stream's turn
        assert one.queued == 0 and two.queued == pytest.approx(one.ttft) and state.max_queue == 1
        (response, body), = await drive(clock, post(http, fake, CHAT, chat("ai/small", "w" * 299)))
        assert response.code == 400 and json.loads(body)["error"] == {
            "code": 400, "message": "request (301 tokens) exceeds the available context size (300 tokens), try "
            "increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 301, "n_ctx": 300}
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_health_route_knob(fake: FakeDMR, http: HTTPClient) -> None:
    """GET /engines/health: DMR's 404 by default (it has no such route), llama-server's 200 with the knob."""
    response, body = await call(http, fake, "GET", "/engines/health")
    assert (response.code, body) == (404, b"not found\n")
    fake.health_route = True
    response, body = await call(http, fake, "GET", "/engines/health")
    assert (response.code, body, header(response, "content-type")) == (
        200, b'{"status":"ok"}', ["application/json; charset=utf-8"])
    fake.reset()
    assert (await call(http, fake, "GET", "/engines/health"))[0].code == 404


@pytest.mark.slow
def test_serve_runs_fakes_in_their_own_process() -> None:
    """``python tests/fakedmr.py serve``: READY with the ports, health, answers with the preset's tokens,
    ``/fake/stats`` counters, ``/fake/reset``; SIGTERM ends it."""
    import os
    import select
    import signal
    import subprocess
    import sys
    import urllib.request

    script = os.path.join(os.path.dirname(__file__), "fakedmr.py")
    proc = subprocess.Popen([sys.executable, script, "serve", "--port", "0", "--port", "0", "--preset", "gpukv",
                             "--tokens", "3", "--token-interval", "0", "--cache-prompts", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 30)  # READY comes within a second or two
        line = proc.stdout.readline() if readable else ""
        assert line.startswith("READY "), (line, proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
        ports = [int(p) for p in line.split()[1:]]
        assert len(ports) == 2 and all(ports)

        def fetch(port: int, path: str, body: Any = None) -> Any:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                             method="POST" if data is not None or path == "/fake/reset" else "GET")
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())

        assert fetch(ports[0], "/engines/health") == {"status": "ok"}
        prompt = {"model": "ai/small", "messages": [{"role": "user", "content": words(100)}]}
        for _ in range(2):
            answer = fetch(ports[0], CHAT, prompt)
        assert answer["choices"][0]["message"]["content"] == " sun model code" and answer["timings"]["cache_n"] == 99
        stats = fetch(ports[0], "/fake/stats?records=1")
        assert (stats["requests"], stats["cache_miss_tokens"], stats["cache_hits_tokens"], stats["cache_entries"]) == (
            2, 101, 99, 1)
        assert [r["cached_tokens"] for r in stats["records"]] == [0, 99] and fetch(ports[1], "/fake/stats")["requests"] == 0
        assert fetch(ports[0], "/fake/reset") == {"reset": True}
        assert fetch(ports[0], "/fake/stats")["cache_miss_tokens"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    assert proc.returncode == 0


def test_state_share_busy_false_takes_over_only_similar_entries() -> None:
    """share_busy=False, like llama.cpp: a request matching under 10 % of its prompt, or keeping under half
    of the entry, leaves the entry usable by others (another slot, or a saved copy, serves it)."""
    state = BackendState(cold_load=0, share_busy=False, clock=Clock())
    head, long_entry = words(200, "h"), words(300, "t")
    warm = got(state.acquire(SMOL))
    state.prefill(warm, [head, long_entry])  # one entry of 500 words
    state.remember(warm)
    state.release(warm)
    little = got(state.acquire(SMOL))
    state.prefill(little, [head[:2], words(100, "u")])  # shares 'h0' only (< 10 %)
    half = got(state.acquire(SMOL))
    state.prefill(half, [head, words(100, "v")])  # keeps 200 of 500 (< half): a copy stays
    most = got(state.acquire(SMOL))
    state.prefill(most, [head, long_entry, "more"])  # keeps it all: takes it over
    other = got(state.acquire(SMOL))
    state.prefill(other, [head, long_entry, "else"])
    assert [r.cached_tokens for r in state.records] == [0, 1, 200, 500, 0]


def test_state_share_computed_matches_a_queued_prefill_when_it_starts() -> None:
    """share_computed (a GPU engine with prefix caching): with one prefill at a time, a request queued behind
    another with the same head reuses it once that prefill is done; without it, both compute the head."""
    for share in (False, True):
        clock = Clock()
        state = BackendState(cold_load=0, base=0.01, per_token=0.001, prefill_parallel=1, share_computed=share,
                             clock=clock)
        head = words(300, "h")
        one, two = got(state.acquire(SMOL)), got(state.acquire(SMOL))
        first, second = fired(state.begin(one, [head, "alpha one"])), fired(state.begin(two, [head, "beta two"]))
        clock.advance(0.01 + 0.302)
        assert first() and not second()
        clock.advance(0.01 + 0.002)
        assert second() is share  # it computed two new words only
        clock.advance(0.302)
        assert second()
        assert [r.cached_tokens for r in state.records] == ([0, 300] if share else [0, 0])
        state.release(one)
        state.release(two)
