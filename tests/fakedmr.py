"""An in-process fake Docker Model Runner (DMR) for end-to-end tests of olladmr.

``FakeDMR`` is a plain ``twisted.web`` server listening on a real TCP port on
127.0.0.1.  It answers like a standalone DMR with the llama.cpp engine behind
it (see ``/work/shared/reference/dmr-behaviour.md`` sections 2-5, 7, 9, 10):

* DMR's own answers: the OpenAI model list, plain-text ``http.Error`` style
  errors in the dispatch order of section 3, ``/engines/status``, ``/`` and
  Go's ``404 page not found``;
* llama.cpp's answers: chat / text completions (plain JSON or SSE) and
  embeddings, plus llama.cpp's JSON errors.

Tests steer it through plain attributes ("knobs") that may be changed at any
time, and inspect what it received through ``requests`` and a few counters.
All timing goes through the injected reactor's ``callLater``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import posixpath
import random
import re
import string
import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = ["FakeDMR", "RecordedRequest", "StoredResponse", "normalize_model_name"]

KNOWN_BACKENDS = frozenset({"llama.cpp", "vllm", "mlx", "sglang", "diffusers"})
INFERENCE_ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings"})
ENGINE_V1_ENDPOINTS = INFERENCE_ENDPOINTS | {"messages", "messages/count_tokens", "images/generations"}
"""POSTs under ``/engines[/{b}]/v1/`` that the scheduler routes by ``model``."""
ENGINE_OPS = frozenset({"rerank", "score"})
"""POSTs directly under ``/engines[/{b}]/`` (no ``/v1``) routed by ``model``."""
OVERFLOW_ENDPOINTS = frozenset({"chat/completions", "completions", "messages"})
RUNNER_MODES = {"embeddings": "embedding", "rerank": "reranking", "score": "reranking",
                "images/generations": "image-generation"}
"""Endpoint -> DMR backend mode (``backendModeForRequest``); anything else is ``completion``."""
MAX_INFERENCE_BODY = 10 * 1024 * 1024  # maximumOpenAIInferenceRequestSize
MAX_COMPAT_BODY = 10 * 1024 * 1024  # Anthropic and Responses handlers' MaxBytesReader (413)
ANTHROPIC_PATHS = {"/anthropic/v1/messages": "messages", "/anthropic/v1/messages/count_tokens": "messages/count_tokens"}
RESPONSE_TTL = 3600.0  # pkg/responses DefaultTTL
RESPONSES_ALLOW = {"create": ("POST",), "one": ("DELETE", "GET"), "items": ("GET",)}
"""Methods of the Responses handler's patterns (Go adds HEAD to a GET pattern's Allow)."""

TEXT_PLAIN = b"text/plain; charset=utf-8"
JSON_GO = b"application/json"  # DMR's own JSON: no charset
JSON_LLAMA = b"application/json; charset=utf-8"
EVENT_STREAM = b"text/event-stream"

MODEL_CREATED = 1742816981
SYSTEM_FINGERPRINT = "b9879-5f8ca5a3"
ENGINE_STATUS = {"llama.cpp": "Running: llama.cpp latest (sha256:abc) b9879"}
LOAD_FAILURE_MESSAGE = (
    "unable to load runner: error waiting for runner to be ready: llama.cpp "
    "terminated unexpectedly: llama.cpp failed: out of memory"
)
LOADING_503_BODY = (
    b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'
)
OVERFLOW_MARKER = "OVERFLOW"
OVERFLOW_BODY = (
    b'{"error":{"code":400,"message":"request (4139 tokens) exceeds the available '
    b'context size (4096 tokens), try increasing it","type":"exceed_context_size_error",'
    b'"n_prompt_tokens":4139,"n_ctx":4096}}'
)
MIDSTREAM_ERROR = {
    "error": {
        "code": 500,
        "message": "Failed to decode the batch, n_batch = 2048, ret = -3",
        "type": "server_error",
    }
}
ANTHROPIC_MIDSTREAM_ERROR = {
    "type": "error",
    "error": {"type": "api_error", "message": "Failed to decode the batch, n_batch = 2048, ret = -3"},
}
FAULT_AFTER_CONTENT_EVENTS = 2
GO_ZERO_TIME = "0001-01-01T00:00:00Z"  # a zero time.Time as Go's JSON encoder writes it
EMBEDDING_DIMENSIONS = 8
BIG_BODY_CHUNK = 64 * 1024
_BIG_BODY_PATTERN = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 2000)[:BIG_BODY_CHUNK]
DEFAULT_TOKENS = ("Hello", ",", " world", "!")

_log = Logger()

Runner = tuple[str, str]
"""A runner's identity: (mode, normalised model); mode is DMR's: "completion", "embedding",
"reranking" or "image-generation"."""


def _tiny_png() -> bytes:
    """A valid 1x1 transparent RGBA PNG (signature, IHDR, IDAT, IEND with their CRCs)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 5)) + chunk(b"IEND", b"")


TINY_PNG = _tiny_png()
TINY_PNG_B64 = base64.b64encode(TINY_PNG).decode("ascii")


@dataclass
class RecordedRequest:
    """One request as the fake received it (headers lower-cased, latin-1 decoded)."""

    method: str
    uri: str
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body)


def normalize_model_name(ref: str) -> str:
    """Normalise a model reference the way DMR's store lookup does (section 7).

    Trim, lower-case the name but not the tag, default the tag to ``latest``,
    map ``hf.co/`` to ``huggingface.co/``, drop a ``docker.io/`` or
    ``index.docker.io/`` prefix, and put bare names in the ``ai/`` namespace.
    """
    name = ref.strip()
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = "latest"
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :] or "latest"
    name = name.lower()
    if name.startswith("hf.co/"):
        name = "huggingface.co/" + name[len("hf.co/") :]
    for registry in ("docker.io/", "index.docker.io/"):
        if name.startswith(registry) and "/" in name[len(registry) :]:
            name = name[len(registry) :]
            break
    if "/" not in name:
        name = "ai/" + name
    return f"{name}:{tag}"


def _dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as Go's encoder and nlohmann::json write it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _go_quote(value: str) -> str:
    """Approximate Go's ``%q`` formatting of a string."""
    return json.dumps(value, ensure_ascii=False)


def _clean_slashes(path: str) -> str:
    """Apply DMR's ``path.Clean`` to paths containing ``//``."""
    if "//" in path:
        path = posixpath.normpath(re.sub("/+", "/", path))
    return path


def _clean_path(path: str) -> str:
    """Apply DMR's ``path.Clean`` for paths containing ``//`` and the ``/v1`` alias."""
    path = _clean_slashes(path)
    if path in ("/v1", "/rerank", "/score") or path.startswith("/v1/"):
        path = "/engines" + path
    return path


def _engine_op_path(path: str) -> tuple[str | None, str] | None:
    """Split ``/engines[/{b}]/rerank`` or ``…/score`` into (backend or None, op).

    As in Go's mux, ``/engines/v1/rerank`` names the backend ``v1``.
    """
    if not path.startswith("/engines/"):
        return None
    segments = path[len("/engines/") :].split("/")
    if len(segments) == 1 and segments[0] in ENGINE_OPS:
        return None, segments[0]
    if len(segments) == 2 and segments[0] and segments[1] in ENGINE_OPS:
        return segments[0], segments[1]
    return None


@dataclass(frozen=True)
class _ResponsesTarget:
    """A path the Responses handler serves: what it names, for which backend segment."""

    kind: str | None  # "create", "one" (GET/DELETE {id}), "items" ({id}/input_items); None: no pattern
    backend: str | None = None
    response_id: str = ""


def _responses_target(path: str) -> _ResponsesTarget | None:
    """Whether DMR's router sends ``path`` (already slash-cleaned) to the Responses handler.

    ``/responses`` and ``/v1/responses`` are subtrees (an unknown shape below them is
    the handler's ``404 page not found``); the ``/engines/…`` forms are exact patterns,
    anything else under ``/engines`` belongs to the scheduler.
    """
    segments = path.split("/")[1:]
    subtree = False
    backend = None
    if segments[:1] == ["responses"]:
        rest, subtree = segments[1:], True
    elif segments[:2] == ["v1", "responses"]:
        rest, subtree = segments[2:], True
    elif segments[:2] == ["engines", "responses"]:
        rest = segments[2:]
    elif segments[:3] == ["engines", "v1", "responses"]:
        rest = segments[3:]
    elif len(segments) >= 4 and segments[0] == "engines" and segments[1] and segments[2:4] == ["v1", "responses"]:
        rest, backend = segments[4:], segments[1]
    else:
        return None
    if not rest:
        return _ResponsesTarget("create", backend)
    if len(rest) == 1 and rest[0]:
        return _ResponsesTarget("one", backend, unquote(rest[0]))
    if len(rest) == 2 and rest[0] and rest[1] == "input_items":
        return _ResponsesTarget("items", backend, unquote(rest[0]))
    return _ResponsesTarget(None) if subtree else None


def _engine_v1_path(path: str) -> tuple[str | None, str] | None:
    """Split ``/engines[/{b}]/v1/<tail>`` into (backend or None, tail)."""
    if not path.startswith("/engines/"):
        return None
    rest = path[len("/engines/") :]
    if rest.startswith("v1/"):
        return None, rest[len("v1/") :]
    backend, sep, tail = rest.partition("/")
    if sep and tail.startswith("v1/"):
        return backend, tail[len("v1/") :]
    return None


def _is_inference(method: str, uri: str) -> bool:
    """Whether a request is a POST to a route DMR sends to a runner by ``model``.

    That is chat/completions, completions, embeddings, Anthropic messages and
    count_tokens (``/engines`` and ``/anthropic`` forms), images, rerank, score,
    and a Responses API create.
    """
    if method != "POST":
        return False
    path = _clean_slashes(uri.split("?", 1)[0])
    target = _responses_target(path)
    if target is not None:
        return target.kind == "create"
    if path in ANTHROPIC_PATHS:
        return True
    path = _clean_path(path)
    parts = _engine_v1_path(path)
    return (parts is not None and parts[1] in ENGINE_V1_ENDPOINTS) or _engine_op_path(path) is not None


def _block_texts(value: Any) -> list[str]:
    """Texts of a string or of a list of ``{"type": "text", "text": …}`` blocks."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [b["text"] for b in value if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return []


def _texts(payload: dict[str, Any], endpoint: str) -> list[str]:
    """The prompt texts of a request: message contents, prompts or inputs."""
    if endpoint in ("messages", "messages/count_tokens"):  # Anthropic: system, then every message
        messages = payload.get("messages")
        found = _block_texts(payload.get("system"))
        for message in messages if isinstance(messages, list) else []:
            found += _block_texts(message.get("content")) if isinstance(message, dict) else []
        return found
    if endpoint == "rerank":
        documents = payload.get("documents")
        docs = [d for d in documents if isinstance(d, str)] if isinstance(documents, list) else []
        return _block_texts(payload.get("query")) + docs
    if endpoint == "score":
        return [t for key in ("text_1", "text_2") for t in _str_list(payload.get(key))]
    if endpoint == "images/generations":
        return _block_texts(payload.get("prompt"))
    if endpoint == "chat/completions":
        messages = payload.get("messages")
        texts: list[str] = []
        for message in messages if isinstance(messages, list) else []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
                texts.extend(part["text"] for part in content if isinstance(part, dict) and "text" in part)
        return [text for text in texts if isinstance(text, str)]
    value = payload.get("prompt" if endpoint == "completions" else "input")
    items = value if isinstance(value, list) else [] if value is None else [value]
    return [item if isinstance(item, str) else json.dumps(item) for item in items]


def _str_list(value: Any) -> list[str]:
    """A string as a one-item list, a list of strings as itself, anything else as []."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return []


def _random_id(prefix: str, alphabet: str = string.ascii_lowercase + string.digits, length: int = 24) -> str:
    """``prefix`` plus ``length`` random characters (DMR's ``GenerateID`` uses a-z0-9)."""
    return prefix + "".join(random.choices(alphabet, k=length))


def _go_time(seconds: float) -> str:
    """A UTC time as Go's JSON encoder writes a ``time.Time`` (RFC 3339, trimmed nanoseconds)."""
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    fraction = f".{moment.microsecond:06d}".rstrip("0") if moment.microsecond else ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def _sse(event: str, data: Any) -> bytes:
    """One named server-sent event: ``event: <type>\\ndata: <json>\\n\\n``."""
    return b"event: " + event.encode("utf-8") + b"\ndata: " + _dumps(data) + b"\n\n"


def _relevance(query: str, document: str) -> float:
    """Deterministic relevance: the share of the query's distinct lower-case words in the document."""
    wanted = set(query.lower().split())
    return round(len(wanted & set(document.lower().split())) / len(wanted), 6) if wanted else 0.0


def _model_not_found(name: str) -> str:
    """DMR's message for a model missing from the local store."""
    return f"error while getting model: get model '{_go_quote(name)}': model not found"


def _count_tokens(texts: Sequence[str]) -> int:
    """Deterministic token count: whitespace-separated words, at least 1."""
    return max(1, sum(len(text.split()) for text in texts))


def _embedding(text: str) -> list[float]:
    """A deterministic vector of float32-representable values in [-1, 1)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    halves = struct.unpack(f">{EMBEDDING_DIMENSIONS}H", digest[: 2 * EMBEDDING_DIMENSIONS])
    raw = [half / 32768.0 - 1.0 for half in halves]
    return list(struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", struct.pack(f"<{EMBEDDING_DIMENSIONS}f", *raw)))


def _timings(prompt_n: int, predicted_n: int) -> dict[str, Any]:
    """llama.cpp's ``timings`` block, with 1 ms per prompt and 10 ms per predicted token."""
    return {
        "cache_n": 0,
        "prompt_n": prompt_n,
        "prompt_ms": float(prompt_n),
        "prompt_per_token_ms": 1.0,
        "prompt_per_second": 1000.0,
        "predicted_n": predicted_n,
        "predicted_ms": 10.0 * predicted_n,
        "predicted_per_token_ms": 10.0,
        "predicted_per_second": 100.0,
    }


def _follow(source: Deferred[Any]) -> Deferred[None]:
    """A Deferred firing when ``source`` does; cancelling it leaves ``source`` alone."""
    mine: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        if not mine.called:
            mine.callback(None)
        return result

    source.addBoth(fire)
    return mine


class _Exchange:
    """One request answered asynchronously: owns its timers and its coroutine.

    When the connection goes away before the response finished, the coroutine
    is cancelled (which cancels whatever timer it waits on) and, for inference
    requests closed by the client, the disconnect is counted.
    """

    def __init__(self, fake: FakeDMR, request: Request, *, inference: bool) -> None:
        self.fake = fake
        self.request = request
        self.inference = inference
        self.done = False  # response finished or connection lost
        self.server_closed = False  # the fake itself tore the connection down
        self._task: Deferred[None] | None = None
        if inference:
            fake.active += 1
        fake._exchanges.add(self)
        request.notifyFinish().addBoth(self._ended)

    def run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Drive ``coroutine`` as this exchange's work."""
        self._task = Deferred.fromCoroutine(coroutine)
        self._task.addErrback(self._crashed)

    def _ended(self, result: object) -> None:
        self.done = True
        self.fake._exchanges.discard(self)
        if self.inference:
            self.fake.active -= 1
        if isinstance(result, Failure):
            if self.inference and not self.server_closed:
                self.fake._note_disconnect()
            if self._task is not None:
                self._task.cancel()

    def _crashed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and self.done:
            return
        _log.failure("fake DMR handler crashed", failure)
        self.abort()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on the fake's reactor (no-op when not positive)."""
        if seconds > 0:
            await deferLater(self.fake._reactor, seconds)

    async def wait(self, source: Deferred[Any]) -> None:
        """Wait for ``source`` without cancelling it if this exchange is cancelled."""
        await _follow(source)

    def start(
        self, status: int, content_type: bytes, *, length: int | None = None, server: bool | bytes = False
    ) -> None:
        """Set the status line and headers (sent with the first write).

        ``server``: True for llama.cpp's ``Server: llama.cpp``, or the header's value.
        """
        request = self.request
        request.setResponseCode(status)
        request.responseHeaders.removeHeader(b"server")
        request.setHeader(b"content-type", content_type)
        if server:
            request.setHeader(b"server", b"llama.cpp" if server is True else server)
        if length is not None:
            request.setHeader(b"content-length", b"%d" % length)
        for name, value in self.fake.extra_headers:
            request.responseHeaders.addRawHeader(name, value)

    def write(self, data: bytes) -> None:
        """Write ``data`` now, unless the response is over."""
        if not self.done:
            self.request.write(data)

    def finish(self) -> None:
        """Finish the response, unless it is over."""
        if not self.done:
            self.request.finish()

    def send(self, status: int, body: bytes, content_type: bytes, *, server: bool | bytes = False) -> None:
        """Send a complete response with a Content-Length."""
        if self.done:
            return
        self.start(status, content_type, length=len(body), server=server)
        self.write(body)
        self.finish()

    def send_error(self, status: int, message: str) -> None:
        """Send a Go ``http.Error`` style plain-text error."""
        self.request.setHeader(b"x-content-type-options", b"nosniff")
        self.send(status, message.encode("utf-8") + b"\n", TEXT_PLAIN)

    def send_json(self, obj: Any, status: int = 200) -> None:
        """Send DMR's own JSON (no charset, trailing newline like Go's encoder)."""
        self.send(status, _dumps(obj) + b"\n", JSON_GO)

    def send_405(self, methods: Sequence[str]) -> None:
        """Go's ServeMux answer to a known path with a wrong method (HEAD joins GET)."""
        allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
        self.request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        self.send_error(405, "Method Not Allowed")

    def abort(self) -> None:
        """Reset the TCP connection at once; not counted as a client disconnect."""
        self.server_closed = True
        channel = self.request.channel
        if not self.done and channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def cut(self) -> None:
        """Close the TCP connection once what was written is flushed, leaving the
        response unterminated (what Go does when a handler aborts mid-body).
        Not counted as a client disconnect."""
        self.server_closed = True
        if not self.done:
            self.request.loseConnection()


@implementer(IPushProducer)
class _BigBodyProducer:
    """Push producer writing ``total`` bytes, pausing whenever TCP pushes back."""

    def __init__(self, fake: FakeDMR, exchange: _Exchange, total: int) -> None:
        self._fake = fake
        self._exchange = exchange
        self._remaining = total
        self._paused = False
        self._stopped = False

    def start(self) -> None:
        """Register with the request and begin producing."""
        self._exchange.request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True
        self._fake.producer_paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._fake.producer_paused = False
        exchange = self._exchange
        while not self._paused and not self._stopped and self._remaining > 0 and not exchange.done:
            chunk = _BIG_BODY_PATTERN[: min(BIG_BODY_CHUNK, self._remaining)]
            self._remaining -= len(chunk)
            self._fake.bytes_produced += len(chunk)
            exchange.write(chunk)
        if self._remaining == 0 and not self._stopped:
            self._stopped = True
            if not exchange.done:
                exchange.request.unregisterProducer()
            exchange.finish()

    def stopProducing(self) -> None:
        self._stopped = True
        self._fake.producer_paused = False


class _TrackingChannel(HTTPChannel):
    """
    HTTP/1.1 channel that registers itself with its FakeDMR while connected.

    Header limits as DMR's (Go net/http: ``MaxHeaderBytes`` 1 MB, plus 4 KB
    of slack, answered 431), not Twisted's 16 KB.
    """

    factory: _FakeSite
    MAX_LENGTH = totalHeadersSize = (1 << 20) + 4096

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.fake._channels.add(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; "
                             b"charset=utf-8\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large")
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.fake._channel_closed(self)


class _FakeSite(Site):
    """Site serving the fake's resource over tracked channels, without access logs."""

    protocol = _TrackingChannel  # type: ignore[assignment]

    def __init__(self, fake: FakeDMR) -> None:
        super().__init__(_FakeResource(fake), reactor=fake._reactor)
        self.fake = fake
        self.timeOut = None  # DMR has no idle timeout

    def log(self, request: Request) -> None:
        """No access log."""


class _FakeResource(Resource):
    """Leaf resource handing every request to FakeDMR's router."""

    isLeaf = True

    def __init__(self, fake: FakeDMR) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Request) -> int:
        self._fake._route(request)
        return NOT_DONE_YET


@dataclass
class StoredResponse:
    """One entry of a fake's Responses API store."""

    response: dict[str, Any]  # the response object as GET returns it
    input_items: list[dict[str, Any]]  # this request's input, as input_items lists it
    turn: int  # 1 + the length of the chain it continued
    expires_at: float  # reactor seconds; retrievable while now <= expires_at


@dataclass
class _RunnerInfo:
    """What ``/engines/ps`` shows about a runner besides its key."""

    backend: str
    model: str  # the reference (as sent) of the request that first loaded it
    last_used: float
    references: int = 0


class FakeDMR:
    """A fake DMR on 127.0.0.1 whose behaviour tests steer through plain attributes.

    Knobs (plain attributes, restored by ``reset()``):

    * ``models``: ids served by the lists; lookups use DMR's normalisation, so
      ``smollm2`` and ``AI/SmolLM2`` match ``ai/smollm2`` or ``ai/smollm2:latest``.
    * ``tokens``: content deltas of a stream, joined for a non-streaming answer.
    * ``chunk_delay``: seconds before each SSE event after the first (``[DONE]`` too).
    * ``hold``: a stream sends its first event, then waits for this Deferred
      (the fake never cancels it).
    * ``cold_load_delay``: the first inference request of each runner (model x
      chat-or-embedding mode) waits this long before headers; concurrent ones
      share the load; later ones are immediate.  ``stop()`` and ``reset()``
      make every model cold again.
    * ``header_delay``: delay before the headers of every inference answer.
    * ``loading_503`` (counts down), ``force_status``, ``load_failure``:
      answers instead of inference, checked in that order after DMR's own
      checks and before any delay.
    * ``midstream_error`` / ``truncate_stream``: read when a stream starts; after
      two content events send llama.cpp's error event and end the response, or
      close the connection once flushed, without the terminating chunk.
      Neither ever sends ``[DONE]``.
    * ``big_body``: a non-streaming chat answer of exactly that many bytes
      (``application/octet-stream``) from a push producer obeying TCP
      backpressure; see ``bytes_produced`` (cumulative) and ``producer_paused``.
    * ``models_status`` / ``models_delay``: for the model list and model get.
    * ``anthropic_ping``: an Anthropic stream sends a ``ping`` event right after
      ``content_block_start`` (default False).
    * ``response_ttl``: seconds (on the fake's reactor clock) a stored Responses
      API response stays retrievable; DMR's is one hour.

    Routes beyond the seed's (see ``dmr-2026-surface.md``; each model-routed one
    runs DMR's checks of section 3, honours ``loading_503`` / ``force_status`` /
    ``load_failure`` / ``cold_load_delay`` / ``header_delay``, and streams obey
    ``chunk_delay`` / ``hold`` / ``midstream_error`` / ``truncate_stream``):

    * Anthropic: ``POST /engines[/{b}]/v1/messages[/count_tokens]`` (DMR's
      plain-text errors) and ``POST /anthropic/v1/messages[/count_tokens]``,
      which first answers Anthropic-shaped 413/400/400/404 errors.  Streams use
      ``event:`` + ``data:`` framing and no ``[DONE]``; ``midstream_error`` sends
      ``event: error``.  ``max_tokens`` below the token count truncates
      (``stop_reason: "max_tokens"``).  Input tokens are the words of ``system``
      and of every message.
    * Responses API (``/responses``, ``/v1/responses``, ``/engines[/v1]/responses``,
      ``/engines/{b}/v1/responses``, plus ``/{id}`` and ``/{id}/input_items``),
      translated to the fake's chat completion like DMR does.  The generated
      tokens are ``tokens`` plus one more, ``" [turn N]"``, N being 1 + the number
      of stored responses reachable through ``previous_response_id`` (DMR's
      history walk stops at the first missing one), so tests can check chains.
      ``max_output_tokens`` truncates.  Completed (and, like DMR, failed)
      responses land in ``stored_responses`` unless ``store`` is false; ``stop()``
      and ``reset()`` empty it (a restarted DMR forgets).  Engine-side failures
      come back like DMR wraps them: a ``status: "failed"`` response with
      ``error.code: "upstream_error"`` and the upstream's status, or, when
      streaming, a 200 carrying ``error`` + ``response.failed`` events.
      ``midstream_error`` ends the stream cleanly after two deltas with neither
      ``response.completed`` nor an error event (DMR drops llama.cpp's in-band
      error) and stores nothing.
    * ``POST /engines[/{b}]/rerank`` (llama.cpp; relevance = share of the query's
      words found in the document), ``…/score`` (vLLM, ``Server: uvicorn``),
      ``…/v1/images/generations`` (diffusers, ``Server: uvicorn``, a 1x1 PNG).
    * ``GET /engines/ps``: DMR's ``BackendStatus`` array for warm and loading
      runners (``model_name`` is the reference that first loaded it; ``in_use``
      and ``loading`` are omitted when false, like Go's ``omitempty``; an in-use
      or loading runner has Go's zero ``last_used``).

    Recordings: ``requests`` (every request, in arrival order),
    ``inference_requests`` (POSTs to model-routed routes, see ``_is_inference``),
    ``active`` (inference requests in flight), ``disconnects`` (in-flight
    inference requests the *client* abandoned; connections the fake closes
    itself are not counted), ``when_request()`` and ``when_disconnected()``;
    ``stored_responses`` (Responses API store, id -> ``StoredResponse``).
    """

    def __init__(
        self,
        models: Sequence[str] = ("ai/smollm2", "ai/llama3.2"),
        *,
        name: str = "fake-dmr",
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.name = name
        self._reactor: Any = reactor  # IReactorTCP and IReactorTime
        self._initial_models = list(models)
        self._site = _FakeSite(self)
        self._listening: IListeningPort | None = None
        self._channels: set[_TrackingChannel] = set()
        self._closed_waiters: list[Deferred[None]] = []
        self._exchanges: set[_Exchange] = set()
        self._warm: set[Runner] = set()
        self._loads: dict[Runner, tuple[Deferred[None], IDelayedCall]] = {}
        self._runners: dict[Runner, _RunnerInfo] = {}
        self._request_waiters: list[Deferred[RecordedRequest]] = []
        self._disconnect_waiters: list[tuple[int, Deferred[None]]] = []
        self.stored_responses: dict[str, StoredResponse] = {}
        self.port = 0
        self.active = 0
        self._set_defaults()

    def _set_defaults(self) -> None:
        self.models: list[str] = list(self._initial_models)
        self.tokens: list[str] = list(DEFAULT_TOKENS)
        self.chunk_delay = 0.0
        self.hold: Deferred[Any] | None = None
        self.cold_load_delay = 0.0
        self.header_delay = 0.0
        self.loading_503 = 0
        self.force_status: tuple[int, bytes, str] | None = None
        self.load_failure = False
        self.midstream_error = False
        self.truncate_stream = False
        self.big_body = 0
        self.models_status = 200
        self.models_delay = 0.0
        self.anthropic_ping = False
        self.response_ttl = RESPONSE_TTL
        self.extra_headers: list[tuple[bytes, bytes]] = []  # added to every response the fake starts
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self._disconnect_claims = 0
        self.bytes_produced = 0
        self.producer_paused = False
        self._warm.clear()
        self._runners = {runner: info for runner, info in self._runners.items() if runner in self._loads}
        self.stored_responses.clear()

    def __repr__(self) -> str:
        return f"<FakeDMR {self.name} {self.url}>"

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:12434``."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:``port`` (0 picks a free port); return the port.

        ``await fake.start(fake.port)`` after ``stop()`` restarts on the same port.
        """
        if self._listening is not None:
            raise RuntimeError(f"{self!r} is already listening")
        self._listening = self._reactor.listenTCP(port, self._site, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.port

    async def stop(self) -> None:
        """Kill the server: stop listening and reset every open connection.

        In-flight requests are cut without being counted as client disconnects.
        Pending model loads are cancelled and every model is cold again.
        Returns once every connection is gone.
        """
        port, self._listening = self._listening, None
        if port is not None:
            await port.stopListening()
        for exchange in list(self._exchanges):
            exchange.server_closed = True
        for channel in list(self._channels):
            channel.transport.abortConnection()
        for _, call in self._loads.values():
            call.cancel()
        self._loads.clear()
        self._warm.clear()
        self._runners.clear()
        self.stored_responses.clear()
        if self._channels:
            waiter: Deferred[None] = Deferred()
            self._closed_waiters.append(waiter)
            await waiter

    def _channel_closed(self, channel: _TrackingChannel) -> None:
        self._channels.discard(channel)
        if not self._channels:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def reset(self) -> None:
        """Restore every knob, clear the recordings, counters and response store, make models cold.

        ``active`` is left alone: it counts requests still in flight.
        """
        self._set_defaults()

    # -- recordings --------------------------------------------------------

    @property
    def inference_requests(self) -> list[RecordedRequest]:
        """The recorded POSTs to chat/completions, completions and embeddings."""
        return [r for r in self.requests if _is_inference(r.method, r.uri)]

    def when_request(self) -> Deferred[RecordedRequest]:
        """Fire with the next inference request that arrives after this call."""
        waiter: Deferred[RecordedRequest] = Deferred()
        self._request_waiters.append(waiter)
        return waiter

    def when_disconnected(self) -> Deferred[None]:
        """Fire at a client disconnect of an in-flight inference request.

        Calls are matched with disconnects in order: the n-th call since
        construction or ``reset()`` fires once ``disconnects`` reaches n, at
        once if that already happened.  So a test may ask before or after
        provoking the disconnect.
        """
        self._disconnect_claims += 1
        if self.disconnects >= self._disconnect_claims:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._disconnect_waiters.append((self._disconnect_claims, waiter))
        return waiter

    def _note_disconnect(self) -> None:
        self.disconnects += 1
        due = [w for n, w in self._disconnect_waiters if n <= self.disconnects]
        self._disconnect_waiters = [(n, w) for n, w in self._disconnect_waiters if n > self.disconnects]
        for waiter in due:
            if not waiter.called:
                waiter.callback(None)

    def _record(self, request: Request) -> RecordedRequest:
        request.content.seek(0)
        headers: dict[str, list[str]] = {}
        for key, values in request.requestHeaders.getAllRawHeaders():
            headers.setdefault(key.decode("latin-1").lower(), []).extend(v.decode("latin-1") for v in values)
        recorded = RecordedRequest(
            method=request.method.decode("latin-1"),
            uri=request.uri.decode("latin-1"),
            headers=headers,
            body=request.content.read(),
        )
        self.requests.append(recorded)
        return recorded

    # -- routing -----------------------------------------------------------

    def _route(self, request: Request) -> None:
        recorded = self._record(request)
        method = "GET" if recorded.method == "HEAD" else recorded.method
        path = _clean_path(request.path.decode("latin-1"))
        inference = _is_inference(recorded.method, recorded.uri)
        exchange = _Exchange(self, request, inference=inference)
        if inference:
            waiters, self._request_waiters = self._request_waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(recorded)
        if path == "/":
            if method == "GET":
                exchange.send(200, b"Docker Model Runner is running", TEXT_PLAIN)
            else:
                exchange.send_error(404, "404 page not found")
        elif path == "/engines" or path.startswith("/engines/"):
            self._route_engines(exchange, method, path, recorded)
        elif path == "/models" and method == "GET":
            exchange.send_json([self._native_model(m) for m in self.models])
        elif path == "/models" or path.startswith("/models/"):
            exchange.send_error(404, "not found")
        else:
            exchange.send_error(404, "404 page not found")

    def _route_engines(self, exchange: _Exchange, method: str, path: str, recorded: RecordedRequest) -> None:
        parts = _engine_v1_path(path)
        if path == "/engines/status" and method == "GET":
            exchange.send_json(ENGINE_STATUS)
        elif parts is not None and method == "GET" and parts[1] == "models":
            exchange.run(self._answer_models(exchange, None))
        elif parts is not None and method == "GET" and parts[1].startswith("models/"):
            exchange.run(self._answer_models(exchange, unquote(parts[1][len("models/") :])))
        elif parts is not None and method == "POST" and parts[1] in INFERENCE_ENDPOINTS:
            self._check_inference(exchange, parts[0], parts[1], recorded.body)
        else:
            exchange.send_error(404, "not found")

    # -- model list --------------------------------------------------------

    def _find_model(self, ref: str) -> str | None:
        wanted = normalize_model_name(ref)
        return next((m for m in self.models if normalize_model_name(m) == wanted), None)

    @staticmethod
    def _model_object(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "docker"}

    @staticmethod
    def _native_model(model_id: str) -> dict[str, Any]:
        digest = hashlib.sha256(normalize_model_name(model_id).encode()).hexdigest()
        config = {"format": "gguf"}
        return {"id": f"sha256:{digest}", "tags": [model_id], "created": MODEL_CREATED, "config": config}

    async def _answer_models(self, exchange: _Exchange, name: str | None) -> None:
        """List (``name`` is None) or get one model, after ``models_delay``."""
        await exchange.sleep(self.models_delay)
        if self.models_status != 200:
            exchange.send_error(self.models_status, "internal error")
        elif name is None:
            exchange.send_json({"object": "list", "data": [self._model_object(m) for m in self.models]})
        elif (found := self._find_model(name)) is not None:
            exchange.send_json(self._model_object(found))
        else:
            exchange.send_error(404, _model_not_found(name))

    # -- inference -----------------------------------------------------------

    def _check_inference(self, exchange: _Exchange, backend: str | None, endpoint: str, body: bytes) -> None:
        """DMR's pre-engine checks (section 3), then hand the request to the engine."""
        try:
            payload, runner = self._validate(backend, endpoint, body)
        except _DMRError as error:
            exchange.send_error(error.status, error.message)
        else:
            exchange.run(self._engine(exchange, endpoint, payload, runner))

    def _validate(
        self, backend: str | None, endpoint: str, body: bytes
    ) -> tuple[dict[str, Any], Runner]:
        """Return the parsed body and the runner key, or raise the first DMR error."""
        if backend is not None and backend not in KNOWN_BACKENDS:
            raise _DMRError(404, "backend not found")
        if len(body) > MAX_INFERENCE_BODY:
            raise _DMRError(400, "request too large")
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except ValueError:
            raise _DMRError(400, "invalid request") from None
        payload = {} if payload is None else payload
        if not isinstance(payload, dict) or not isinstance(payload.get("model", ""), (str, type(None))):
            raise _DMRError(400, "invalid request")
        model = payload.get("model") or ""
        if not model:
            raise _DMRError(400, "model is required")
        found = self._find_model(model)
        if found is None:
            raise _DMRError(404, _model_not_found(model))
        mode = "embedding" if endpoint == "embeddings" else "completion"
        return payload, (mode, normalize_model_name(found))

    async def _engine(
        self, exchange: _Exchange, endpoint: str, payload: dict[str, Any], runner: Runner
    ) -> None:
        """The failure knobs, in order; otherwise load the model and generate."""
        if self.load_failure:
            exchange.send_error(500, LOAD_FAILURE_MESSAGE)
        elif self.loading_503 > 0:
            self.loading_503 -= 1
            exchange.send(503, LOADING_503_BODY, JSON_LLAMA, server=True)
        elif self.force_status is not None:
            status, body, content_type = self.force_status
            exchange.send(status, body, content_type.encode("latin-1"))
        else:
            await self._load(exchange, runner)
            await exchange.sleep(self.header_delay)
            await self._generate(exchange, endpoint, payload)

    async def _generate(self, exchange: _Exchange, endpoint: str, payload: dict[str, Any]) -> None:
        """llama.cpp's answer: context overflow, embeddings, a stream or one body."""
        if endpoint != "embeddings" and any(OVERFLOW_MARKER in t for t in _texts(payload, endpoint)):
            exchange.send(400, OVERFLOW_BODY, JSON_LLAMA, server=True)
        elif endpoint == "embeddings":
            self._embeddings(exchange, payload)
        elif payload.get("stream") is True:
            await self._stream(exchange, endpoint, payload)
        elif endpoint == "chat/completions" and self.big_body > 0:
            exchange.start(200, b"application/octet-stream", length=self.big_body, server=True)
            _BigBodyProducer(self, exchange, self.big_body).start()
        else:
            exchange.send(200, _dumps(self._completion(endpoint, payload)), JSON_LLAMA, server=True)

    async def _load(self, exchange: _Exchange, runner: Runner) -> None:
        """Wait for the runner's cold load (one shared load per runner)."""
        if runner in self._warm:
            return
        if runner not in self._loads:
            if self.cold_load_delay <= 0:
                self._warm.add(runner)
                return
            loaded: Deferred[None] = Deferred()
            call = self._reactor.callLater(self.cold_load_delay, self._loaded, runner)
            self._loads[runner] = (loaded, call)
        await exchange.wait(self._loads[runner][0])

    def _loaded(self, runner: Runner) -> None:
        loaded, _ = self._loads.pop(runner)
        self._warm.add(runner)
        loaded.callback(None)

    def _completion(self, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming llama.cpp chat or text completion body."""
        prompt_n, text = _count_tokens(_texts(payload, endpoint)), "".join(self.tokens)
        if endpoint == "chat/completions":
            choice: dict[str, Any] = {
                "finish_reason": "stop",
                "index": 0,
                "message": {"role": "assistant", "content": text},
            }
            obj = "chat.completion"
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}
            obj = "text_completion"
        return {
            "choices": [choice],
            "created": int(self._reactor.seconds()),
            "model": payload["model"],
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "object": obj,
            "usage": _usage(len(self.tokens), prompt_n),
            "id": _completion_id(),
            "timings": _timings(prompt_n, len(self.tokens)),
        }

    def _embeddings(self, exchange: _Exchange, payload: dict[str, Any]) -> None:
        """llama.cpp's embeddings answer, one deterministic vector per input."""
        if payload.get("input") is None:
            error = {"code": 400, "message": '"input" must be provided', "type": "invalid_request_error"}
            exchange.send(400, _dumps({"error": error}), JSON_LLAMA, server=True)
            return
        texts = _texts(payload, "embeddings")
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = _embedding(text)
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"embedding": packed if as_base64 else vector, "index": index, "object": "embedding"})
        tokens = sum(_count_tokens([t]) for t in texts)
        body = {
            "model": payload["model"],
            "object": "list",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": data,
        }
        exchange.send(200, _dumps(body), JSON_LLAMA, server=True)

    async def _stream(self, exchange: _Exchange, endpoint: str, payload: dict[str, Any]) -> None:
        """Send llama.cpp's SSE events one write at a time (section 5.4)."""
        tokens = list(self.tokens)
        fault = "truncate" if self.truncate_stream else "error" if self.midstream_error else None
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        events = _stream_events(
            chat=endpoint == "chat/completions",
            tokens=tokens[:FAULT_AFTER_CONTENT_EVENTS] if fault else tokens,
            prompt_n=_count_tokens(_texts(payload, endpoint)),
            model=payload["model"],
            created=int(self._reactor.seconds()),
            include_usage=include_usage,
            complete=fault is None,
        )
        exchange.start(200, EVENT_STREAM, server=True)
        for index, event in enumerate(events):
            if index:
                await exchange.sleep(self.chunk_delay)
            exchange.write(b"data: " + _dumps(event) + b"\n\n")
            if index == 0 and self.hold is not None:
                await exchange.wait(self.hold)
        if fault == "truncate":
            exchange.cut()  # no terminating chunk, no [DONE]
        else:
            await exchange.sleep(self.chunk_delay)
            exchange.write(b"data: " + (_dumps(MIDSTREAM_ERROR) if fault else b"[DONE]") + b"\n\n")
            exchange.finish()


class _DMRError(Exception):
    """A plain-text error DMR answers before the engine sees the request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def _reject_constant(name: str) -> Any:
    """Reject NaN and Infinity like Go's JSON decoder."""
    raise ValueError(f"invalid JSON constant {name}")


def _usage(completion: int, prompt: int) -> dict[str, int]:
    return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": completion + prompt}


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _stream_events(
    *,
    chat: bool,
    tokens: Sequence[str],
    prompt_n: int,
    model: str,
    created: int,
    include_usage: bool,
    complete: bool,
) -> list[dict[str, Any]]:
    """The JSON events of a llama.cpp stream, before ``[DONE]``.

    Chat: role chunk, one chunk per token, finish chunk, optional usage chunk.
    Text completion: one chunk per token, then a final chunk carrying usage.
    ``timings`` goes on the last event; an incomplete stream (mid-stream
    fault) stops after the content chunks.
    """
    cid = _completion_id()

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        # key order as llama.cpp emits it
        if chat:
            return {"choices": choices, "created": created, "id": cid, "model": model,
                    "system_fingerprint": SYSTEM_FINGERPRINT, "object": "chat.completion.chunk", **extra}
        return {"choices": choices, "created": created, "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "object": "text_completion", **extra, "id": cid}

    def delta(content: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"finish_reason": finish, "index": 0, "delta": content}]

    def text(content: str, finish: str | None = None) -> list[dict[str, Any]]:
        return [{"text": content, "index": 0, "logprobs": None, "finish_reason": finish}]

    usage = _usage(len(tokens), prompt_n)
    if chat:
        events = [chunk(delta({"role": "assistant", "content": None}))]
        events += [chunk(delta({"content": token})) for token in tokens]
        if complete:
            events.append(chunk(delta({}, "stop")))
            if include_usage:
                events.append(chunk([], usage=usage))
    else:
        events = [chunk(text(token)) for token in tokens]
        if complete:
            events.append(chunk(text("", "stop"), usage=usage))
    if complete:
        events[-1]["timings"] = _timings(prompt_n, len(tokens))
    return events
