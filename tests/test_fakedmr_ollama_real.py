"""The fake DMR's Ollama layer, management routes and aliases against the real DMR bundle, route by route.

One real DMR (``../shared/tools/realdmr/dmr``, models ``docker.io/ai/tiny:latest`` and friends) and one
in-process fake listing the same model names (with a ``BackendState`` whose context is ai/tiny's 512 tokens,
so both overflow on the same prompt) answer the same scenario of ~70 requests in the same order: the read-only
Ollama routes, chat and generate (whole and streamed), their errors, the empty-prompt unload, keep-alive
configuration and what ``/api/ps`` and ``/engines/ps`` show after each, pull/delete errors, the management
routes and the redirects.  For each request the two answers must agree on the status, the Content-Type and the
headers that matter (``Allow``, ``Location``, ``X-Content-Type-Options``, ``Server``, ``X-Accel-Buffering``,
``Cache-Control``, chunked or not for streams, a body cut short), and on the body: exactly for DMR's own texts,
as JSON with ids, times, digests, model details and generated text masked, and for NDJSON streams as the set
of line shapes plus the first and last line.  ``/models`` objects and ``/engines/status`` may hold less than
the real ones (no ``gguf`` map; only llama.cpp), never other keys.

A pull of a valid name is not compared: the real DMR has no network here and answers 500.  About 10 s.
Skipped without the bundle.  ``FAKEDMR_REAL_PORT`` picks the real DMR's port (default: a free one).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from fakedmr import GO_ZERO_TIME, BackendState, FakeDMR
from realdmr import AVAILABLE, MISSING, RealDMRs

PORT_ENV = "FAKEDMR_REAL_PORT"
TIMEOUT = 30.0  # a cold load takes ~0.5 s; the real DMR occasionally hangs (retried once)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not AVAILABLE, reason=MISSING),
]

HEADERS = ("content-type", "allow", "location", "x-content-type-options", "server", "x-accel-buffering",
           "cache-control")
"""Headers whose value must agree (absent on one side = absent on the other)."""
VARIABLE = frozenset({"created_at", "modified_at", "expires_at", "last_used", "digest", "id", "created", "content",
                      "response", "thinking", "parameter_size", "quantization_level", "family", "families",
                      "version", "models_disk_usage", "default_backend_disk_usage", "ModelID"})
"""JSON keys whose values differ by nature (times, ids, digests, model details, generated text)."""
LONG = " ".join(["word"] * 800)  # over ai/tiny's 512-token context on both
CHAT = {"model": "ai/tiny", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 3}}
GENERATE = {"model": "ai/tiny", "prompt": "hi", "options": {"num_predict": 3}}


@dataclass
class Step:
    method: str
    path: str
    body: Any = None  # bytes as they are, anything else as JSON
    mode: str = "text"  # text, json, ndjson, digits, models, model, status, keys, stream-error

    @property
    def data(self) -> bytes | None:
        if self.body is None or isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()

    def __str__(self) -> str:
        shown = self.data[:70] if self.data else b""
        return f"{self.method} {self.path} {shown!r}"


def scenario() -> list[Step]:
    nope = {"model": "ai/nope", "messages": [{"role": "user", "content": "hi"}]}
    return [
        # read-only Ollama routes, nothing loaded
        Step("GET", "/api/version", mode="json"),
        Step("GET", "/api/tags", mode="json"),
        Step("GET", "/api/ps", mode="json"),
        Step("POST", "/api/show", {"model": "tiny"}, "json"),
        Step("POST", "/api/show", {"name": "ai/nope", "model": "ai/tiny"}),
        Step("POST", "/api/show", {}),
        Step("POST", "/api/show", b"x"),
        Step("POST", "/api/show", {"verbose": "x"}),
        # the mux
        Step("GET", "/api/"),
        Step("POST", "/api/embed", {}),
        Step("POST", "/api/embeddings", {}),
        Step("GET", "/api/tags/x"),
        Step("GET", "/api/chat"),
        Step("POST", "/api/version", {}),
        Step("DELETE", "/api/chat", {}),
        Step("POST", "/api/delete", {}),
        Step("GET", "/api/pull"),
        Step("GET", "/api?x=1"),
        Step("POST", "/api", {}),
        # chat and generate, whole and streamed (the first one loads ai/tiny)
        Step("POST", "/api/chat", {**CHAT, "stream": False}, "json"),
        Step("POST", "/api/chat", CHAT, "ndjson"),
        Step("POST", "/api/chat", {**CHAT, "model": "tiny", "stream": True}, "ndjson"),
        Step("POST", "/api/generate", {**GENERATE, "stream": False}, "json"),
        Step("POST", "/api/generate", {**GENERATE, "name": "ai/tiny:latest", "model": "bogus"}, "ndjson"),
        Step("GET", "/api/ps", mode="json"),
        Step("GET", "/engines/ps", mode="json"),
        # errors, not streamed and streamed
        Step("POST", "/api/chat", {**nope, "stream": False}),
        Step("POST", "/api/generate", {"model": "ai/nope", "prompt": "x", "stream": False}),
        Step("POST", "/api/chat", {"messages": [], "stream": False}),
        Step("POST", "/api/chat", {**CHAT, "stream": False, "messages": [{"role": "user", "content": LONG}]},
             "digits"),
        Step("POST", "/api/generate", {**GENERATE, "stream": False, "prompt": LONG}, "digits"),
        Step("POST", "/api/chat", nope, "stream-error"),
        Step("POST", "/api/generate", {"model": "ai/nope", "prompt": "x"}, "stream-error"),
        Step("POST", "/api/chat", {"messages": []}, "stream-error"),
        Step("POST", "/api/chat", {**CHAT, "messages": [{"role": "user", "content": LONG}]}, "stream-error"),
        Step("POST", "/api/generate", {**GENERATE, "prompt": LONG}, "stream-error"),
        # bodies Go refuses
        Step("POST", "/api/chat", b""),
        Step("POST", "/api/chat", b"{bad"),
        Step("POST", "/api/chat", b'{"a":1'),
        Step("POST", "/api/chat", b'{"a":1 "b":2}'),
        Step("POST", "/api/generate", b"nope"),
        Step("POST", "/api/chat", b"[]"),
        Step("POST", "/api/chat", {"model": 5}),
        Step("POST", "/api/chat", {"messages": [{"images": [1]}]}),
        Step("POST", "/api/chat", {"messages": [{"tool_calls": [{"function": {"index": 1.5}}]}]}),
        Step("POST", "/api/chat", {"keep_alive": [1]}),
        Step("POST", "/api/generate", {"prompt": 5}),
        Step("POST", "/api/chat", b'{"MODEL":"ai/nope","Stream":false} trailing'),
        # the empty prompt unloads; a keep_alive only configures
        Step("POST", "/api/generate", {"model": "ai/tiny", "prompt": ""}),
        Step("GET", "/api/ps", mode="json"),
        Step("GET", "/engines/ps", mode="json"),
        Step("POST", "/api/generate", {"model": "ai/nope"}),
        Step("POST", "/api/generate", {"model": "ai/tiny", "keep_alive": "10m"}),
        Step("GET", "/engines/ps", mode="json"),
        # keep-alive: a configured runner, then one kept forever
        Step("POST", "/api/chat", {**CHAT, "stream": False, "keep_alive": "10m"}, "json"),
        Step("GET", "/api/ps", mode="json"),
        Step("GET", "/engines/ps", mode="json"),
        Step("POST", "/api/chat", {**CHAT, "stream": False, "keep_alive": -1}, "json"),
        Step("GET", "/api/ps", mode="json"),
        Step("GET", "/engines/ps", mode="json"),
        # pull and delete (their errors: the real one cannot reach a registry)
        Step("POST", "/api/pull", {}, "json"),
        Step("POST", "/api/pull", {"model": "BAD NAME"}, "json"),
        Step("POST", "/api/pull", b"x"),
        Step("DELETE", "/api/delete", {"model": "ai/nope"}),
        Step("DELETE", "/api/delete", b"x"),
        # management
        Step("GET", "/models", mode="models"),
        Step("GET", "/models/tiny", mode="model"),
        Step("GET", "/models/docker.io/ai/tiny:latest", mode="model"),
        Step("GET", "/models/ai/nope"),
        Step("GET", "/models/"),
        Step("POST", "/models", {}),
        Step("PUT", "/models"),
        Step("DELETE", "/models/ai/nope"),
        Step("POST", "/models/create", b"x"),
        Step("POST", "/models/ai/nope/push"),
        Step("POST", "/models/ai/nope/repackage", {"target": "ai/x"}),
        Step("POST", "/models/ai/tiny/repackage", {}),
        Step("POST", "/models/ai/tiny/repackage", b"x"),
        Step("POST", "/models/ai/nope/tag?repo=ai/a&tag=b"),
        Step("POST", "/models/ai/tiny/tag"),
        Step("GET", "/engines/df", mode="keys"),
        Step("GET", "/engines/status", mode="status"),
        Step("GET", "/version", mode="keys"),
        Step("POST", "/version", mode="keys"),
        Step("POST", "/engines/df"),
        Step("POST", "/engines/unload", b"x"),
        Step("POST", "/engines/unload", {"models": ["ai/nope"]}, "json"),
        Step("POST", "/engines/_configure", b"x"),
        Step("GET", "/engines"),
        # aliases
        Step("GET", "/v1"),
        Step("POST", "/v1/rerank", {"model": "ai/tiny", "query": "a", "documents": ["a"]}),
        Step("POST", "/rerank", b"x"),
        Step("POST", "/score", b"x"),
    ]


@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    clean: bool  # the body ended as announced (not cut short)
    length: int | None  # the Content-Length, None when chunked


class _Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bool] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback(reason.check(ResponseDone) is not None)


async def fetch(agent: Agent, base: str, step: Step) -> Answer:
    data = step.data
    headers = Headers({b"content-type": [b"application/json"]}) if data is not None else Headers()
    request = agent.request(step.method.encode(), (base + step.path).encode(), headers,
                            FileBodyProducer(BytesIO(data)) if data is not None else None)
    request.addTimeout(TIMEOUT, reactor)
    response = await request
    reader = _Body()
    response.deliverBody(reader)
    done = reader.done
    done.addTimeout(TIMEOUT, reactor)
    clean = await done
    seen = {key.decode().lower(): [v.decode() for v in values] for key, values in response.headers.getAllRawHeaders()}
    return Answer(response.code, seen, reader.data, clean,
                  None if response.length is UNKNOWN_LENGTH else int(response.length))


async def run(base: str, *, retry: bool) -> list[Answer]:
    """The scenario against ``base``; with ``retry``, a hang or an empty 502 (the real DMR's rare
    misses, see its README) is tried once more."""
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    answers = []
    for step in scenario():
        for attempt in (1, 2):
            try:
                answer = await fetch(agent, base, step)
            except Exception:
                if retry and attempt == 1:
                    continue
                raise
            if retry and attempt == 1 and answer.status == 502 and not answer.body:
                continue
            break
        answers.append(answer)
    return answers


def mask(value: Any, key: str | None = None) -> Any:
    """``value`` with the values of ``VARIABLE`` keys replaced by their type (Go's zero time kept)."""
    if isinstance(value, dict):
        return {k: mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key) for v in value]
    if key in VARIABLE and value != GO_ZERO_TIME:
        return f"<{type(value).__name__}>"
    return value


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def view(step: Step, answer: Answer) -> dict[str, Any]:
    """What must agree between the two answers to ``step``."""
    out: dict[str, Any] = {"status": answer.status,
                           "headers": {name: answer.headers.get(name) for name in HEADERS}}
    body = answer.body
    if step.mode == "text":
        out["body"] = body
    elif step.mode == "digits":
        out["body"] = re.sub(rb"\d+", b"N", body)
    elif step.mode == "json":
        out["body"] = mask(json.loads(body))
        if step.path == "/api/tags":
            out["body"]["models"] = sorted(out["body"]["models"], key=canonical)
    elif step.mode == "ndjson":
        assert body.endswith(b"\n"), body
        lines = [mask(json.loads(line)) for line in body.split(b"\n")[:-1]]
        out.update(chunked=answer.length is None, clean=answer.clean, first=lines[0], last=lines[-1],
                   shapes=sorted({canonical(line) for line in lines}),
                   done=[line["done"] for line in lines].count(True))
    elif step.mode == "stream-error":
        out.update(body=body, clean=answer.clean, chunked=answer.length is None)
    elif step.mode in ("models", "model"):
        objects = json.loads(body) if step.mode == "models" else [json.loads(body)]
        out["body"] = sorted(canonical({"keys": sorted(o), "tags": o.get("tags"),
                                        "config": sorted(o.get("config", {}))}) for o in objects)
    elif step.mode == "status":
        out["body"] = {k: type(v).__name__ for k, v in json.loads(body).items()}
    elif step.mode == "keys":
        out["body"] = {k: type(v).__name__ for k, v in json.loads(body).items()}
    return out


def differences(step: Step, real: Answer, fake: Answer) -> list[str]:
    want, got = view(step, real), view(step, fake)
    if step.mode in ("models", "model"):  # the fake's config keys are a subset of DMR's (no gguf map)
        wanted = [json.loads(entry) for entry in want.pop("body")]
        for entry in (json.loads(entry) for entry in got.pop("body")):
            match = [w for w in wanted if w["keys"] == entry["keys"] and w["tags"] == entry["tags"]]
            if not match or not set(entry["config"]) <= set(match[0]["config"]):
                return [f"{step}: model object {entry} not like any of {wanted}"]
    if step.mode == "status":  # the fake reports llama.cpp only
        wanted_status, got_status = want.pop("body"), got.pop("body")
        if not set(got_status) <= set(wanted_status) or set(got_status.values()) != {"str"}:
            return [f"{step}: /engines/status keys {sorted(got_status)} not within {sorted(wanted_status)}"]
    return [f"{step}: {key}: real {want[key]!r} != fake {got.get(key)!r}" for key in want if want[key] != got.get(key)]


@pytest_twisted.async_yield_fixture
async def real(tmp_path: Any) -> AsyncIterator[str]:
    """A real DMR from the bundle (its state under ``tmp_path``), stopped and purged afterwards."""
    dmr = RealDMRs(1, str(tmp_path), [int(os.environ[PORT_ENV])] if os.environ.get(PORT_ENV) else None)
    try:
        await dmr.start()
        yield dmr.urls[0]
    finally:
        await dmr.stop()


@pytest_twisted.ensureDeferred
async def test_fake_answers_like_the_real_dmr(real: str) -> None:
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    listed = json.loads((await fetch(agent, real, Step("GET", "/engines/v1/models"))).body)
    names = [entry["id"] for entry in listed["data"]]
    assert "docker.io/ai/tiny:latest" in names
    fake = FakeDMR(names, name="like-real")
    fake.state = BackendState(cold_load=0.0, context=512)  # ai/tiny's context: the same prompts overflow
    await fake.start()
    try:
        real_answers = await run(real, retry=True)
        fake_answers = await run(fake.url, retry=False)
    finally:
        await fake.stop()
    steps = scenario()
    assert len(real_answers) == len(fake_answers) == len(steps)
    mismatches = [d for step, r, f in zip(steps, real_answers, fake_answers) for d in differences(step, r, f)]
    assert not mismatches, "\n".join(mismatches)
    ollama = [r for r in fake.inference_requests if r.uri.startswith("/api/")]
    assert len(ollama) == sum(1 for s in steps if s.method == "POST" and s.path in ("/api/chat", "/api/generate"))
