"""End-to-end: the real service tree on a real port, a fake DMR behind it, real clients in front."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from conftest import config_for, in_thread, within
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

PREFIXES = ["/olla/dmr/engines/v1", "/olla/dmr/engines/llama.cpp/v1", "/olla/dmr/engines/vllm/v1"]
CHAT = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest_twisted.ensureDeferred
async def test_openai_sdk_models_and_chat_on_every_engine_prefix(daemon_factory, fake, prefix):
    """The OpenAI SDK lists models and chats through each DMR prefix; the upstream path is the DMR path."""
    daemon = await daemon_factory(config_for(fake))
    client = daemon.openai(prefix)
    models = await in_thread(client.models.list)
    assert sorted(m.id for m in models.data) == ["ai/llama3.2", "ai/smollm2"]
    raw = await in_thread(
        client.chat.completions.with_raw_response.create, model="ai/smollm2", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello, world!"
    assert raw.headers["x-olla-endpoint"] == "fake-a"
    assert raw.headers["x-olla-model"] == "ai/smollm2"
    assert raw.headers["x-olla-backend-type"] == "docker-model-runner"
    assert raw.headers["x-olla-response-time"].endswith("ms")
    assert raw.headers["x-olla-request-id"]
    assert fake.inference_requests[-1].uri == prefix[len("/olla/dmr") :] + "/chat/completions"


@pytest_twisted.ensureDeferred
async def test_openai_sdk_streaming_completions_and_embeddings(daemon_factory, fake):
    """Streaming chat, text completions and embeddings (the SDK's base64 default) all work through the proxy."""
    daemon = await daemon_factory(config_for(fake))
    client = daemon.openai()

    def stream_chat() -> str:
        parts = []
        for chunk in client.chat.completions.create(
            model="ai/smollm2", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    assert await in_thread(stream_chat) == "Hello, world!"
    completion = await in_thread(client.completions.create, model="smollm2", prompt="Docker is")
    assert completion.choices[0].text == "Hello, world!"
    embedding = await in_thread(client.embeddings.create, model="ai/smollm2", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8
    sent = fake.inference_requests[-1]
    assert sent.json()["encoding_format"] == "base64"


@pytest_twisted.ensureDeferred
async def test_upstream_answers_pass_through_unchanged(daemon_factory, fake):
    """DMR's plain-text errors and llama.cpp's JSON errors reach the client byte for byte, status and type included."""
    daemon = await daemon_factory(config_for(fake))
    fake.load_failure = True
    response, body = await daemon.post_json("/olla/dmr/engines/v1/chat/completions", CHAT)
    assert response.code == 500
    assert body.startswith(b"unable to load runner: ")
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]
    assert response.headers.getRawHeaders(b"x-content-type-options") == [b"nosniff"]
    fake.load_failure = False
    overflow = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "OVERFLOW"}]}
    response, body = await daemon.post_json("/olla/dmr/engines/v1/chat/completions", overflow)
    assert response.code == 400
    assert json.loads(body)["error"]["type"] == "exceed_context_size_error"
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    assert response.headers.getRawHeaders(b"server") == [b"llama.cpp"]


@pytest_twisted.ensureDeferred
async def test_request_headers_sent_upstream(daemon_factory, fake):
    """Upstream sees request id, X-Forwarded-*, endpoint headers; not hop-by-hop headers nor client credentials."""
    config = config_for(fake, endpoint0={"headers": {"X-Team": "research"}})
    daemon = await daemon_factory(config)
    response, _ = await daemon.post_json(
        "/olla/dmr/engines/v1/chat/completions?trace=1",
        CHAT,
        {
            "x-request-id": "client-id-42",
            "x-forwarded-for": "10.1.1.1",
            "connection": "keep-alive, X-Secret-Hop",
            "x-secret-hop": "1",
            "keep-alive": "timeout=5",
            "authorization": "Bearer sk-user",
            "x-olla-endpoint": "spoof",
        },
    )
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-olla-request-id") == [b"client-id-42"]
    sent = fake.inference_requests[-1]
    assert sent.uri == "/engines/v1/chat/completions?trace=1"
    assert sent.headers["x-olla-request-id"] == ["client-id-42"]
    assert sent.headers["x-forwarded-for"] == ["10.1.1.1, 127.0.0.1"]
    assert sent.headers["x-forwarded-host"] == [f"127.0.0.1:{daemon.port}"]
    assert sent.headers["x-forwarded-proto"] == ["http"]
    assert sent.headers["x-team"] == ["research"]
    for dropped in ("x-secret-hop", "keep-alive", "authorization", "x-olla-endpoint"):
        assert dropped not in sent.headers, dropped
    assert json.loads(sent.body) == CHAT


@pytest_twisted.ensureDeferred
async def test_request_id_generated_when_client_id_is_unusable(daemon_factory, fake):
    """A missing or over-long X-Request-ID gets a fresh unique id, on errors too."""
    daemon = await daemon_factory(config_for(fake))
    first, _ = await daemon.request("GET", "/nope", headers={"x-request-id": "x" * 129})
    second, _ = await daemon.request("GET", "/nope")
    ids = [r.headers.getRawHeaders(b"x-olla-request-id")[0] for r in (first, second)]
    assert ids[0] != ids[1] and all(ids) and b"x" * 129 not in ids


@pytest.mark.parametrize(
    "method,path,body,status,code",
    [
        ("POST", "/olla/dmr/engines/v1/chat/completions", b"{not json", 400, "invalid_json"),
        ("POST", "/olla/dmr/engines/v1/chat/completions", b'{"messages": []}', 400, "model_required"),
        ("POST", "/olla/dmr/engines/v1/embeddings", b'{"model": 7}', 400, "invalid_model"),
        ("POST", "/olla/dmr/engines/v1/completions", b"[1, 2]", 400, "invalid_json"),
        ("POST", "/olla/dmr/engines/v1/completions", b"", 400, "invalid_json"),
        ("GET", "/olla/dmr/metrics", None, 404, "unknown_route"),
        ("POST", "/olla/dmr/engines/_configure", b"{}", 403, "management_not_forwarded"),
        ("DELETE", "/olla/dmr/models/ai/smollm2", None, 403, "management_not_forwarded"),
        ("POST", "/olla/dmr/models", b"{}", 405, "method_not_allowed"),
        ("GET", "/olla/dmr/engines/sglang/v1/models", None, 404, "unknown_route"),
        ("GET", "/elsewhere", None, 404, "unknown_route"),
        ("GET", "/olla/dmr/engines/v1/chat/completions", None, 405, "method_not_allowed"),
        ("DELETE", "/olla/dmr/engines/v1/models", None, 405, "method_not_allowed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_daemon_errors_are_openai_shaped(daemon_factory, fake, method, path, body, status, code):
    """Bad input gets the right status and an OpenAI-shaped JSON error; nothing reaches the upstream."""
    daemon = await daemon_factory(config_for(fake))
    response, data = await daemon.request(method, path, body, {"content-type": "application/json"})
    assert response.code == status
    error = json.loads(data)["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert response.headers.getRawHeaders(b"x-olla-request-id")
    if status == 405:
        assert b"POST" in response.headers.getRawHeaders(b"allow")[0] or b"GET" in response.headers.getRawHeaders(b"allow")[0]
    assert fake.inference_requests == []


@pytest_twisted.ensureDeferred
async def test_body_over_limit_gets_413(daemon_factory, fake):
    """A body over server.request_limits.max_body_size is refused with 413, by length and when chunked."""
    config = config_for(fake, server={"request_limits": {"max_body_size": "1KB"}})
    daemon = await daemon_factory(config)
    big = json.dumps({"model": "ai/smollm2", "prompt": "x" * 2000}).encode()
    response, data = await daemon.request("POST", "/olla/dmr/engines/v1/completions", big)
    assert response.code == 413
    assert json.loads(data)["error"]["code"] == "request_too_large"
    small = json.dumps({"model": "ai/smollm2", "prompt": "x" * 100}).encode()
    response, _ = await daemon.request("POST", "/olla/dmr/engines/v1/completions", small)
    assert response.code == 200
    assert len(fake.inference_requests) == 1


class _Collector(Protocol):
    """Collects a streamed body, firing ``first`` on the first chunk and ``done`` at the end."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.first: Deferred[bytes] = Deferred()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if not self.first.called:
            self.first.callback(data)

    def connectionLost(self, reason=ResponseDone()):
        self.done.callback(b"".join(self.chunks))


async def _stream(daemon, body=None):
    payload = json.dumps(body or {**CHAT, "stream": True}).encode()
    from twisted.web.client import FileBodyProducer
    import io

    response = await daemon.agent.request(
        b"POST",
        (daemon.base + "/olla/dmr/engines/v1/chat/completions").encode(),
        Headers({b"content-type": [b"application/json"]}),
        FileBodyProducer(io.BytesIO(payload)),
    )
    collector = _Collector()
    response.deliverBody(collector)
    return response, collector


@pytest_twisted.ensureDeferred
async def test_first_sse_chunk_arrives_while_upstream_holds_the_rest(daemon_factory, fake):
    """No buffering: the client gets the first event while the fake still holds the others; SSE headers are set."""
    daemon = await daemon_factory(config_for(fake))
    fake.hold = Deferred()
    response, collector = await _stream(daemon)
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert response.headers.getRawHeaders(b"cache-control") == [b"no-cache"]
    assert response.headers.getRawHeaders(b"x-accel-buffering") == [b"no"]
    first = await within(collector.first, 5, "first SSE chunk")
    assert b'"role":"assistant"' in first
    assert not collector.done.called and b"[DONE]" not in b"".join(collector.chunks)
    fake.hold.callback(None)
    body = await within(collector.done, 5, "end of stream")
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: ") == 7


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_upstream(daemon_factory, fake):
    """A client leaving mid-stream closes the upstream request within a second."""
    daemon = await daemon_factory(config_for(fake))
    fake.hold = Deferred()
    response, collector = await _stream(daemon)
    await within(collector.first, 5, "first SSE chunk")
    assert fake.active == 1
    collector.transport.stopProducing()  # the client goes away
    await within(fake.when_disconnected(), 1.0, "upstream cancellation")
    assert fake.active == 0
    assert len(daemon.parts.inflight) == 0


@pytest_twisted.ensureDeferred
async def test_upstream_unreachable_gives_502_naming_the_endpoint(daemon_factory, fake):
    """An endpoint that dies between health checks: the client gets a 502 that names it."""
    daemon = await daemon_factory(config_for(fake))
    await fake.stop()
    response, data = await daemon.post_json("/olla/dmr/engines/v1/chat/completions", CHAT)
    assert response.code == 502
    error = json.loads(data)["error"]
    assert "fake-a" in error["message"] and "refused" in error["message"]
    # the endpoint is now known to be offline: the next request is answered 503 with Retry-After
    response, data = await daemon.post_json("/olla/dmr/engines/v1/chat/completions", CHAT)
    assert response.code == 503
    assert response.headers.getRawHeaders(b"retry-after")
    assert json.loads(data)["error"]["code"] in ("no_endpoints_available", "model_unavailable")
    await fake.start(fake.port)


@pytest_twisted.ensureDeferred
async def test_no_headers_within_response_header_timeout_gives_504(daemon_factory, fake):
    """An upstream that sends no headers within proxy.response_header_timeout gets the client a 504."""
    daemon = await daemon_factory(config_for(fake, proxy={"response_header_timeout": "200ms"}))
    fake.header_delay = 5.0
    response, data = await daemon.post_json("/olla/dmr/engines/v1/chat/completions", CHAT)
    assert response.code == 504
    assert "response_header_timeout" in json.loads(data)["error"]["message"]
    await within(fake.when_disconnected(), 1.0, "upstream cancellation after the timeout")


@pytest_twisted.ensureDeferred
async def test_mid_stream_error_and_truncation_are_never_a_fake_done(daemon_factory, fake):
    """An upstream error event passes through; a cut stream ends with an SSE error event, never [DONE]."""
    daemon = await daemon_factory(config_for(fake))
    fake.midstream_error = True
    _, collector = await _stream(daemon)
    body = await within(collector.done, 5, "end of stream")
    assert b'data: {"error"' in body and b"[DONE]" not in body
    assert body.count(b'data: {"error"') == 1  # the upstream's own; nothing added
    fake.midstream_error = False
    fake.truncate_stream = True
    _, collector = await _stream(daemon)
    body = await within(collector.done, 5, "end of stream")
    assert b"[DONE]" not in body and b'"finish_reason":"stop"' not in body
    last = body.strip().split(b"\n\n")[-1]
    assert json.loads(last[len(b"data: ") :])["error"]["code"] == "upstream_truncated"
