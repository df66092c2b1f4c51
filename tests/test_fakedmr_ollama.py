"""The fake DMR's Ollama layer (``/api/*``), management routes and aliases, as checked against the real
DMR bundle (``test_fakedmr_ollama_real.py`` compares the two route by route)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from test_fakedmr import fake, http  # noqa: F401  (the same fixtures: a fresh fake, a treq client)
from fakedmr import (
    GO_ZERO_TIME, MODEL_BYTES, OLLAMA_REQUESTS, BackendState, FakeDMR, _go_decode, _GoDecodeError, _go_duration,
    _OllamaWriter, _openai_messages, _parse_keep_alive,
)

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
CHAT_BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "hi there"}]}
GENERATE_BODY = {"model": "ai/smollm2", "prompt": "hi there"}


async def call(
    http: HTTPClient, fake: FakeDMR, method: str, path: str, body: Any = None, **kwargs: Any
) -> tuple[IResponse, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = await http.request(method, fake.url + path, data=data, allow_redirects=False, **kwargs)
    return response, await response.content()


def header(response: IResponse, name: str) -> list[str] | None:
    return response.headers.getRawHeaders(name)


class Lines(Protocol):
    """Collects an NDJSON body as it arrives; ``done`` fires with whether it ended cleanly."""

    def __init__(self) -> None:
        self.data = b""
        self.first: Deferred[None] = Deferred()
        self.done: Deferred[bool] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data and not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback(reason.check(ResponseDone) is not None)

    @property
    def lines(self) -> list[dict[str, Any]]:
        assert not self.data or self.data.endswith(b"\n"), self.data
        return [json.loads(line) for line in self.data.split(b"\n")[:-1]]


async def stream(http: HTTPClient, fake: FakeDMR, path: str, body: Any) -> tuple[IResponse, Lines]:
    response = await http.post(fake.url + path, data=json.dumps(body).encode(), unbuffered=True)
    reader = Lines()
    response.deliverBody(reader)
    return response, reader


def go_time(text: str) -> float:
    """Seconds since the epoch of a Go RFC 3339 UTC time."""
    assert TIME.match(text), text
    whole, _, fraction = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float("0." + (fraction or "0"))


# -- read-only Ollama routes -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_version_tags_and_show(fake: FakeDMR, http: HTTPClient) -> None:
    """/api/version is a constant, /api/tags one entry per model, /api/show only ``details``."""
    response, body = await call(http, fake, "GET", "/api/version")
    assert (response.code, header(response, "content-type"), body) == (200, ["application/json"],
                                                                       b'{"version":"0.1.0"}\n')
    response, body = await call(http, fake, "GET", "/api/tags")
    assert header(response, "content-type") == ["application/json"] and body.endswith(b"}\n")
    tags = json.loads(body)["models"]
    assert [(t["name"], t["model"], t["size"]) for t in tags] == [("ai/smollm2", "ai/smollm2", 0),
                                                                   ("ai/llama3.2", "ai/llama3.2", 0)]
    details = {"format": "gguf", "family": "llama", "families": ["llama"], "parameter_size": "361.82M",
               "quantization_level": "MOSTLY_Q4_K_M"}
    for tag in tags:
        assert list(tag) == ["name", "model", "modified_at", "size", "digest", "details"]
        assert tag["details"] == details and TIME.match(tag["modified_at"])
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", tag["digest"])
    natives = json.loads((await call(http, fake, "GET", "/models"))[1])
    assert [t["digest"] for t in tags] == [m["id"] for m in natives]
    for name in ("name", "model"):
        response, body = await call(http, fake, "POST", "/api/show", {name: "SmolLM2", "verbose": True})
        assert (response.code, json.loads(body)) == (200, {"details": details})
    response, body = await call(http, fake, "POST", "/api/show", {"name": "ai/nope", "model": "ai/smollm2"})
    assert (response.code, body) == (404, b"Model not found: error while getting model: get model "
                                          b"'\"ai/nope\"': model not found\n")
    assert header(response, "content-type") == ["text/plain; charset=utf-8"]
    fake.models = []
    assert (await call(http, fake, "GET", "/api/tags"))[1] == b'{"models":[]}\n'
    assert not fake.inference_requests


@pytest.mark.parametrize(
    ("method", "path", "status", "allow", "body"),
    [
        ("GET", "/api/", 404, None, b"404 page not found\n"),
        ("POST", "/api/embed", 404, None, b"404 page not found\n"),
        ("POST", "/api/embeddings", 404, None, b"404 page not found\n"),
        ("POST", "/api/create", 404, None, b"404 page not found\n"),
        ("GET", "/api/tags/x", 404, None, b"404 page not found\n"),
        ("POST", "/api/version", 405, "GET, HEAD", b"Method Not Allowed\n"),
        ("DELETE", "/api/ps", 405, "GET, HEAD", b"Method Not Allowed\n"),
        ("GET", "/api/chat", 405, "POST", b"Method Not Allowed\n"),
        ("PUT", "/api/generate", 405, "POST", b"Method Not Allowed\n"),
        ("GET", "/api/show", 405, "POST", b"Method Not Allowed\n"),
        ("GET", "/api/pull", 405, "POST", b"Method Not Allowed\n"),
        ("POST", "/api/delete", 405, "DELETE", b"Method Not Allowed\n"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_wrong_methods(
    fake: FakeDMR, http: HTTPClient, method: str, path: str, status: int, allow: str | None, body: bytes
) -> None:
    """Only the eight routes exist (Go's ServeMux: 404 page not found, 405 with Allow)."""
    response, answer = await call(http, fake, method, path, b"{}")
    assert (response.code, answer, header(response, "content-type")) == (status, body, ["text/plain; charset=utf-8"])
    assert header(response, "allow") == (None if allow is None else [allow])
    assert header(response, "x-content-type-options") == ["nosniff"]


@pytest.mark.parametrize(
    ("method", "path", "location", "content_type"),
    [("GET", "/api?x=1", "/api/?x=1", ["text/html; charset=utf-8"]), ("POST", "/api", "/api/", None),
     ("GET", "/v1", "/v1/", ["text/html; charset=utf-8"]), ("DELETE", "/engines", "/engines/", None),
     ("POST", "/models?x=1", "/models/?x=1", None), ("DELETE", "/models", "/models/", None)],
)
@pytest_twisted.ensureDeferred
async def test_subtree_roots_redirect(
    fake: FakeDMR, http: HTTPClient, method: str, path: str, location: str, content_type: list[str] | None
) -> None:
    """Go 1.27's ServeMux: 307 to the subtree (a small HTML body only for GET)."""
    response, body = await call(http, fake, method, path)
    assert (response.code, header(response, "location"), header(response, "content-type")) == (
        307, [location], content_type)
    assert body == (f'<a href="{location}">Temporary Redirect</a>.\n\n'.encode() if content_type else b"")


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/chat", b"", "EOF"),
        ("/api/chat", b"  \n", "EOF"),
        ("/api/chat", b"{bad", "invalid character 'b' looking for beginning of object key string"),
        ("/api/chat", b'{"a":1', "unexpected EOF"),
        ("/api/chat", b'{"a":NaN}', "invalid character 'N' looking for beginning of value"),
        ("/api/generate", b"nope", "invalid character 'o' in literal null (expecting 'u')"),
        ("/api/chat", b'{"a" 1}', "invalid character '1' after object key"),
        ("/api/chat", b'{"a":1 "b":2}', "invalid character '\"' after object key:value pair"),
        ("/api/chat", b"[1 2]", "invalid character '2' after array element"),
        ("/api/chat", b'{"a":1,}', "invalid character '}' looking for beginning of object key string"),
        ("/api/chat", b'{"a":"\\x"}', "invalid escape sequence `\\x` in string"),
        ("/api/chat", b'{"a":"x\ny"}', "invalid character '\\n' in string"),
        ("/api/chat", b"[]", "json: cannot unmarshal array into Go value of type ollama.ChatRequest"),
        ("/api/chat", b'{"model":5}',
         "json: cannot unmarshal number into Go struct field ChatRequest.model of type string"),
        ("/api/chat", b'{"MESSAGES":{}}',
         "json: cannot unmarshal object into Go struct field ChatRequest.messages of type []ollama.Message"),
        ("/api/chat", b'{"messages":[1]}',
         "json: cannot unmarshal number into ChatRequest.messages.0 of type ollama.Message"),
        ("/api/chat", b'{"messages":[{"images":[1]}]}',
         "json: cannot unmarshal number into ChatRequest.messages.0.images.0 of type string"),
        ("/api/chat", b'{"messages":[{"tool_calls":[{"function":{"index":1.5}}]}]}',
         "json: cannot unmarshal number 1.5 into Go struct field ChatRequest.messages.0.tool_calls.0.function.index"
         " of type int"),
        ("/api/chat", b'{"tools":[{"function":{"parameters":[]}}]}',
         "json: cannot unmarshal array into Go struct field ChatRequest.tools.0.function.parameters of type "
         "map[string]interface {}"),
        ("/api/chat", b'{"stream":"yes"}',
         "json: cannot unmarshal string into Go struct field ChatRequest.stream of type bool"),
        ("/api/chat", b'{"keep_alive":[1]}', "keep_alive must be a string or number, got [1]"),
        ("/api/generate", b'{"prompt":5}',
         "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"),
        ("/api/show", b'{"verbose":"x"}',
         "json: cannot unmarshal string into Go struct field ShowRequest.verbose of type bool"),
        ("/api/pull", b"x", "invalid character 'x' looking for beginning of value"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bodies_are_decoded_like_go(fake: FakeDMR, http: HTTPClient, path: str, body: bytes,
                                          message: str) -> None:
    """A body Go's decoder refuses is ``400 Invalid request: <Go's message>`` before anything else."""
    response, answer = await call(http, fake, "POST", path, body)
    assert (response.code, answer) == (400, f"Invalid request: {message}\n".encode())
    assert header(response, "content-type") == ["text/plain; charset=utf-8"]
    assert not fake._runners


@pytest_twisted.ensureDeferred
async def test_delete_body_errors_and_lenient_decoding(fake: FakeDMR, http: HTTPClient) -> None:
    """DELETE's body is decoded too; keys match case-insensitively, the last wins, trailing bytes are ignored."""
    response, body = await call(http, fake, "DELETE", "/api/delete", b"x")
    assert (response.code, body) == (400, b"Invalid request: invalid character 'x' looking for beginning of value\n")
    request = b'{"MODEL":"ai/nope","Stream":false,"model":"ai/x"} trailing'
    response, body = await call(http, fake, "POST", "/api/chat", request)
    assert (response.code, body) == (404, b"error while getting model: get model '\"ai/x\"': model not found\n")


# -- chat and generate -------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chat_streams_ndjson_by_default(fake: FakeDMR, http: HTTPClient) -> None:
    """``stream`` absent: 200, application/json, chunked, one line per engine event, then the done line."""
    response, reader = await stream(http, fake, "/api/chat", CHAT_BODY)
    assert await reader.done
    assert (response.code, header(response, "content-type")) == (200, ["application/json"])
    assert response.length is UNKNOWN_LENGTH and header(response, "server") == ["llama.cpp"]  # chunked
    assert header(response, "x-accel-buffering") == ["no"]
    lines = reader.lines
    assert all(TIME.match(line["created_at"]) for line in lines)
    assert [list(line) for line in lines] == [["model", "created_at", "message", "done"]] * 7
    assert [line["message"] for line in lines] == [
        {"role": "assistant", "content": ""}, *({"role": "assistant", "content": t} for t in fake.tokens),
        {"role": "assistant", "content": ""}, {"role": "", "content": ""}]
    assert [line["done"] for line in lines] == [False] * 6 + [True]
    assert {line["model"] for line in lines} == {"smollm2"}  # as sent
    assert [r.json() for r in fake.inference_requests] == [CHAT_BODY]
    assert fake._ps()[0]["model_name"] == "smollm2"


@pytest_twisted.ensureDeferred
async def test_generate_streams_and_omits_empty_responses(fake: FakeDMR, http: HTTPClient) -> None:
    """Generate lines carry ``response`` only when not empty; the last is ``{model, created_at, done}``."""
    response, reader = await stream(http, fake, "/api/generate", {**GENERATE_BODY, "name": "ai/llama3.2"})
    assert await reader.done and response.code == 200
    lines = reader.lines
    assert [line.get("response") for line in lines] == [None, *fake.tokens, None, None]
    assert [list(line) for line in lines] == [["model", "created_at", "done"]] + [
        ["model", "created_at", "response", "done"]] * 4 + [["model", "created_at", "done"]] * 2
    assert lines[-1]["done"] is True and {line["model"] for line in lines} == {"ai/llama3.2"}  # name wins


@pytest.mark.parametrize("kind", ["chat", "generate"])
@pytest_twisted.ensureDeferred
async def test_non_streaming_answers(fake: FakeDMR, http: HTTPClient, kind: str) -> None:
    """One object + newline, application/json, no token counts, durations or done_reason."""
    body = {**(CHAT_BODY if kind == "chat" else GENERATE_BODY), "stream": False}
    response, answer = await call(http, fake, "POST", f"/api/{kind}", body)
    assert (response.code, header(response, "content-type")) == (200, ["application/json"])
    assert header(response, "server") is None and answer.endswith(b"}\n") and answer.count(b"\n") == 1
    obj = json.loads(answer)
    assert TIME.match(obj.pop("created_at"))
    text = "".join(fake.tokens)
    if kind == "chat":
        assert obj == {"model": "smollm2", "message": {"role": "assistant", "content": text}, "done": True}
    else:
        assert obj == {"model": "ai/smollm2", "response": text, "done": True}
    fake.tokens = []
    obj = json.loads((await call(http, fake, "POST", f"/api/{kind}", body))[1])
    assert obj.get("response") is None and obj.get("message", {}).get("content", "") == ""


@pytest_twisted.ensureDeferred
async def test_engine_errors_without_a_stream(fake: FakeDMR, http: HTTPClient) -> None:
    """Errors keep their status; an OpenAI error becomes ``{"error": message}``, the rest stays as it was,
    Content-Type sniffed by Go (text/plain), no nosniff."""
    messages = CHAT_BODY["messages"]
    cases: list[tuple[dict[str, Any], int, bytes]] = [
        ({"model": "ai/nope", "messages": messages}, 404,
         b"error while getting model: get model '\"ai/nope\"': model not found\n"),
        ({"messages": messages}, 400, b"model is required\n"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "x OVERFLOW"}]}, 400,
         b'{"error":"request (4139 tokens) exceeds the available context size (4096 tokens), try increasing it"}\n'),
    ]
    for request, status, expected in cases:
        response, answer = await call(http, fake, "POST", "/api/chat", {**request, "stream": False})
        assert (response.code, answer) == (status, expected)
        assert header(response, "content-type") == ["text/plain; charset=utf-8"]
        assert header(response, "x-content-type-options") is None and header(response, "server") is None
    fake.loading_503 = 1
    response, answer = await call(http, fake, "POST", "/api/generate", {**GENERATE_BODY, "stream": False})
    assert (response.code, answer) == (503, b'{"error":"Loading model"}\n')
    fake.load_failure = True
    response, answer = await call(http, fake, "POST", "/api/generate", {**GENERATE_BODY, "stream": False})
    assert response.code == 500 and answer.startswith(b"unable to load runner: ")
    fake.load_failure = False
    fake.force_status = (502, b"", "text/plain")
    response, answer = await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False})
    assert (response.code, answer, header(response, "content-type")) == (502, b"", None)
    fake.force_status = (200, b"<html><body>proxy</body></html>", "text/html")
    response, answer = await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False})
    assert (response.code, answer) == (500, b"Failed to parse response\n")
    assert header(response, "x-content-type-options") == ["nosniff"]


@pytest_twisted.ensureDeferred
async def test_engine_errors_when_streaming(fake: FakeDMR, http: HTTPClient) -> None:
    """Streaming errors keep the status and headers but no body: DMR's own errors end as an empty chunked
    body, an engine's answer declares its length and the connection closes short of it."""
    response, reader = await stream(http, fake, "/api/chat", {**CHAT_BODY, "model": "ai/nope"})
    assert await reader.done and reader.data == b""
    assert (response.code, header(response, "content-type")) == (404, ["text/plain; charset=utf-8"])
    assert header(response, "x-content-type-options") == ["nosniff"] and response.length is UNKNOWN_LENGTH
    overflow = {**CHAT_BODY, "messages": [{"role": "user", "content": "OVERFLOW"}]}
    response, reader = await stream(http, fake, "/api/chat", overflow)
    assert not await reader.done and reader.data == b""
    assert (response.code, header(response, "content-type")) == (400, ["application/json; charset=utf-8"])
    assert response.length == 195 and header(response, "server") == ["llama.cpp"]  # its Content-Length
    fake.load_failure = True
    response, reader = await stream(http, fake, "/api/generate", GENERATE_BODY)
    assert await reader.done and (response.code, reader.data) == (500, b"")
    assert fake.disconnects == 0


@pytest_twisted.ensureDeferred
async def test_stream_knobs_apply(fake: FakeDMR, http: HTTPClient) -> None:
    """``hold``, ``truncate_stream``, ``midstream_error`` and ``ollama_truncate_after`` shape Ollama streams."""
    fake.hold = Deferred()
    response, reader = await stream(http, fake, "/api/chat", CHAT_BODY)
    await reader.first
    assert len(reader.lines) == 1 and not reader.done.called and fake.active == 1
    fake.hold.callback(None)
    assert await reader.done and len(reader.lines) == 7
    fake.reset()
    fake.truncate_stream = True
    response, reader = await stream(http, fake, "/api/generate", GENERATE_BODY)
    assert not await reader.done
    assert [line.get("response") for line in reader.lines] == [None, *fake.tokens[:2]]
    fake.reset()
    fake.midstream_error = True  # llama.cpp's error event: an empty line, then the stream just ends
    response, reader = await stream(http, fake, "/api/chat", CHAT_BODY)
    assert await reader.done
    assert [line["message"]["content"] for line in reader.lines] == ["", *fake.tokens[:2], ""]
    assert not any(line["done"] for line in reader.lines)
    fake.reset()
    for limit in (1, 3, 6):
        fake.ollama_truncate_after = limit
        response, reader = await stream(http, fake, "/api/chat", CHAT_BODY)
        assert not await reader.done and len(reader.lines) == limit
    fake.ollama_truncate_after = 7  # all 7 lines, then cut before the terminating chunk
    response, reader = await stream(http, fake, "/api/chat", CHAT_BODY)
    assert not await reader.done and reader.lines[-1]["done"] is True
    fake.ollama_truncate_after = 8  # more lines than the stream has: not cut
    response, reader = await stream(http, fake, "/api/chat", CHAT_BODY)
    assert await reader.done and len(reader.lines) == 7
    assert fake.disconnects == 0


@pytest_twisted.ensureDeferred
async def test_client_leaving_a_stream_is_a_disconnect(fake: FakeDMR, http: HTTPClient) -> None:
    """An Ollama stream is an in-flight inference request: a client leaving it is counted."""
    fake.hold = Deferred()
    response, reader = await stream(http, fake, "/api/generate", GENERATE_BODY)
    await reader.first
    assert reader.transport is not None
    reader.transport.stopProducing()
    await fake.when_disconnected()
    assert (fake.disconnects, fake.active) == (1, 0)
    assert not await reader.done


@pytest_twisted.ensureDeferred
async def test_slots_queue_ollama_requests(fake: FakeDMR, http: HTTPClient) -> None:
    """With one llama.cpp slot, a second stream's headers go out but its first line waits for the first."""
    state = fake.state = BackendState(cold_load=0.0, slots=1)
    fake.hold = Deferred()
    _, first = await stream(http, fake, "/api/chat", CHAT_BODY)
    await first.first
    response, second = await stream(http, fake, "/api/chat", CHAT_BODY)
    assert response.code == 200 and second.data == b"" and state.waiting == 1
    hold, fake.hold = fake.hold, None
    hold.callback(None)
    assert await first.done and await second.done
    assert len(second.lines) == 7 and state.records[1].queued > 0


@pytest_twisted.ensureDeferred
async def test_cold_load_holds_the_headers(fake: FakeDMR, http: HTTPClient) -> None:
    """A cold load holds the headers of an Ollama stream; /api/ps shows the loading model meanwhile."""
    fake.cold_load_delay = 0.3
    waiter = fake.when_request()
    pending = http.post(fake.url + "/api/chat", data=json.dumps(CHAT_BODY).encode(), unbuffered=True)
    headers: list[IResponse] = []

    def arrived(response: IResponse) -> IResponse:
        headers.append(response)
        return response

    pending.addCallback(arrived)
    assert (await waiter).json() == CHAT_BODY
    ps = json.loads((await call(http, fake, "GET", "/api/ps"))[1])
    assert ps["models"] == [{"name": "ai/smollm2", "model": "ai/smollm2", "size": 0,
                             "digest": FakeDMR._digest("ai/smollm2"), "expires_at": GO_ZERO_TIME}]
    assert not headers
    response = await pending
    assert response.code == 200
    await response.content()


# -- runner state: ps, keep_alive, unload ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ps_expires_after_keep_alive(fake: FakeDMR, http: HTTPClient) -> None:
    """/api/ps: idle runners expire at last use + keep-alive (5 min, or the request's); forever: zero time."""
    assert (await call(http, fake, "GET", "/api/ps"))[1] == b'{"models":[]}\n'
    await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False})
    (entry,) = json.loads((await call(http, fake, "GET", "/api/ps"))[1])["models"]
    (runner,) = json.loads((await call(http, fake, "GET", "/engines/ps"))[1])
    assert (entry["name"], entry["model"], entry["size"]) == ("ai/smollm2", "ai/smollm2", 0)
    assert go_time(entry["expires_at"]) - go_time(runner["last_used"]) == pytest.approx(300, abs=0.01)
    assert "keep_alive" not in runner
    await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False, "keep_alive": 600})
    (entry,) = json.loads((await call(http, fake, "GET", "/api/ps"))[1])["models"]
    (runner,) = json.loads((await call(http, fake, "GET", "/engines/ps"))[1])
    assert runner["keep_alive"] == "10m0s"
    assert go_time(entry["expires_at"]) - go_time(runner["last_used"]) == pytest.approx(600, abs=0.01)
    await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False, "options": {"keep_alive": "-5m"}})
    (entry,) = json.loads((await call(http, fake, "GET", "/api/ps"))[1])["models"]
    assert entry["expires_at"] == GO_ZERO_TIME
    assert json.loads((await call(http, fake, "GET", "/engines/ps"))[1])[0]["keep_alive"] == "-1"
    configs = json.loads((await call(http, fake, "GET", "/engines/_configure"))[1])
    assert configs == [{"Backend": "llama.cpp", "Model": "ai/smollm2", "ModelID": FakeDMR._digest("ai/smollm2"),
                        "Mode": "completion", "Config": {"keep_alive": "-1"}}]


@pytest_twisted.ensureDeferred
async def test_a_new_configuration_reloads_an_idle_runner(fake: FakeDMR, http: HTTPClient) -> None:
    """think / num_ctx / keep_alive replace the runner's configuration; a change unloads it if idle."""
    state = fake.state = BackendState(cold_load=0.0)
    body = {**CHAT_BODY, "stream": False}
    await call(http, fake, "POST", "/api/chat", body)
    await call(http, fake, "POST", "/api/chat", body | {"think": True})  # new config: reload
    await call(http, fake, "POST", "/api/chat", body | {"think": True})  # unchanged
    await call(http, fake, "POST", "/api/chat", body | {"think": "high"})  # not a boolean: nothing configured
    await call(http, fake, "POST", "/api/chat", body | {"options": {"num_ctx": "8192x", "temperature": 0}})
    assert state.cold_loads == 3
    assert fake._configs == {"ai/smollm2:latest": {"context-size": 8192}}
    assert [record.endpoint for record in state.records] == ["chat/completions"] * 5
    assert state.records[0].prompt_tokens == 2 and state.records[0].ttft > 0  # "hi there", prefilled
    assert all(record.first_token is not None for record in state.records)
    ps = json.loads((await call(http, fake, "GET", "/api/ps"))[1])["models"]
    assert [m["name"] for m in ps] == ["ai/smollm2"]


@pytest.mark.parametrize("with_state", [False, True])
@pytest_twisted.ensureDeferred
async def test_empty_prompt_generate_unloads_or_configures(fake: FakeDMR, http: HTTPClient, with_state: bool) -> None:
    """An empty prompt with keep_alive absent or zero unloads (200 ``{}`` text/plain, Go sniffs it); with
    another keep_alive it only configures (200 ``{}`` application/json); nothing reaches the engine."""
    if with_state:
        fake.state = BackendState(cold_load=0.0)
    await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False})
    assert len(json.loads((await call(http, fake, "GET", "/api/ps"))[1])["models"]) == 1
    for keep_alive in ({}, {"keep_alive": 0}, {"keep_alive": "0m"}):
        await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False})
        request = {"model": "smollm2", "prompt": ""} | keep_alive
        response, body = await call(http, fake, "POST", "/api/generate", request)
        assert (response.code, body, header(response, "content-type")) == (200, b"{}", ["text/plain; charset=utf-8"])
        assert (await call(http, fake, "GET", "/api/ps"))[1] == b'{"models":[]}\n'
        assert (await call(http, fake, "GET", "/engines/ps"))[1] == b"[]\n"
    response, body = await call(http, fake, "POST", "/api/generate", {"model": "ai/nope"})
    assert (response.code, body) == (200, b"{}")
    response, body = await call(http, fake, "POST", "/api/generate", {"model": "smollm2", "keep_alive": "10m"})
    assert (response.code, body, header(response, "content-type")) == (200, b"{}", ["application/json"])
    assert (await call(http, fake, "GET", "/engines/ps"))[1] == b"[]\n"  # configured, not loaded
    assert fake._configs == {"ai/smollm2:latest": {"keep_alive": 600.0}}
    if fake.state is not None:  # only the 4 chats reached the engine
        assert [record.endpoint for record in fake.state.records] == ["chat/completions"] * 4


@pytest_twisted.ensureDeferred
async def test_a_busy_runner_is_not_unloaded(fake: FakeDMR, http: HTTPClient) -> None:
    """Unload and reconfigure leave a runner in use alone (DMR evicts idle runners only)."""
    fake.hold = Deferred()
    response, reader = await stream(http, fake, "/api/chat", CHAT_BODY)
    await reader.first
    assert (await call(http, fake, "POST", "/api/generate", {"model": "smollm2"}))[0].code == 200
    (entry,) = json.loads((await call(http, fake, "GET", "/api/ps"))[1])["models"]
    assert entry["expires_at"] == GO_ZERO_TIME  # in use
    response, body = await call(http, fake, "POST", "/engines/_configure", {"model": "smollm2", "keep_alive": "1h"})
    assert (response.code, body) == (409, b"runner already active\n")
    fake.hold.callback(None)
    assert await reader.done
    response, body = await call(http, fake, "POST", "/engines/unload", {"models": ["ai/smollm2:latest"]})
    assert json.loads(body) == {"unloaded_runners": 1}


# -- pull and delete ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pull_streams_status_lines(fake: FakeDMR, http: HTTPClient) -> None:
    """A model the fake has: one success line; a new one: two progress lines, success, and it is listed."""
    response, body = await call(http, fake, "POST", "/api/pull", {"model": "smollm2", "stream": False})
    assert (response.code, body, header(response, "content-type")) == (200, b'{"status":"success"}\n',
                                                                       ["application/x-ndjson"])
    assert response.length is UNKNOWN_LENGTH and header(response, "cache-control") == ["no-cache"]
    response, body = await call(http, fake, "POST", "/api/pull", {"name": "ai/new-model:v2"})
    lines = [json.loads(line) for line in body.splitlines()]
    digest = FakeDMR._digest("ai/new-model:v2")
    assert lines == [{"status": f"pulling {digest[7:19]}", "digest": digest, "total": MODEL_BYTES},
                     {"status": f"pulling {digest[7:19]}", "digest": digest, "total": MODEL_BYTES,
                      "completed": MODEL_BYTES},
                     {"status": "success"}]
    assert fake.models[-1] == "ai/new-model:v2"
    for bad, reference in (({}, ""), ({"model": "BAD NAME"}, "ai/bad name:latest")):
        response, body = await call(http, fake, "POST", "/api/pull", bad)
        assert (response.code, header(response, "content-type")) == (500, ["application/json"])
        assert json.loads(body) == {"error": "Failed to pull model: error while pulling model: reading model from "
                                             f"registry: invalid model reference \"{reference}\": invalid reference "
                                             f"\"{reference}\": invalid reference format"}
    fake.ollama_truncate_after = 1
    response, reader = await stream(http, fake, "/api/pull", {"model": "ai/another"})
    assert not await reader.done and len(reader.lines) == 1
    assert not fake.inference_requests


@pytest_twisted.ensureDeferred
async def test_delete_unloads_and_forgets_the_model(fake: FakeDMR, http: HTTPClient) -> None:
    await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False})
    response, body = await call(http, fake, "DELETE", "/api/delete", {"name": "smollm2"})
    assert (response.code, body, header(response, "content-type")) == (200, b"{}", ["application/json"])
    assert fake.models == ["ai/llama3.2"] and fake._ps() == []
    response, body = await call(http, fake, "DELETE", "/api/delete", {"model": "smollm2"})
    assert (response.code, body) == (500, b"Failed to delete model: error while deleting model: model not found\n")
    fake.reset()
    assert fake.models == ["ai/smollm2", "ai/llama3.2"]


# -- management routes and aliases -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_management_reads(fake: FakeDMR, http: HTTPClient) -> None:
    """/models, /models/{name...}, /engines/df, /version, /engines/status."""
    models = json.loads((await call(http, fake, "GET", "/models"))[1])
    assert [m["tags"] for m in models] == [["ai/smollm2"], ["ai/llama3.2"]]
    assert all(list(m) == ["id", "tags", "created", "config"] for m in models)
    assert models[0]["config"] == {"format": "gguf", "quantization": "MOSTLY_Q4_K_M", "parameters": "361.82M",
                                   "architecture": "llama", "size": "256.35MiB"}
    for name in ("smollm2", "ai/smollm2", "ai/smollm2:latest", "docker.io/ai/smollm2:latest", "AI/SmolLM2"):
        response, body = await call(http, fake, "GET", f"/models/{name}")
        assert (response.code, json.loads(body)) == (200, models[0])
    for name in ("ai/nope", "", "create"):
        response, body = await call(http, fake, "GET", f"/models/{name}")
        assert (response.code, body) == (404, b"model not found\n")
    response, body = await call(http, fake, "PUT", "/models/ai/smollm2")
    assert (response.code, body) == (404, b"not found\n")
    response, body = await call(http, fake, "GET", "/engines/df")
    assert json.loads(body) == {"models_disk_usage": 2 * MODEL_BYTES, "default_backend_disk_usage": 26486640}
    for method in ("GET", "POST", "DELETE"):
        response, body = await call(http, fake, method, "/version")
        assert (response.code, header(response, "content-type"), body) == (200, ["application/json"],
                                                                           b'{"version":"642c7211"}\n')
    assert json.loads((await call(http, fake, "GET", "/engines/status"))[1])["llama.cpp"].startswith("Running: ")
    for method, path in (("POST", "/engines/df"), ("POST", "/engines/status"), ("GET", "/engines/unload")):
        assert (await call(http, fake, method, path))[1] == b"not found\n"


@pytest_twisted.ensureDeferred
async def test_management_writes(fake: FakeDMR, http: HTTPClient) -> None:
    """The writes a proxy must never forward change the fake like DMR's store and scheduler."""
    response, body = await call(http, fake, "POST", "/models/create", {"from": "ai/fresh"},
                                headers={"accept": "application/json"})
    assert (response.code, header(response, "content-type")) == (200, ["application/json"])
    assert json.loads(body)["message"] == "Model pulled successfully" and "ai/fresh" in fake.models
    response, body = await call(http, fake, "POST", "/models/create", {"from": "smollm2"})
    assert header(response, "content-type") == ["text/plain"] and body.startswith(b"{&#34;type&#34;:&#34;success")
    assert (await call(http, fake, "POST", "/models/create", b"x"))[1] == b"invalid request body\n"
    assert (await call(http, fake, "POST", "/models/create", {"from": "A B"}))[1] == b"Invalid model reference\n"
    response, body = await call(http, fake, "POST", "/models/ai/fresh/tag?repo=ai/copy&tag=v1")
    assert response.code == 201 and json.loads(body)["target"] == "ai/copy:v1" and "ai/copy:v1" in fake.models
    assert (await call(http, fake, "POST", "/models/ai/fresh/tag"))[0].code == 400
    response, body = await call(http, fake, "POST", "/models/ai/fresh/push")
    assert (response.code, body) == (500, b"error while pushing model: the fake DMR has no registry\n")
    assert (await call(http, fake, "POST", "/models/ai/nope/push"))[1] == b"Model not found\n"
    response, body = await call(http, fake, "POST", "/models/ai/fresh/repackage", {"target": "ai/big"})
    assert (response.code, json.loads(body)["target"]) == (201, "ai/big") and "ai/big" in fake.models
    assert (await call(http, fake, "POST", "/models/ai/fresh/repackage", {}))[1] == b"target is required\n"
    response, body = await call(http, fake, "POST", "/models/ai/fresh/export")
    assert (response.code, body) == (404, b'unknown action "export"\n')
    response, body = await call(http, fake, "DELETE", "/models/ai/fresh")
    assert json.loads(body) == [{"Untagged": "ai/fresh"}, {"Deleted": FakeDMR._digest("ai/fresh")}]
    response, body = await call(http, fake, "DELETE", "/models/ai/fresh")
    assert (response.code, body) == (404, b"error while deleting model: model not found\n")
    await call(http, fake, "POST", "/engines/v1/chat/completions", {**CHAT_BODY})
    assert (await call(http, fake, "POST", "/engines/unload", b"x"))[1] == b"invalid request\n"
    assert json.loads((await call(http, fake, "POST", "/engines/unload", {"all": True}))[1]) == {"unloaded_runners": 1}
    response, body = await call(http, fake, "POST", "/engines/llama.cpp/_configure",
                                {"model": "smollm2", "context-size": 2048, "keep_alive": "1h"})
    assert (response.code, body, header(response, "content-type")) == (202, b"", None)
    assert fake._configs == {"ai/smollm2:latest": {"context-size": 2048, "keep_alive": 3600.0}}
    assert (await call(http, fake, "POST", "/engines/nope/_configure", {}))[1] == b"backend not found\n"
    assert (await call(http, fake, "POST", "/engines/_configure", b"{"))[1] == b"invalid request\n"
    response, body = await call(http, fake, "DELETE", "/models/purge")
    assert (response.code, body, fake.models) == (200, b"", [])
    assert not fake.inference_requests[1:]


@pytest_twisted.ensureDeferred
async def test_aliases(fake: FakeDMR, http: HTTPClient) -> None:
    """/v1/* → /engines/v1/*, /rerank and /score (no /v1 forms), /responses and /v1/responses."""
    chat = {**CHAT_BODY, "stream": False}
    assert json.loads((await call(http, fake, "POST", "/v1/chat/completions", chat))[1])["object"] == "chat.completion"
    assert json.loads((await call(http, fake, "GET", "/v1/models/smollm2"))[1])["id"] == "ai/smollm2"
    rerank = {"model": "smollm2", "query": "a", "documents": ["a", "b"]}
    assert json.loads((await call(http, fake, "POST", "/rerank", rerank))[1])["results"][0]["index"] == 0
    score = {"model": "smollm2", "text_1": "a", "text_2": "a"}
    assert json.loads((await call(http, fake, "POST", "/score", score))[1])["data"][0]["score"] == 1.0
    assert (await call(http, fake, "POST", "/v1/rerank", rerank))[1] == b"backend not found\n"
    assert (await call(http, fake, "POST", "/rerank/", rerank))[1] == b"404 page not found\n"
    for path in ("/responses", "/v1/responses", "/engines/responses"):
        response, body = await call(http, fake, "POST", path, {"model": "smollm2", "input": "hi"})
        assert (response.code, json.loads(body)["status"]) == (200, "completed")


# -- the translation itself --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tool_calls_and_thinking_are_translated(fake: FakeDMR, http: HTTPClient) -> None:
    """An engine answer with tool calls and reasoning: arguments parsed, an index added, no type."""
    answer = {"choices": [{"message": {"role": "assistant", "content": "", "reasoning_content": "hmm",
                                       "tool_calls": [{"id": "c1", "type": "function",
                                                       "function": {"name": "f", "arguments": '{"x": 1}'}},
                                                      {"id": "c2", "type": "function",
                                                       "function": {"name": "g", "arguments": "not json"}}]}}]}
    fake.force_status = (200, json.dumps(answer).encode(), "application/json")
    body = json.loads((await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False}))[1])
    assert body["message"] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}},
        {"id": "c2", "function": {"index": 1, "name": "g", "arguments": "not json"}}], "thinking": "hmm"}
    body = json.loads((await call(http, fake, "POST", "/api/generate", {**GENERATE_BODY, "stream": False}))[1])
    assert (body["thinking"], "response" in body) == ("hmm", False)
    fake.force_status = (200, b'{"choices":[]}', "application/json")
    body = json.loads((await call(http, fake, "POST", "/api/chat", {**CHAT_BODY, "stream": False}))[1])
    assert body["message"] == {"role": "", "content": ""}


def test_stream_lines_translate_like_dmr() -> None:
    """DMR's streaming writer, one SSE line at a time (HTML escaped like Go's encoder)."""
    fake = FakeDMR()
    writer = _OllamaWriter(fake, None, "chat", "m", True)  # type: ignore[arg-type]
    chunk = {"choices": [{"delta": {"content": "<a&b>", "reasoning_content": "r",
                                    "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{\"k\""}}]}}]}
    line = writer._translate(b"data: " + json.dumps(chunk).encode())
    assert line is not None and b"\\u003ca\\u0026b\\u003e" in line and line.endswith(b"\n")
    assert json.loads(line)["message"] == {"role": "assistant", "content": "<a&b>", "tool_calls": [
        {"id": "t", "function": {"index": 0, "name": "f", "arguments": "{\"k\""}}], "thinking": "r"}
    assert writer._translate(b'data: {"choices":"x"}') is None  # Go's Unmarshal fails: skipped
    assert writer._translate(b": keep-alive") is None and writer._translate(b"event: x") is None
    error = writer._translate(b'data: {"error":{"code":500,"message":"boom"}}')
    assert error is not None and json.loads(error)["message"] == {"role": "assistant", "content": ""}
    writer.kind = "generate"
    assert list(json.loads(writer._translate(b"data: {}") or b"")) == ["model", "created_at", "done"]
    assert json.loads(writer._translate(b"data: [DONE]") or b"")["done"] is True


def test_messages_become_openai_ones() -> None:
    """DMR's convertMessages: images as image_url parts (data URIs), tool-call arguments as JSON strings."""
    messages = _go_decode(json.dumps({"messages": [
        {"role": "user", "content": "look", "images": ["iVBORw0", " /9j/abc ", "https://x/y.png", "R0lGOD"]},
        {"role": "user", "content": "", "images": ["AAAA"]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "f", "arguments": {"b": 1, "a": "<"}}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}, None]}).encode(), OLLAMA_REQUESTS["chat"])["messages"]
    assert _openai_messages(messages) == [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/abc"}},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGOD"}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "", "type": "function", "function": {"name": "f", "arguments": '{"a":"\\u003c","b":1}'}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "", "content": ""}]


def test_go_helpers() -> None:
    """Durations as Go prints and parses them; keep_alive numbers; decoding edge cases."""
    assert [_go_duration(s) for s in (0, 0.5, 1.5, 30, 300, 600, 3600, 5400.25)] == [
        "0s", "500ms", "1.5s", "30s", "5m0s", "10m0s", "1h0m0s", "1h30m0.25s"]
    assert [_parse_keep_alive(s) for s in ("0", "-1", "5m", "1h30m", "90s", "-3s", "10", "", "5 m")] == [
        0.0, -1.0, 300.0, 5400.0, 90.0, -1.0, None, None, None]
    chat = OLLAMA_REQUESTS["chat"]
    assert _go_decode(b'{"keep_alive":300,"stream":null,"x":1}', chat) == {"keep_alive": "5m0s"}
    assert _go_decode(b'{"keep_alive":-2}', chat) == {"keep_alive": "-1"}
    assert _go_decode(b"null", chat) is None
    with pytest.raises(_GoDecodeError, match="^keep_alive must be a string or number, got true$"):
        _go_decode(b'{"keep_alive":true}', chat)
    with pytest.raises(_GoDecodeError, match="^invalid character 'x' after top-level value$"):
        _go_decode(b"{} x", chat, whole=True)
    assert _go_decode(b"{} x", chat) == {}
