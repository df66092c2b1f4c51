"""An in-process fake Docker Model Runner (DMR) for end-to-end tests of olladmr.

``FakeDMR`` is a plain ``twisted.web`` server listening on a real TCP port on
127.0.0.1.  It answers like a standalone DMR with the llama.cpp engine behind
it (see ``/work/shared/reference/dmr-behaviour.md`` sections 2-5, 7, 9, 10):

* DMR's own answers: the OpenAI model list, plain-text ``http.Error`` style
  errors in the dispatch order of section 3, ``/engines/status``, ``/`` and
  Go's ``404 page not found``; its Ollama layer (``/api/*``) and management
  routes (``/models``, ``/engines/df``, ``/version``, ...; see
  ``dmr-2026-surface.md`` sections 6 and 7);
* llama.cpp's answers: chat / text completions (plain JSON or SSE) and
  embeddings, plus llama.cpp's JSON errors.

Tests steer it through plain attributes ("knobs") that may be changed at any
time, and inspect what it received through ``requests`` and a few counters.
All timing goes through the injected reactor's ``callLater``.  An optional
``BackendState`` models the engine behind it (resident models, KV cache, slots,
prefill timing), with presets calibrated on the real DMR bundle
(``BackendState.real_engine()``) and for a small-cache compute-bound engine
(``BackendState.gpu_kv()``).

Run on its own for benchmarks, one fake per port, until SIGTERM::

    python tests/fakedmr.py serve --port P [--port P2 ...] [--preset real|gpukv|none] [knobs]

prints ``READY P P2 ...`` once every port listens; ``GET /fake/stats`` on a port
gives its counters (``?records=1``: every request too), ``POST /fake/reset``
empties its cache and counters (``serve --help`` lists the knobs).
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
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, unquote

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = [
    "BackendState", "FakeDMR", "Lease", "Prompt", "RecordedRequest", "StateRecord", "StoredResponse",
    "normalize_model_name",
]

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
OLLAMA_ROUTES = {"version": ("GET",), "tags": ("GET",), "ps": ("GET",), "show": ("POST",), "chat": ("POST",),
                 "generate": ("POST",), "pull": ("POST",), "delete": ("DELETE",)}
"""DMR's Ollama layer (``pkg/ollama``): ``/api/<name>`` and its one method; anything else under /api/ is a 404."""
OLLAMA_INFERENCE_PATHS = frozenset({"/api/chat", "/api/generate"})
OLLAMA_VERSION = "0.1.0"  # what DMR's /api/version always says
DMR_VERSION = "642c7211"  # GET /version: the build (the real bundle's commit)
KEEP_ALIVE_DEFAULT = 300.0  # inference.KeepAliveDefault: an idle runner's keep-alive (5m)
OLLAMA_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "num_predict": "max_tokens",
                  "stop": "stop", "seed": "seed", "presence_penalty": "presence_penalty",
                  "frequency_penalty": "frequency_penalty"}
"""Ollama ``options`` DMR copies into the chat completion it makes (under these names); the rest are dropped."""
MODEL_CONFIG = {"format": "gguf", "quantization": "MOSTLY_Q4_K_M", "parameters": "361.82M", "architecture": "llama",
                "size": "256.35MiB"}
"""Every fake model's ``config`` in ``/models`` (DMR's ``types.Config``, without the ``gguf`` map)."""
MODEL_BYTES = 268_802_458  # one fake model's size on disk (MODEL_CONFIG's size)
BACKEND_DISK_USAGE = 26_486_640  # /engines/df's default_backend_disk_usage (the real bundle's llama.cpp)
NDJSON = b"application/x-ndjson"

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
    a Responses API create, and Ollama's ``/api/chat`` and ``/api/generate``
    (an empty-prompt generate too, which DMR answers without the engine).
    """
    if method != "POST":
        return False
    path = _clean_slashes(uri.split("?", 1)[0])
    if path in OLLAMA_INFERENCE_PATHS:
        return True
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
    """Deterministic token count: whitespace-separated words, at least 1 (a BackendState's split reused)."""
    return max(1, sum(len(_WORDS.get(text) or text.split()) for text in texts))


def _embedding(text: str) -> list[float]:
    """A deterministic vector of float32-representable values in [-1, 1)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    halves = struct.unpack(f">{EMBEDDING_DIMENSIONS}H", digest[: 2 * EMBEDDING_DIMENSIONS])
    raw = [half / 32768.0 - 1.0 for half in halves]
    return list(struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", struct.pack(f"<{EMBEDDING_DIMENSIONS}f", *raw)))


def _timings(
    prompt_n: int, predicted_n: int, cache_n: int = 0, prompt_ms: float | None = None, interval: float = 0.0
) -> dict[str, Any]:
    """llama.cpp's ``timings`` block.  ``prompt_n`` is the whole prompt, of which ``cache_n`` tokens were
    cached (llama.cpp's ``prompt_n`` is what it computed: the rest).  Without a measured ``prompt_ms``:
    1 ms per prompt token and 10 ms per predicted token (the original figures); with one (a state's
    answer), ``interval`` (the fake's ``chunk_delay``) per predicted token."""
    if prompt_ms is None:
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
    computed = max(1, prompt_n - cache_n)
    predicted_ms = 1000.0 * interval * predicted_n
    return {
        "cache_n": cache_n,
        "prompt_n": prompt_n - cache_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / computed,
        "prompt_per_second": 1000.0 * computed / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1000.0 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0,
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
        self.lease: Lease | None = None  # with a BackendState: the hold on its model
        self.prompt_texts: list[str] | None = None  # with a BackendState: what the prefill charges
        self.ollama: _OllamaWriter | None = None  # /api/chat, /api/generate: DMR's translation of the answer
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
        self, status: int, content_type: bytes | None, *, length: int | None = None, server: bool | bytes = False
    ) -> None:
        """Set the status line and headers (sent with the first write).

        ``server``: True for llama.cpp's ``Server: llama.cpp``, or the header's value.
        ``content_type`` None: no Content-Type at all (Go sends none for an empty body).
        With an ``ollama`` writer, DMR's Ollama layer gets the engine's answer instead.
        """
        if self.ollama is not None:
            self.ollama.start(status, content_type, length, server)
        else:
            self._start(status, content_type, length=length, server=server)

    def _start(
        self, status: int, content_type: bytes | None, *, length: int | None = None, server: bool | bytes = False
    ) -> None:
        request = self.request
        request.setResponseCode(status)
        request.responseHeaders.removeHeader(b"server")
        if content_type is None:
            request.responseHeaders.removeHeader(b"content-type")
            request.defaultContentType = None
        else:
            request.setHeader(b"content-type", content_type)
        if server:
            request.setHeader(b"server", b"llama.cpp" if server is True else server)
        if length is not None:
            request.setHeader(b"content-length", b"%d" % length)
        for name, value in self.fake.extra_headers:
            request.responseHeaders.addRawHeader(name, value)

    def write(self, data: bytes) -> None:
        """Write ``data`` now, unless the response is over."""
        if self.ollama is not None:
            self.ollama.write(data)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        if not self.done:
            self.request.write(data)

    def finish(self) -> None:
        """Finish the response, unless it is over."""
        if self.ollama is not None:
            self.ollama.finish()
        else:
            self._finish()

    def _finish(self) -> None:
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
        if self.ollama is not None:
            self.ollama.cut()
        else:
            self._cut()

    def _cut(self) -> None:
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


PREFIX_CHUNK = 64
"""Tokens per hashed chunk of a prompt in ``BackendState``'s prefix cache."""
TEMPLATE_TOKEN = "\x00<tmpl>"
"""The token ``BackendState.message_tokens`` puts around messages (no text splits into it)."""
GENERATING_ENDPOINTS = frozenset({"chat/completions", "completions", "messages"})
"""Engine endpoints whose answers ``BackendState`` charges a prefill (time to first token) for;
Responses API creates are charged too (as endpoint ``"responses"``)."""


@dataclass
class StateRecord:
    """What a ``BackendState`` recorded about one inference request that reached the engine.

    Times are seconds on the fake's reactor clock.  ``prompt_tokens``, ``cached_tokens``
    and ``ttft`` stay 0 and ``first_token`` None for a request without a prefill
    (embeddings, rerank, score, images, count_tokens, a context overflow) or one that
    ended before its first token.
    """

    endpoint: str  # "chat/completions", "completions", "messages", "responses", "embeddings", …
    model: str  # DMR's normalised name, e.g. "ai/smollm2:latest"
    arrived: float  # when it asked for its model
    cold: bool = False  # it waited for a cold load (one it started or one it joined)
    admitted: float | None = None  # when it got hold of its (resident) model
    prompt_tokens: int = 0
    cached_tokens: int = 0  # covered by the longest cached prefix (always < prompt_tokens)
    ttft: float = 0.0  # the prefill's duration: base + per_token × (prompt_tokens - cached_tokens) (+ the
    # per_token_ctx term), times the contention factor once it ran (``prefill()`` alone: uncontended)
    first_token: float | None = None  # when the prefill ended and the first token went out
    queued: float = 0.0  # seconds it waited for a llama.cpp slot and for its prefill turn (or batch)

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to the first token (cold load, queueing, ``header_delay`` and prefill)."""
        return None if self.first_token is None else self.first_token - self.arrived


def _chain_hashes(words: Sequence[str], known: Sequence[int] = ()) -> list[int]:
    """Chained hashes of every full ``PREFIX_CHUNK``-word chunk of ``words``.

    ``known`` holds the hashes of its first ``len(known)`` chunks already (a prompt
    that ``words`` extends), so only the rest is hashed.
    """
    hashes = list(known)
    chained = hashes[-1] if hashes else 0
    for start in range(len(hashes) * PREFIX_CHUNK, len(words) - PREFIX_CHUNK + 1, PREFIX_CHUNK):
        chained = hash((chained, tuple(words[start : start + PREFIX_CHUNK])))
        hashes.append(chained)
    return hashes


_WORDS: dict[str, list[str]] = {}
"""Memo of ``text.split()``: a conversation resends its earlier messages every turn, and words
that are the same objects hash (into chunk hashes) several times faster than new ones."""
_WORDS_LIMIT = 1 << 19  # words held by the memo before it starts over
_words_held = [0]


def _words(text: str) -> list[str]:
    """``text.split()``, memoised (treat the list as read-only)."""
    words = _WORDS.get(text)
    if words is None:
        words = text.split()
        if _words_held[0] + len(words) > _WORDS_LIMIT:
            _WORDS.clear()
            _words_held[0] = 0
        _WORDS[text] = words
        _words_held[0] += len(words)
    return words


class Prompt:
    """A prompt split into words (its tokens) once, with the chained hashes of its chunks."""

    __slots__ = ("words", "hashes")

    def __init__(self, words: list[str], known: Sequence[int] = ()) -> None:
        self.words = words
        self.hashes = _chain_hashes(words, known)

    @classmethod
    def of(cls, texts: Sequence[str]) -> Prompt:
        """The whitespace-separated words of ``texts`` in order (words never run across two texts)."""
        words: list[str] = []
        for text in texts:
            words += _words(text)
        return cls(words)

    def __len__(self) -> int:
        return len(self.words)


@dataclass(eq=False)
class _CacheEntry:
    model: str
    words: list[str]
    hashes: list[int]


@dataclass(eq=False)
class _Prefill:
    """One request's prefill in a ``BackendState``'s scheduler: waiting for its turn, then running."""

    lease: Lease
    work: float  # seconds of token work before contention: per_token × uncached (+ the per_token_ctx term)
    fixed: float  # seconds besides base that contention leaves alone (slot_switch)
    deferred: Deferred[None]
    queued_at: float
    started: float | None = None
    delay: float = 0.0  # how long it runs (fixed when it starts)
    call: IDelayedCall | None = None  # its end (the batch's, with ``batch``)
    batch: list[_Prefill] | None = None  # ``batch``: every prefill of the batch it runs in


class Machine:
    """The computer several endpoints run on (share one between their ``BackendState`` objects, ``machine=``).

    A state's prefill that starts while ``n`` prefills run on the *other* states of the machine costs
    ``machine_contention × n`` more per token (real DMRs on one box compete for its cores).
    """

    def __init__(self) -> None:
        self.prefilling = 0  # prefills running on every state of this machine

    def __repr__(self) -> str:
        return f"<Machine prefilling={self.prefilling}>"


@dataclass(eq=False)
class _Resident:
    """A loaded model: what ``/engines/ps`` shows, who holds it, its llama.cpp slots."""

    model: str
    ref: str  # the reference (as sent) of the request that loaded it
    mode: str
    backend: str
    last_used: float
    users: int = 0
    busy: int = 0  # slots taken
    slot_waiters: deque[tuple[Lease, Deferred[None]]] = field(default_factory=deque)


@dataclass(eq=False)
class _Admission:
    """A request waiting for its model (to load, or for room to load it)."""

    model: str
    ref: str
    mode: str
    backend: str
    record: StateRecord
    deferred: Deferred[Lease] = field(default_factory=Deferred)


@dataclass(eq=False)
class _Load:
    ref: str
    mode: str
    backend: str
    waiters: list[_Admission]
    call: IDelayedCall | None = None


@dataclass(eq=False)
class Lease:
    """A request's hold on a resident model, from ``BackendState.acquire``; hand it back to ``release``."""

    state: BackendState
    resident: _Resident
    record: StateRecord
    cold: bool
    slot: bool = False
    prompt: Prompt | None = None
    released: bool = False
    held: _CacheEntry | None = None  # share_busy=False: the cache entry its slot took over while it runs
    job: _Prefill | None = None  # its prefill while it waits for its turn or runs
    waiting_since: float | None = None  # when it began waiting for a slot

    @property
    def model(self) -> str:
        return self.resident.model


class BackendState:
    """An optional, deterministic model of one DMR endpoint's loaded models and KV cache.

    Off by default: ``fake.state = BackendState(resident_capacity=2, cold_load=2.0)``
    switches it on for one fake (each fake needs its own; the fake binds its reactor
    as ``clock``).  Nothing is random, every delay is on that clock.  Knobs (keyword
    arguments, plain attributes read at each use; the defaults are the original model,
    ``real_engine()`` and ``gpu_kv()`` are calibrated presets):

    * ``resident_capacity`` (2): models loaded at once, by DMR's normalised name (all
      modes of a model share one entry, the mode shown is the loader's).  A request for
      a model that is neither loaded nor loading starts a load, evicting the least
      recently used *idle* resident model if at capacity (a load in progress counts
      towards capacity; DMR evicts every idle runner instead, and LRU is the useful
      part of that).  When every resident model is in use the request queues (FIFO,
      like DMR's wait for a free runner slot) until one is released.
    * ``cold_load`` (2.0 s): how long a load takes; concurrent requests for a model
      being loaded share the one load.  The fake waits for it before headers, and
      before ``header_delay``.  With a state, ``cold_load_delay`` and the fake's own
      runner list are unused and ``GET /engines/ps`` shows exactly the resident models
      (LRU first) then the loading ones, in DMR's ``BackendStatus`` shape.
    * ``base`` (0.02 s), ``per_token`` (0.00025 s), ``per_token_ctx`` (0): the prefill
      delay, i.e. the time to first token, is ``base + work``, ``work`` being
      ``per_token × uncached + per_token_ctx × (total² − cached²) / 2``: ``uncached``
      are the prompt's tokens not covered by the longest cached prefix among this
      model's cache entries here, ``total`` all its tokens, so with ``per_token_ctx``
      a token costs more the further into the context it sits (attention; on a small
      CPU model that term dominates long prompts).  Like llama.cpp, at least the last
      prompt token is always processed.  Non-streaming answers wait for it before
      headers; streams send headers at once and wait before the first event.
    * ``slot_switch`` (0): seconds more for a prefill whose cached prefix is under 10 %
      of its prompt (llama.cpp then takes its least recently used slot and swaps KV
      through its host-memory cache instead of continuing a slot).
    * ``slots`` (0, unlimited): llama.cpp's parallel slots per resident model; a
      request holds one from its prefill to the end of its answer, others queue
      (FIFO) before their prefill, after the stream's headers.
    * ``prefill_parallel`` (0, unlimited): at most this many prefills run at once on
      the endpoint (all models); the others wait for a turn, FIFO, holding their slot.
    * ``contention`` (0.0): a prefill's ``work`` is multiplied by ``1 + contention ×
      (k − 1)``, ``k`` being the prefills running at once on the endpoint when it
      starts (itself included); the delay is fixed when it starts.
    * ``batch`` (False): prefills run in batches, like llama.cpp's continuous batching
      on one CPU: when no batch runs, every waiting prefill (at most
      ``prefill_parallel``) starts as one batch; it lasts ``base + Σ work × (1 +
      contention × (k − 1))`` for its ``k`` prefills, which all get their first token at
      its end; prefills arriving meanwhile wait for the next batch.  So two prompts
      sent together both finish late, one sent during another's prefill waits for it.
      ``batch_window`` (0): an idle engine starts a batch this long after the first
      prefill arrives, so prefills sent together (within it) share the batch.
    * ``machine`` (None), ``machine_contention`` (0.0): states sharing one ``Machine``
      (endpoints on one computer) add ``machine_contention × n`` to that factor, ``n``
      being the prefills running on the machine's other states when it starts.
    * ``cache_tokens`` (65536), ``cache_prompts`` (0, unbounded): bounds on the tokens
      and on the entries (prompts) held by the prefix cache, all models together;
      least recently used entries go first, an entry longer than ``cache_tokens``
      keeps its first ``cache_tokens`` tokens.  After a complete answer the prompt plus
      the generated tokens become an entry (replacing entries it extends), as
      llama.cpp's KV cache holds both.  Evicting a model drops its entries.
    * ``recompute_answer`` (False): True stores the prompt only after an answer, so the
      next turn, which sends the answer back, prefills it again (a real engine whose
      generated tokens re-tokenize differently does that).
    * ``share_computed`` (False): True models a GPU engine with prefix caching (vLLM,
      SGLang): a queued prefill is matched when it starts, not when it was queued, and a
      prompt is cached (shareable) as soon as its prefill is done, not only after its
      answer; with ``prefill_parallel: 1`` a request queued behind another with the same
      head reuses it.
    * ``share_busy`` (True): False makes a cache entry the property of the request
      that matched it (its llama.cpp slot) until it ends: other requests cannot use it
      meanwhile (concurrent requests with one head each prefill it).  At the end the
      request's prompt (+ answer) becomes the entry, or, if it did not complete, the
      entry it held comes back.  Like llama.cpp, a request takes an entry over only if
      it matches at least 10 % of the prompt (else it gets the least recently used
      slot) and keeps at least half of the entry (else llama.cpp saves the slot's
      prompt to its host cache first, so the entry stays usable).  Either way a
      request's own prompt is not shared before it ends.
    * ``tokenizer`` ("words"): tokens are whitespace-separated words; "chars": every
      character is a token (the real bundle's ``ai/small``).  ``message_tokens`` (0):
      tokens of chat template around each text: that many marker tokens before every
      message (prompt) text and after the last (the assistant header).
    * ``context`` (0, unlimited): a chat or text completion whose prompt has more tokens
      gets llama.cpp's 400 ``exceed_context_size_error`` (with the actual numbers).

    Prompts: chat, every message's text content in order (system included); completions,
    the prompt; Anthropic Messages, system then messages; Responses API, instructions,
    then each earlier response of the ``previous_response_id`` chain (oldest first) with
    its input and output, then the input.  The failure knobs (``load_failure``,
    ``loading_503``, ``force_status``) answer before the state model sees a request.

    Counters and records, cleared by ``reset()`` (the fake's ``reset()`` calls it):
    ``cold_loads`` (loads performed), ``evictions`` (models unloaded for room),
    ``cache_hits_tokens`` / ``cache_miss_tokens`` (prompt tokens found cached / prefilled),
    ``max_queue`` (most requests waiting at once for a slot or a prefill turn, not
    counting those a ``batch_window`` gathers), ``queue_wait`` (seconds from having the
    model to the prefill's start, summed: slot, turn, batch and window waits),
    ``records`` (a ``StateRecord`` per inference request, in arrival order).
    Views: ``resident``, ``loading``, ``cache_used``, ``entries``, ``waiting``,
    ``prefilling``, ``lookup()``, ``prompt()``, ``ps()``, ``stats()``.
    ``clear()`` (the fake's ``stop()`` calls it: a restarted DMR has nothing loaded)
    empties the resident set, loads, queues and cache but keeps counters and records.

    The prefix match hashes ``PREFIX_CHUNK``-token chunks (chained), then compares tokens
    within one chunk, so an 8k-token prompt costs the fake a fraction of a millisecond.
    """

    def __init__(
        self, *, resident_capacity: int = 2, cold_load: float = 2.0, base: float = 0.02,
        per_token: float = 0.00025, cache_tokens: int = 65536, slots: int = 0, clock: Any = None,
        per_token_ctx: float = 0.0, prefill_parallel: int = 0, contention: float = 0.0, batch: bool = False,
        machine: Machine | None = None, machine_contention: float = 0.0, cache_prompts: int = 0,
        share_busy: bool = True, recompute_answer: bool = False, tokenizer: str = "words",
        message_tokens: int = 0, context: int = 0, slot_switch: float = 0.0, batch_window: float = 0.0,
        share_computed: bool = False,
    ) -> None:
        if tokenizer not in ("words", "chars"):
            raise ValueError(f"tokenizer must be 'words' or 'chars', not {tokenizer!r}")
        self.resident_capacity = resident_capacity
        self.cold_load = cold_load
        self.base = base
        self.per_token = per_token
        self.per_token_ctx = per_token_ctx
        self.slot_switch = slot_switch
        self.cache_tokens = cache_tokens
        self.cache_prompts = cache_prompts
        self.slots = slots
        self.prefill_parallel = prefill_parallel
        self.contention = contention
        self.batch = batch
        self.batch_window = batch_window
        self.machine = machine
        self.machine_contention = machine_contention
        self.share_busy = share_busy
        self.share_computed = share_computed
        self.recompute_answer = recompute_answer
        self.tokenizer = tokenizer
        self.message_tokens = message_tokens
        self.context = context
        self.clock: Any = clock  # IReactorTime; None: the global reactor (a FakeDMR binds its own)
        self._owner: object = None
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self._loading: dict[str, _Load] = {}
        self._queue: deque[_Admission] = deque()
        self._draining = self._drain_again = False
        self._entries: OrderedDict[int, _CacheEntry] = OrderedDict()  # LRU first
        self._index: dict[str, dict[int, set[int]]] = {}  # model -> chained chunk hash -> entry ids
        self._by_model: dict[str, set[int]] = {}
        self._entry_ids = itertools.count()
        self.cache_used = 0
        self._pending: deque[_Prefill] = deque()  # prefills waiting for their turn, FIFO
        self._running: list[_Prefill] = []  # prefills running (with ``batch``: the batch)
        self._pumping = False
        self._window: IDelayedCall | None = None  # batch_window: the batch about to start
        self._window_over = False  # the next batch starts without a window
        self._slot_waiting = 0  # requests waiting for a llama.cpp slot
        self.reset()

    # Calibrated on the real DMR bundle (tools/realdmr, ai/small, llama.cpp with 1 thread per engine as
    # bench/routing.py runs it, 2 engines on a 2-core box; see tests/test_fakedmr_real.py): a cold prompt
    # of 32 tokens takes ~26 ms to its first token, 1,016 ~245, 2,010 ~720, 3,500 ~1,650; 410 tokens
    # after 1,000 cached ~185, one token after 1,000 ~10; two 1,000-token prompts sent together to one
    # engine both take ~2.3x as long, four ~5.5x on average; a prompt sent during another's prefill waits
    # for it; prefilling on both engines at once costs ~1.1-1.25x.  (With DMR's default 2 threads per
    # engine, two engines prefilling at once slow each other ~8x: not modelled.)
    REAL_ENGINE: dict[str, Any] = dict(
        resident_capacity=2, cold_load=0.5, slots=4, base=0.003, slot_switch=0.016, per_token=1.22e-4,
        per_token_ctx=2.24e-7, batch=True, batch_window=0.003, prefill_parallel=0, contention=0.15,
        machine_contention=0.25, cache_tokens=1 << 24, cache_prompts=0, share_busy=False, recompute_answer=True,
        tokenizer="chars", message_tokens=11, context=4096,
    )
    GPU_KV: dict[str, Any] = dict(
        cold_load=0.0, slots=0, prefill_parallel=1, base=0.015, per_token=0.0001, contention=0.0,
        cache_prompts=6, cache_tokens=1 << 30, share_busy=True, recompute_answer=False, share_computed=True,
    )

    @classmethod
    def real_engine(cls, **overrides: Any) -> BackendState:
        """The real DMR bundle's ``ai/small`` (llama.cpp, 1 thread, CPU), as measured (``REAL_ENGINE``).

        Tokens are characters (1 char = 1 token, 11 template tokens around each message), prefills
        run in batches (a prompt sent during another's prefill waits for it, prompts sent together
        share one slower batch), a token costs more the further into the context it sits, 4 slots,
        a busy slot's prefix is not shared, an answer sent back is prefilled again, the cache is
        practically unbounded (llama.cpp keeps evicted slots' prompts in host memory), at most 4,096
        tokens per prompt.  Share a ``Machine`` (``machine=``) between the states of endpoints meant
        to run on one computer.  Answers: pair it with the fake's ``chunk_delay`` ≈ 0.005 s (decoding
        ~1.5 ms a token at 500 tokens of context, ~5 at 1,400, ~9 at 2,400).
        """
        return cls(**{**cls.REAL_ENGINE, **overrides})

    @classmethod
    def gpu_kv(cls, **overrides: Any) -> BackendState:
        """A compute-bound engine with a small (GPU) KV cache: one prefill at a time per endpoint,
        15 ms + 0.1 ms per uncached word, 6 prompts cached, busy prefixes shared (``GPU_KV``)."""
        return cls(**{**cls.GPU_KV, **overrides})

    def __repr__(self) -> str:
        return f"<BackendState resident={self.resident} loading={self.loading} cache_used={self.cache_used}>"

    def _clock(self) -> Any:
        if self.clock is None:
            from twisted.internet import reactor as global_reactor

            self.clock = global_reactor
        return self.clock

    def _now(self) -> float:
        return float(self._clock().seconds())

    # -- views ---------------------------------------------------------------

    @property
    def resident(self) -> list[str]:
        """The loaded models' normalised names, least recently used first."""
        return list(self._resident)

    @property
    def loading(self) -> list[str]:
        """The models being loaded."""
        return list(self._loading)

    @property
    def entries(self) -> list[tuple[str, int]]:
        """The prefix cache as (model, tokens) pairs, least recently used first."""
        return [(entry.model, len(entry.words)) for entry in self._entries.values()]

    @property
    def waiting(self) -> int:
        """Requests waiting now for a slot or a prefill turn (not those a ``batch_window`` gathers)."""
        gathering = self._window is not None and not self._running
        return self._slot_waiting + (0 if gathering else len(self._pending))

    @property
    def prefilling(self) -> int:
        """Prefills running now (with ``batch``: the current batch's)."""
        return len(self._running)

    def lookup(self, model: str, texts: Sequence[str] | Prompt) -> int:
        """How many tokens of a prompt for ``model`` (normalised) are cached here now; changes nothing."""
        prompt = texts if isinstance(texts, Prompt) else self.prompt(texts)
        return min(self._match(model, prompt)[0], max(0, len(prompt) - 1))

    def prompt(self, texts: Sequence[str]) -> Prompt:
        """The tokens of a prompt made of ``texts``, by ``tokenizer`` and ``message_tokens``."""
        if self.tokenizer == "words" and self.message_tokens <= 0:
            return Prompt.of(texts)
        marks = [TEMPLATE_TOKEN] * max(0, self.message_tokens)
        tokens: list[str] = []
        for text in texts:
            tokens += marks
            tokens += self._tokens(text)
        tokens += marks
        return Prompt(tokens)

    def _tokens(self, text: str) -> list[str]:
        return list(text) if self.tokenizer == "chars" else _words(text)

    def stats(self) -> dict[str, Any]:
        """The counters and sizes as one JSON-ready dict (what ``serve``'s ``GET /fake/stats`` shows)."""
        return {
            "requests": len(self.records), "cache_hits_tokens": self.cache_hits_tokens,
            "cache_miss_tokens": self.cache_miss_tokens, "cold_loads": self.cold_loads, "evictions": self.evictions,
            "max_queue": self.max_queue, "queue_wait_s": round(self.queue_wait, 6), "cache_entries": len(self._entries),
            "cache_used": self.cache_used, "resident": self.resident, "prefilling": self.prefilling,
            "waiting": self.waiting,
        }

    def ps(self) -> list[dict[str, Any]]:
        """``GET /engines/ps``: resident models (LRU first), then loading ones (Go's omitempty)."""
        return [entry for entry, _ in self._ps_rows()]

    def _ps_rows(self) -> list[tuple[dict[str, Any], float | None]]:
        """``ps()``'s entries, each with its last use (None while in use or loading)."""
        rows: list[tuple[dict[str, Any], float | None]] = []
        for res in self._resident.values():
            entry: dict[str, Any] = {"backend_name": res.backend, "model_name": res.ref, "mode": res.mode,
                                     "last_used": GO_ZERO_TIME if res.users else _go_time(res.last_used)}
            if res.users:
                entry["in_use"] = True
            rows.append((entry, None if res.users else res.last_used))
        for load in self._loading.values():
            rows.append(({"backend_name": load.backend, "model_name": load.ref, "mode": load.mode,
                          "last_used": GO_ZERO_TIME, "loading": True}, None))
        return rows

    def unload(self, model: str) -> bool:
        """Unload ``model`` (normalised name) if it is resident and idle, as DMR's ``/engines/unload``
        does (its cache entries go; not counted in ``evictions``); whether it did.  Queued requests
        may then take the room."""
        res = self._resident.get(model)
        if res is None or res.users:
            return False
        del self._resident[model]
        for entry_id in list(self._by_model.get(model, ())):
            self._drop(entry_id)
        if self._queue:
            self._drain()
        return True

    # -- lifecycle -----------------------------------------------------------

    def clear(self) -> None:
        """Nothing loaded, nothing loading or queued, nothing cached (counters and records stay).

        Requests still waiting are left waiting (a stopping fake cuts their connections).
        """
        for load in self._loading.values():
            if load.call is not None and load.call.active():
                load.call.cancel()
        for job in [*self._running, *self._pending]:  # their requests wait on (a stopping fake cuts them)
            if job.call is not None and job.call.active():
                job.call.cancel()
            if job.started is not None and self.machine is not None:
                self.machine.prefilling -= 1
            job.lease.job = None
        self._running.clear()
        self._pending.clear()
        if self._window is not None and self._window.active():
            self._window.cancel()
        self._window, self._window_over = None, False
        self._slot_waiting = 0
        self._loading.clear()
        self._resident.clear()
        self._queue.clear()
        self._entries.clear()
        self._index.clear()
        self._by_model.clear()
        self.cache_used = 0

    def reset(self) -> None:
        """``clear()``, and zero the counters and records."""
        self.clear()
        self.cold_loads = 0
        self.evictions = 0
        self.cache_hits_tokens = 0
        self.cache_miss_tokens = 0
        self.max_queue = 0
        self.queue_wait = 0.0
        self.records: list[StateRecord] = []

    # -- resident models -------------------------------------------------------

    def acquire(
        self, model: str, *, ref: str | None = None, mode: str = "completion", backend: str = "llama.cpp",
        endpoint: str = "chat/completions",
    ) -> Deferred[Lease]:
        """Hold ``model`` (normalised name) once it is resident; fires with a ``Lease``.

        Records the request.  Cancelling the Deferred withdraws the request (a load
        it started goes on).
        """
        record = StateRecord(endpoint, model, self._now())
        self.records.append(record)
        admission = _Admission(model, ref or model, mode, backend, record)
        admission.deferred = Deferred(lambda _: self._withdraw(admission))
        known = model in self._resident or model in self._loading
        if (self._queue and not known) or not self._admit(admission):
            self._queue.append(admission)
        return admission.deferred

    def release(self, lease: Lease) -> None:
        """Give back what ``acquire`` (and ``slot``) gave; idempotent."""
        if lease.released:
            return
        lease.released = True
        if lease.job is not None:
            self._cancel(lease.job)
        for waiting in [w for w in lease.resident.slot_waiters if w[0] is lease]:  # (its Deferred never fires)
            lease.resident.slot_waiters.remove(waiting)
            self._slot_waiting -= 1
            self._waited(lease.record, lease.waiting_since)
        held, lease.held = lease.held, None
        if held is not None and self._current(lease):  # it did not complete: its slot still holds that prefix
            self._insert(held.model, Prompt(held.words, held.hashes))
        res = lease.resident
        res.users -= 1
        res.last_used = self._now()
        if self._resident.get(res.model) is res:
            self._resident.move_to_end(res.model)
        if lease.slot:
            self._free_slot(lease)
        if res.users == 0 and self._queue:
            self._drain()

    def _withdraw(self, admission: _Admission) -> None:
        if admission in self._queue:
            self._queue.remove(admission)
        load = self._loading.get(admission.model)
        if load is not None and admission in load.waiters:
            load.waiters.remove(admission)

    def _admit(self, admission: _Admission) -> bool:
        """Grant, join a load, or start one (evicting if need be); False if it must wait."""
        model = admission.model
        res = self._resident.get(model)
        if res is not None:
            self._resident.move_to_end(model)
            self._grant([admission], res, cold=False)
            return True
        load = self._loading.get(model)
        if load is not None:
            load.waiters.append(admission)
            return True
        if len(self._resident) + len(self._loading) >= max(1, self.resident_capacity):
            victim = next((r for r in self._resident.values() if r.users == 0), None)
            if victim is None:
                return False
            self._evict(victim)
        load = _Load(admission.ref, admission.mode, admission.backend, [admission])
        self._loading[model] = load
        self.cold_loads += 1
        if self.cold_load > 0:
            load.call = self._clock().callLater(self.cold_load, self._loaded, model)
        else:
            self._loaded(model)
        return True

    def _loaded(self, model: str) -> None:
        load = self._loading.pop(model)
        res = _Resident(model, load.ref, load.mode, load.backend, self._now())
        self._resident[model] = res
        self._grant(load.waiters, res, cold=True)
        if self._queue:
            self._drain()

    def _grant(self, admissions: list[_Admission], res: _Resident, *, cold: bool) -> None:
        res.users += len(admissions)  # all pinned before any caller runs on
        now = self._now()
        for admission in admissions:
            admission.record.cold, admission.record.admitted = cold, now
        for admission in admissions:
            admission.deferred.callback(Lease(self, res, admission.record, cold))

    def _drain(self) -> None:
        """Admit queued requests in order while there is room."""
        if self._draining:
            self._drain_again = True
            return
        self._draining = True
        try:
            again = True
            while again:
                self._drain_again = False
                while self._queue:
                    admission = self._queue.popleft()
                    if not self._admit(admission):
                        self._queue.appendleft(admission)
                        break
                again = self._drain_again
        finally:
            self._draining = False

    def _evict(self, res: _Resident) -> None:
        del self._resident[res.model]
        self.evictions += 1
        for entry_id in list(self._by_model.get(res.model, ())):
            self._drop(entry_id)

    # -- llama.cpp slots -------------------------------------------------------

    def slot(self, lease: Lease) -> Deferred[None]:
        """A slot of the lease's model (at once unless ``slots`` are all taken); ``release`` frees it."""
        res = lease.resident
        if lease.slot or lease.released:
            return succeed(None)
        if self.slots <= 0 or res.busy < self.slots:
            res.busy += 1
            lease.slot = True
            return succeed(None)

        def withdraw(d: Deferred[None]) -> None:
            res.slot_waiters.remove((lease, d))
            self._slot_waiting -= 1
            self._waited(lease.record, lease.waiting_since)

        lease.waiting_since = self._now()
        self._slot_waiting += 1
        self.max_queue = max(self.max_queue, self.waiting)
        waiter: Deferred[None] = Deferred(withdraw)
        res.slot_waiters.append((lease, waiter))
        return waiter

    def _free_slot(self, lease: Lease) -> None:
        lease.slot = False
        res = lease.resident
        if res.slot_waiters:
            waiting, waiter = res.slot_waiters.popleft()
            waiting.slot = True
            self._slot_waiting -= 1
            self._waited(waiting.record, waiting.waiting_since)
            waiter.callback(None)
        else:
            res.busy -= 1

    def _waited(self, record: StateRecord, since: float | None) -> None:
        """A request waited since ``since`` (for a slot, or before its prefill started)."""
        if since is not None:
            waited = self._now() - since
            record.queued += waited
            self.queue_wait += waited

    # -- prefills ------------------------------------------------------------------

    def prefill(self, lease: Lease, texts: Sequence[str] | Prompt) -> float:
        """Charge the prompt's prefill now: match it, record it, count it; return its uncontended
        delay (``base`` + ``slot_switch`` if it applies + ``work``).  ``begin()`` runs it on the clock instead."""
        work, fixed = self._charge(lease, texts)
        return self.base + fixed + work

    def begin(self, lease: Lease, texts: Sequence[str] | Prompt) -> Deferred[None]:
        """The prefill of a request holding its slot: charged now (``prefill()``), then run when its turn
        (or batch) comes, its delay fixed when it starts; fires at its first token.  Cancelling it (or
        releasing the lease) withdraws it."""
        if self.share_computed:  # matched when it starts (see _charged)
            lease.prompt = texts if isinstance(texts, Prompt) else self.prompt(texts)
            work, fixed = -1.0, 0.0  # (charged in _charged)
        else:
            work, fixed = self._charge(lease, texts)
        job = _Prefill(lease, work, fixed, Deferred(lambda _: self._cancel(job)), self._now())
        lease.job = job
        self._pending.append(job)
        self._pump()
        self.max_queue = max(self.max_queue, self.waiting)
        return job.deferred

    def _charge(self, lease: Lease, texts: Sequence[str] | Prompt) -> tuple[float, float]:
        """Match the prompt (a busy slot takes its entry unless ``share_busy``), record and count it;
        return its work (seconds, before contention) and its slot switch (seconds)."""
        prompt = texts if isinstance(texts, Prompt) else self.prompt(texts)
        lease.prompt = prompt
        total = len(prompt)
        matched, entry_id = self._match(lease.model, prompt) if self._current(lease) else (0, None)
        cached = min(matched, max(0, total - 1))
        if entry_id is not None:
            entry = self._entries[entry_id]
            if self.share_busy or lease.held is not None or cached * 10 < total or cached * 2 < len(entry.words):
                self._entries.move_to_end(entry_id)  # shared, or (llama.cpp) another slot / a saved copy serves it
            else:  # its slot now holds that prefix: nobody else's until it ends
                lease.held = entry
                self._drop(entry_id)
        work = self.per_token * (total - cached)
        if self.per_token_ctx:
            work += self.per_token_ctx * (total * total - cached * cached) / 2
        fixed = self.slot_switch if self.slot_switch and cached * 10 < total else 0.0
        self.cache_hits_tokens += cached
        self.cache_miss_tokens += total - cached
        record = lease.record
        record.prompt_tokens, record.cached_tokens, record.ttft = total, cached, self.base + fixed + work
        return work, fixed

    def _factor(self, running: int) -> float:
        """The contention factor of a prefill starting with ``running`` prefills (itself included) here."""
        factor = 1.0
        if self.contention and running > 1:
            factor += self.contention * (running - 1)
        if self.machine is not None and self.machine_contention:
            others = self.machine.prefilling - len(self._running)
            if others > 0:
                factor += self.machine_contention * others
        return factor

    def _pump(self) -> None:
        """Start what may start: the next batch (``batch``), or pending prefills while turns are free."""
        if self._pumping:
            return
        self._pumping = True
        finished: list[_Prefill] = []
        try:
            limit = self.prefill_parallel
            if self.batch:
                while not self._running and self._pending:
                    if self.batch_window > 0 and not self._window_over:
                        if self._window is None:
                            self._window = self._clock().callLater(self.batch_window, self._window_closed)
                        break
                    self._window_over = False
                    count = min(len(self._pending), limit if limit > 0 else len(self._pending))
                    jobs = [self._charged(self._pending.popleft()) for _ in range(count)]
                    factor = self._factor(len(jobs))
                    work = sum(job.work for job in jobs)
                    delay = self.base + sum(job.fixed for job in jobs) + (work if factor == 1.0 else work * factor)
                    for job in jobs:
                        self._start(job, jobs)
                    finished += self._schedule(jobs, delay)
            else:
                while self._pending and (limit <= 0 or len(self._running) < limit):
                    job = self._charged(self._pending.popleft())
                    factor = self._factor(len(self._running) + 1)
                    delay = self.base + job.fixed + (job.work if factor == 1.0 else job.work * factor)
                    self._start(job, None)
                    finished += self._schedule([job], delay)
        finally:
            self._pumping = False
        for job in finished:
            job.deferred.callback(None)

    def _charged(self, job: _Prefill) -> _Prefill:
        """``share_computed``: the job's prompt matched (and counted) now, as its prefill starts."""
        if job.work < 0 and job.lease.prompt is not None:
            job.work, job.fixed = self._charge(job.lease, job.lease.prompt)
        return job

    def _window_closed(self) -> None:
        self._window, self._window_over = None, bool(self._pending)
        self._pump()

    def _start(self, job: _Prefill, batch: list[_Prefill] | None) -> None:
        job.started, job.batch = self._now(), batch
        self._waited(job.lease.record, job.queued_at)
        self._running.append(job)
        if self.machine is not None:
            self.machine.prefilling += 1

    def _schedule(self, jobs: list[_Prefill], delay: float) -> list[_Prefill]:
        """End ``jobs`` after ``delay``; a delay that is not positive ends them now (returned to fire)."""
        for job in jobs:
            job.delay = delay
        if delay > 0:
            call = self._clock().callLater(delay, self._finish, jobs)
            for job in jobs:
                job.call = call
            return []
        self._end(jobs)
        return jobs

    def _end(self, jobs: list[_Prefill]) -> None:
        for job in jobs:
            lease = job.lease
            if self.share_computed and lease.prompt is not None and self._current(lease) and self.cache_tokens > 0:
                self._insert(lease.model, lease.prompt)  # computed: shareable from now on
            if job in self._running:
                self._running.remove(job)
                if self.machine is not None:
                    self.machine.prefilling -= 1
            job.lease.job = None
            job.lease.record.ttft = job.delay

    def _finish(self, jobs: list[_Prefill]) -> None:
        jobs = [job for job in jobs if job.lease.job is job]  # not withdrawn meanwhile
        self._end(jobs)
        if self.batch and not self._running and self._pending:
            self._window_over = True  # the engine goes on with what waits, at once
        self._pump()
        for job in jobs:
            job.deferred.callback(None)

    def _cancel(self, job: _Prefill) -> None:
        """Withdraw a prefill: waiting, it leaves the queue; running, its turn (or, the last of its
        batch, the batch) ends now."""
        if job.lease.job is not job:
            return
        job.lease.job = None
        if job.started is None:
            if job in self._pending:
                self._pending.remove(job)
            self._waited(job.lease.record, job.queued_at)
            return
        self._running.remove(job)
        if self.machine is not None:
            self.machine.prefilling -= 1
        batch = job.batch or [job]
        if job.call is not None and job.call.active() and not any(other.lease.job is other for other in batch):
            job.call.cancel()
        if self.batch and not self._running and self._pending:
            self._window_over = True  # the batch is over: the engine goes on at once
        if not self._running or not self.batch:
            self._pump()

    # -- prefix cache ------------------------------------------------------------

    def remember(self, lease: Lease, generated: str = "") -> None:
        """After a complete answer: the prompt plus the generated tokens (only the prompt with
        ``recompute_answer``) become a cache entry."""
        prompt = lease.prompt
        lease.held = None  # its slot now holds this prompt
        if prompt is None or not self._current(lease) or self.cache_tokens <= 0:
            return
        extra = [] if self.recompute_answer else self._tokens(generated)
        self._insert(lease.model, Prompt(prompt.words + extra, prompt.hashes) if extra else prompt)

    def _current(self, lease: Lease) -> bool:
        """Whether the lease's model is still the loaded one (an evicted runner's KV cache is gone)."""
        return self._resident.get(lease.model) is lease.resident

    def _match(self, model: str, prompt: Prompt) -> tuple[int, int | None]:
        """The longest cached prefix of ``prompt`` for ``model``: (tokens, entry id)."""
        index = self._index.get(model)
        if index is None or not self._by_model.get(model):  # (entries shorter than a chunk have no hash)
            return 0, None
        hashes, words = prompt.hashes, prompt.words
        chunks = 0
        for chained in hashes:
            if chained not in index:
                break
            chunks += 1
        candidates = index[hashes[chunks - 1]] if chunks else self._by_model[model]
        start = chunks * PREFIX_CHUNK
        best, best_id = 0, None
        for entry_id in sorted(candidates):
            other = self._entries[entry_id].words
            end = min(len(other), len(words), start + PREFIX_CHUNK)  # chunk `chunks` differs or is partial
            if other[start:end] == words[start:end]:
                n = end
            else:
                n = start
                while other[n] == words[n]:
                    n += 1
            if n > best:
                best, best_id = n, entry_id
                if n == len(words):
                    break
        return best, best_id

    def _insert(self, model: str, sequence: Prompt) -> None:
        cap = self.cache_tokens
        words, hashes = sequence.words, sequence.hashes
        if len(words) > cap:
            words, hashes = words[:cap], hashes[: cap // PREFIX_CHUNK]
            sequence = Prompt(words, hashes)
        if not words:
            return
        covered, entry_id = self._match(model, sequence)
        if entry_id is not None and covered == len(words):  # an entry holds it all already
            self._entries.move_to_end(entry_id)
            return
        for entry_id in list(self._by_model.get(model, ())):  # entries this one extends
            old = self._entries[entry_id]
            full = len(old.hashes) * PREFIX_CHUNK
            if (len(old.words) <= len(words) and old.hashes == hashes[: len(old.hashes)]
                    and old.words[full:] == words[full : len(old.words)]):
                self._drop(entry_id)
        entry_id = next(self._entry_ids)
        self._entries[entry_id] = _CacheEntry(model, words, hashes)
        self._by_model.setdefault(model, set()).add(entry_id)
        index = self._index.setdefault(model, {})
        for chained in hashes:
            index.setdefault(chained, set()).add(entry_id)
        self.cache_used += len(words)
        while self.cache_used > cap or 0 < self.cache_prompts < len(self._entries):
            self._drop(next(iter(self._entries)))

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.cache_used -= len(entry.words)
        ids = self._by_model[entry.model]
        ids.discard(entry_id)
        index = self._index[entry.model]
        for chained in entry.hashes:
            holders = index[chained]
            holders.discard(entry_id)
            if not holders:
                del index[chained]
        if not ids:
            del self._by_model[entry.model]
            del self._index[entry.model]


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
      make every model cold again.  Unused while ``state`` is set.
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
    * ``health_route`` (False): serve ``GET /engines/health`` as llama-server's
      ``/health`` (200 ``{"status":"ok"}``), which SGLang's router probes when a
      worker's URL is ``http://host:port/engines``.  The real DMR has no such route
      (404 ``not found``, its ``/engines`` catch-all), hence off by default.
    * ``response_ttl``: seconds (on the fake's reactor clock) a stored Responses
      API response stays retrievable; DMR's is one hour.
    * ``ollama_truncate_after`` (0: off): an Ollama NDJSON stream (``/api/chat``,
      ``/api/generate``, ``/api/pull``) closes the connection once that many lines
      went out, leaving the chunked body unterminated (so with fewer lines than the
      stream has, the ``done: true`` line never comes).  ``truncate_stream`` cuts
      chat and generate streams too (after the engine's second content event: 3
      lines), ``midstream_error`` ends them cleanly after an empty line and no
      ``done`` line, ``hold`` holds them after their first line; ``header_delay``
      and cold loads hold their headers.
    * ``state``: None (default), or a ``BackendState`` modelling the endpoint's
      resident models (LRU, cold loads before headers, ``/engines/ps``) and prefix
      (KV) cache (time to first token from the uncached prompt tokens), with its
      counters and per-request ``StateRecord``s; see ``BackendState``.  Kept by
      ``reset()``, which resets it; ``stop()`` clears it.  With a state, chat and
      text completions report its token counts: ``usage.prompt_tokens`` (plus
      ``prompt_tokens_details.cached_tokens``) and ``timings`` (``cache_n``,
      ``prompt_n`` = the tokens computed, ``prompt_ms`` = the prefill's duration,
      ``predicted_ms`` = ``chunk_delay`` per token), like llama.cpp's.

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
      or loading runner has Go's zero ``last_used``; ``keep_alive`` once one was
      configured); with a ``state``, its resident and loading models instead.
    * DMR's Ollama layer (``pkg/ollama``, checked against the real bundle; see
      ``_OllamaWriter``): ``GET /api/version`` (``{"version":"0.1.0"}``),
      ``/api/tags`` (one entry per model, ``details`` from ``MODEL_CONFIG``),
      ``/api/ps`` (the ``/engines/ps`` runners, ``expires_at`` = last use +
      keep-alive, 5 min unless configured; Go's zero time while in use or
      loading), ``POST /api/show`` (only ``details``; 404 ``Model not found: …``),
      ``/api/chat`` and ``/api/generate`` (turned into the chat completion DMR
      makes, which goes through this fake's chat/completions path: its checks,
      failure knobs, delays, ``hold``, ``midstream_error``, ``truncate_stream`` and
      ``state``; ``stream`` absent = true; a boolean ``think``, ``options.num_ctx``
      and ``keep_alive`` reconfigure the model's runner, which unloads it if idle
      and the configuration changed; an empty ``prompt`` unloads the model (200
      ``{}``) or, with a non-zero ``keep_alive``, only configures it), ``POST
      /api/pull`` (NDJSON status lines; a new name joins ``models``) and ``DELETE
      /api/delete`` (unload, drop from ``models``, ``{}``).  Bodies are decoded with
      Go's rules and messages (``400 Invalid request: …``); any other ``/api/…`` is
      ``404 page not found``, a wrong method 405 with ``Allow``; ``/api``, ``/v1``
      and ``/engines`` are 307 redirects to the same path with a slash.
    * Management (``/models``, what ``docker model`` reads): ``GET /models`` and
      ``/models/{name}`` (DMR's ``Model`` objects; ``smollm2`` finds
      ``ai/smollm2``; 404 ``model not found``), ``GET /engines/df``, ``/version``
      (any method), ``GET /engines/_configure``; the writes change the fake like
      DMR: ``POST /models/create`` (adds the model), ``DELETE /models/{name}`` and
      ``/models/purge``, ``POST /models/{name}/tag`` and ``…/repackage`` (``…/push``
      fails: no registry), ``POST /engines/unload``
      (idle runners; ``{"unloaded_runners": N}``), ``POST
      /engines[/{b}]/_configure`` (202; no preload).  ``reset()`` restores
      ``models`` and forgets configurations.

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
        self._configs: dict[str, dict[str, Any]] = {}  # runner configurations by _model_key (DMR's runnerConfigs)
        self.port = 0
        self.active = 0
        self._state: BackendState | None = None
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
        self.health_route = False
        self.response_ttl = RESPONSE_TTL
        self.ollama_truncate_after = 0
        self.extra_headers: list[tuple[bytes, bytes]] = []  # added to every response the fake starts
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self._disconnect_claims = 0
        self.bytes_produced = 0
        self.producer_paused = False
        self._warm.clear()
        self._runners = {runner: info for runner, info in self._runners.items() if runner in self._loads}
        self.stored_responses.clear()
        self._configs.clear()
        if self._state is not None:
            self._state.reset()

    def __repr__(self) -> str:
        return f"<FakeDMR {self.name} {self.url}>"

    @property
    def state(self) -> BackendState | None:
        """The optional model of this endpoint's loaded models and KV cache (see ``BackendState``)."""
        return self._state

    @state.setter
    def state(self, state: BackendState | None) -> None:
        if state is not None:
            if state._owner is not None and state._owner is not self:
                raise ValueError("a BackendState models one endpoint: give each fake its own")
            state._owner, state.clock = self, self._reactor
        if self._state is not None and self._state is not state:
            self._state._owner = None
        self._state = state

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:12434`` (``https://localhost:...`` when serving TLS)."""
        if getattr(self, "_tls", None) is not None:
            return f"https://localhost:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0, tls: Any = None) -> int:
        """Listen on 127.0.0.1:``port`` (0 picks a free port); return the port.

        ``await fake.start(fake.port)`` after ``stop()`` restarts on the same port.
        With ``tls`` (a Twisted context factory) it serves HTTPS, and :attr:`url`
        is ``https://localhost:<port>``.
        """
        if self._listening is not None:
            raise RuntimeError(f"{self!r} is already listening")
        self._tls = tls
        if tls is not None:
            self._listening = self._reactor.listenSSL(port, self._site, tls, interface="127.0.0.1")
        else:
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
        self._configs.clear()
        if self._state is not None:
            self._state.clear()
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

        ``active`` is left alone: it counts requests still in flight.  A ``state`` stays
        attached and is ``reset()`` (nothing loaded or cached, counters and records zeroed).
        """
        self._set_defaults()

    # -- recordings --------------------------------------------------------

    @property
    def inference_requests(self) -> list[RecordedRequest]:
        """The recorded POSTs to model-routed routes: chat/completions, completions, embeddings,
        Anthropic messages and count_tokens, rerank, score, images, and Responses creates."""
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
        unaliased = _clean_slashes(request.path.decode("latin-1"))
        target = _responses_target(unaliased)
        if target is not None:
            self._route_responses(exchange, method, target, recorded)
        elif unaliased == "/anthropic":  # Go's ServeMux redirects a subtree's root
            self._redirect(exchange, method, "/anthropic/", recorded.uri)
        elif unaliased.startswith("/anthropic/"):
            self._route_anthropic(exchange, method, unaliased, recorded)
        elif unaliased in ("/api", "/v1", "/engines"):  # the real DMR (Go 1.27) redirects these with a 307
            self._redirect(exchange, method, unaliased + "/", recorded.uri, status=307)
        elif unaliased.startswith("/api/"):
            self._route_ollama(exchange, method, unaliased, recorded)
        elif path == "/":
            if method == "GET":
                exchange.send(200, b"Docker Model Runner is running", TEXT_PLAIN)
            else:
                exchange.send_error(404, "404 page not found")
        elif path == "/version":  # any method
            exchange.send_json({"version": DMR_VERSION})
        elif path == "/engines" or path.startswith("/engines/"):
            self._route_engines(exchange, method, path, recorded)
        elif path == "/models":
            if method == "GET":
                exchange.send_json([self._native_model(m) for m in self.models])
            elif method in ("POST", "DELETE"):  # ServeMux: "POST /models/{...}" etc. exist
                self._redirect(exchange, method, "/models/", recorded.uri, status=307)
            else:
                exchange.send_error(404, "not found")
        elif path.startswith("/models/"):
            self._route_models(exchange, method, path, recorded)
        else:
            exchange.send_error(404, "404 page not found")

    def _route_engines(self, exchange: _Exchange, method: str, path: str, recorded: RecordedRequest) -> None:
        parts = _engine_v1_path(path)
        op = _engine_op_path(path)
        configure = path == "/engines/_configure" or (
            path.startswith("/engines/") and path.endswith("/_configure") and path.count("/") == 3)
        if path == "/engines/status" and method == "GET":
            exchange.send_json(ENGINE_STATUS)
        elif path == "/engines/health" and method == "GET" and self.health_route:
            exchange.send(200, b'{"status":"ok"}', JSON_LLAMA, server=True)
        elif path == "/engines/ps" and method == "GET":
            exchange.send_json(self._ps())
        elif path == "/engines/df" and method == "GET":
            exchange.send_json({"models_disk_usage": MODEL_BYTES * len(self.models),
                                "default_backend_disk_usage": BACKEND_DISK_USAGE})
        elif path == "/engines/unload" and method == "POST":
            self._engines_unload(exchange, recorded.body)
        elif path == "/engines/_configure" and method == "GET":
            exchange.send_json(self._config_entries())
        elif configure and method == "POST":
            self._engines_configure(exchange, path.split("/")[2] if path.count("/") == 3 else None, recorded.body)
        elif parts is not None and method == "GET" and parts[1] == "models":
            exchange.run(self._answer_models(exchange, None))
        elif parts is not None and method == "GET" and parts[1].startswith("models/"):
            exchange.run(self._answer_models(exchange, unquote(parts[1][len("models/") :])))
        elif parts is not None and method == "POST" and parts[1] in ENGINE_V1_ENDPOINTS:
            self._check_inference(exchange, parts[0], parts[1], recorded.body)
        elif op is not None and method == "POST":
            self._check_inference(exchange, op[0], op[1], recorded.body)
        else:
            exchange.send_error(404, "not found")

    @staticmethod
    def _redirect(exchange: _Exchange, method: str, location: str, uri: str, status: int = 301) -> None:
        """Go's ``http.Redirect`` (301 unless ``status``), keeping the query (a body only for GET/HEAD)."""
        query = uri.partition("?")[2]
        target = location + ("?" + query if query else "")
        exchange.request.setHeader(b"location", target.encode("latin-1"))
        if method == "GET":
            text = "Moved Permanently" if status == 301 else "Temporary Redirect"
            body = f'<a href="{target}">{text}</a>.\n\n'.encode("latin-1")
            exchange.send(status, body, b"text/html; charset=utf-8")
        else:
            exchange.start(status, None, length=0)
            exchange.finish()

    def _ps(self) -> list[dict[str, Any]]:
        """``GET /engines/ps``: warm runners, then loading ones (Go's BackendStatus, omitempty), each with
        its ``keep_alive`` when one was configured (``/engines/_configure``, Ollama's ``keep_alive``)."""
        entries = []
        for entry, _ in self._ps_rows():
            keep_alive = self._configs.get(normalize_model_name(entry["model_name"]), {}).get("keep_alive")
            if keep_alive is not None:
                entry["keep_alive"] = _keep_alive_json(keep_alive)
            entries.append(entry)
        return entries

    def _ps_rows(self) -> list[tuple[dict[str, Any], float | None]]:
        """The ``/engines/ps`` entries, each with its last use (None while in use or loading)."""
        if self._state is not None:
            return self._state._ps_rows()
        rows: list[tuple[dict[str, Any], float | None]] = []
        for loading in (False, True):
            for runner, info in self._runners.items():
                if (runner in self._loads) != loading or (not loading and runner not in self._warm):
                    continue
                entry: dict[str, Any] = {"backend_name": info.backend, "model_name": info.model, "mode": runner[0]}
                idle = not loading and info.references == 0
                entry["last_used"] = _go_time(info.last_used) if idle else GO_ZERO_TIME
                if info.references and not loading:
                    entry["in_use"] = True
                if loading:
                    entry["loading"] = True
                rows.append((entry, info.last_used if idle else None))
        return rows

    def _model_key(self, ref: str) -> str:
        """DMR's ``ResolveID``: the model a reference names (its normalised id here), else the reference."""
        return normalize_model_name(self._find_model(ref) or ref)

    def _evict(self, model: str, backend: str = "", mode: str | None = None) -> tuple[int, bool]:
        """Unload the idle runners of ``model`` (a ``_model_key``) on ``backend`` ("" any) in ``mode``
        (None: any); return (runners unloaded, whether one is still there: in use or loading)."""
        state = self._state
        if state is not None:  # one resident entry per model, whatever its modes
            if backend and backend != "llama.cpp":
                return 0, False
            if model in state._loading:
                return 0, True
            res = state._resident.get(model)
            if res is None or (mode is not None and res.mode != mode):
                return 0, False
            return (1, False) if state.unload(model) else (0, True)
        unloaded, active = 0, False
        for runner, info in list(self._runners.items()):
            if runner[1] != model or (mode is not None and runner[0] != mode) or (backend and info.backend != backend):
                continue
            if runner in self._loads or info.references or runner not in self._warm:
                active = active or runner in self._loads or bool(info.references)
                continue
            self._warm.discard(runner)
            del self._runners[runner]
            unloaded += 1
        return unloaded, active

    def _unload(self, models: Sequence[str] | None, backend: str = "") -> int:
        """DMR's ``POST /engines/unload``: idle runners of ``models`` (None: of every model) go; the
        number unloaded.  ``all`` forgets every runner configuration, a named model only its
        ``backend``'s (so none when ``backend`` is "")."""
        if models is None:
            self._configs.clear()
            keys = {runner[1] for runner in self._runners}
            if self._state is not None:
                keys = set(self._state._resident)
            return sum(self._evict(key)[0] for key in keys)
        unloaded = 0
        for model in models:
            key = self._model_key(model)
            if backend == "llama.cpp":
                self._configs.pop(key, None)
            unloaded += self._evict(key, backend)[0]
        return unloaded

    def _configure_runner(self, model: str, config: dict[str, Any]) -> str:
        """DMR's ``setRunnerConfig`` for the completion runner of ``model``: an unchanged configuration
        does nothing; a new one unloads the idle runner (it reloads with it) and replaces the old one
        whole, unless the runner is in use ("runner already active", returned)."""
        key = self._model_key(model)
        if self._configs.get(key) == config:
            return ""
        if self._evict(key, mode="completion")[1]:
            return "runner already active"
        self._configs[key] = config
        return ""

    def _config_entries(self) -> list[dict[str, Any]]:
        """``GET /engines/_configure``: the stored configurations of models the fake has."""
        entries = []
        for key, config in self._configs.items():
            found = self._find_model(key)
            if found is None:
                continue
            shown: dict[str, Any] = {}
            for name in ("context-size", "runtime-flags", "speculative", "keep_alive", "vllm", "llamacpp"):
                if name in config:
                    shown[name] = _keep_alive_json(config[name]) if name == "keep_alive" else config[name]
            entries.append({"Backend": "llama.cpp", "Model": found, "ModelID": self._digest(found),
                            "Mode": "completion", "Config": shown})
        return entries

    def _engines_unload(self, exchange: _Exchange, body: bytes) -> None:
        try:
            request = _go_decode(body, _UNLOAD_REQUEST, whole=True) or {}
        except _GoDecodeError:
            exchange.send_error(400, "invalid request")
            return
        models = None if request.get("all") else request.get("models") or []
        exchange.send_json({"unloaded_runners": self._unload(models, request.get("backend", ""))})

    def _engines_configure(self, exchange: _Exchange, backend: str | None, body: bytes) -> None:
        """``POST /engines[/{backend}]/_configure``: 202 once stored (the fake does not preload)."""
        if backend is not None and backend not in KNOWN_BACKENDS:
            exchange.send_error(404, "backend not found")
            return
        try:
            request = _go_decode(body, _CONFIGURE_REQUEST, whole=True) or {}
        except _GoDecodeError:
            exchange.send_error(400, "invalid request")
            return
        config = {name: request[name] for name in ("context-size", "runtime-flags", "speculative", "vllm",
                                                   "llamacpp") if name in request}
        keep_alive = request.get("keep_alive")
        if isinstance(keep_alive, str) and _parse_keep_alive(keep_alive) is not None:
            config["keep_alive"] = _parse_keep_alive(keep_alive)
        refused = self._configure_runner(request.get("model", ""), config)
        if refused:
            exchange.send_error(409, refused)
        else:
            exchange.start(202, None, length=0)
            exchange.finish()

    # -- model list --------------------------------------------------------

    def _find_model(self, ref: str) -> str | None:
        wanted = normalize_model_name(ref)
        return next((m for m in self.models if normalize_model_name(m) == wanted), None)

    @staticmethod
    def _model_object(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "docker"}

    @staticmethod
    def _digest(model_id: str) -> str:
        """A fake model's id in DMR's store (``sha256:`` + 64 hex digits)."""
        return "sha256:" + hashlib.sha256(normalize_model_name(model_id).encode()).hexdigest()

    @classmethod
    def _native_model(cls, model_id: str) -> dict[str, Any]:
        """DMR's ``/models`` object: id, the one tag (the listed name), created, ``types.Config``."""
        return {"id": cls._digest(model_id), "tags": [model_id], "created": MODEL_CREATED, "config": dict(MODEL_CONFIG)}

    @staticmethod
    def _model_details(model_id: str) -> dict[str, Any]:
        """Ollama's ``details`` (DMR's ``ModelDetails``) of a fake model."""
        return {"format": "gguf", "family": MODEL_CONFIG["architecture"], "families": [MODEL_CONFIG["architecture"]],
                "parameter_size": MODEL_CONFIG["parameters"], "quantization_level": MODEL_CONFIG["quantization"]}

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

    # -- management API (/models, what the docker model CLI uses) -------------------------------------------

    def _route_models(self, exchange: _Exchange, method: str, path: str, recorded: RecordedRequest) -> None:
        """DMR's models handler under ``/models/``: GET one model (404 ``model not found``); the writes
        (``POST /models/create``, ``DELETE /models/{name}``, ``DELETE /models/purge``, ``POST
        /models/{name}/tag|repackage``) change ``models`` like DMR's store, a push fails; anything
        else ``not found``."""
        rest = unquote(path[len("/models/"):])
        if method == "GET":
            found = self._find_model(rest) if rest else None
            if found is None:
                exchange.send_error(404, "model not found")
            else:
                exchange.send_json(self._native_model(found))
        elif method == "POST" and rest == "create":
            self._models_create(exchange, recorded)
        elif method == "DELETE" and rest == "purge":
            self._unload(None)
            self.models.clear()
            exchange.start(200, None, length=0)
            exchange.finish()
        elif method == "DELETE":
            found = self._find_model(rest) if rest else None
            if found is None:
                exchange.send_error(404, "error while deleting model: model not found")
                return
            self._unload([found])
            self.models.remove(found)
            exchange.send_json([{"Untagged": found}, {"Deleted": self._digest(found)}])
        elif method == "POST":
            model, _, action = rest.rpartition("/")
            if action in ("push", "repackage"):
                self._models_push_or_repackage(exchange, action, model, recorded.body)
                return
            if action != "tag":
                exchange.send_error(404, f"unknown action {_go_quote(action)}")
                return
            query = parse_qs(recorded.uri.partition("?")[2])
            repo, tag = query.get("repo", [""])[0], query.get("tag", [""])[0]
            if not repo or not tag:
                exchange.send_error(400, "missing repo or tag query parameter")
            elif self._find_model(model) is None:
                exchange.send_error(404, "model not found")
            else:
                target = f"{repo}:{tag}"
                if self._find_model(target) is None:
                    self.models.append(target)
                exchange.send_json({"message": f"Model tagged successfully with {_go_quote(target)}",
                                    "target": target}, 201)
        else:
            exchange.send_error(404, "not found")

    def _models_push_or_repackage(self, exchange: _Exchange, action: str, model: str, body: bytes) -> None:
        """``POST /models/{name}/push`` (the fake has no registry: a model it has fails with a 500) and
        ``…/repackage {"target"}`` (the target joins ``models``, 201)."""
        if action == "push":
            exchange.request.setHeader(b"cache-control", b"no-cache")
            try:
                if body.strip():
                    _go_decode(body, ("struct", "models.ModelPushRequest", {"bearer-token": "string"}), whole=True)
            except _GoDecodeError:
                exchange.send_error(400, "invalid request body")
                return
            if self._find_model(model) is None:
                exchange.send_error(404, "Model not found")
            else:
                exchange.send_error(500, "error while pushing model: the fake DMR has no registry")
            return
        try:
            request = _go_decode(body, ("struct", "models.RepackageRequest", {"target": "string",
                                                                              "context_size": "int"})) or {}
        except _GoDecodeError as error:
            exchange.send_error(400, f"invalid request body: {error}")
            return
        target = request.get("target", "")
        if not target:
            exchange.send_error(400, "target is required")
        elif self._find_model(model) is None:
            exchange.send_error(404, f"get model '{_go_quote(model)}': model not found")
        else:
            if self._find_model(target) is None:
                self.models.append(target)
            exchange.send_json({"message": f"Model repackaged successfully as {_go_quote(target)}", "source": model,
                                "target": target}, 201)

    def _models_create(self, exchange: _Exchange, recorded: RecordedRequest) -> None:
        """``POST /models/create {"from"}``: a "pull" that adds the model (a known one is cached),
        answered with DMR's one progress line (JSON if ``Accept: application/json``, else HTML-escaped
        text/plain)."""
        try:
            request = _go_decode(recorded.body, _MODEL_CREATE_REQUEST) or {}
        except _GoDecodeError:
            exchange.send_error(400, "invalid request body")
            return
        model = request.get("from", "")
        exchange.request.setHeader(b"cache-control", b"no-cache")
        if not _valid_reference(_reference(model)):
            exchange.send_error(400, "Invalid model reference")
            return
        found = self._find_model(model)
        message = f"Using cached model: {MODEL_CONFIG['size']}" if found else "Model pulled successfully"
        if found is None:
            self.models.append(model.strip())
        line = _go_json({"type": "success", "message": message, "total": 0, "layer": {"size": 0, "current": 0},
                         "mode": "pull"}) + b"\n"
        as_json = recorded.headers.get("accept", [""])[-1] == "application/json"
        exchange.start(200, JSON_GO if as_json else b"text/plain")
        exchange.write(line if as_json else _go_html_escape(line))
        exchange.finish()

    # -- Ollama API (/api/*, DMR's pkg/ollama) ---------------------------------------------------------------

    def _route_ollama(self, exchange: _Exchange, method: str, path: str, recorded: RecordedRequest) -> None:
        """DMR's Ollama handler: its own ServeMux (404 ``404 page not found``, 405 with Allow), request
        bodies decoded like Go (400 ``Invalid request: …``), the model ``name``, else ``model``."""
        op = path[len("/api/"):]
        allowed = OLLAMA_ROUTES.get(op)
        if allowed is None:
            exchange.send_error(404, "404 page not found")
        elif method not in allowed:
            exchange.send_405(allowed)
        elif op == "version":
            exchange.send_json({"version": OLLAMA_VERSION})
        elif op == "tags":
            tags = [{"name": m, "model": m, "modified_at": _go_time(MODEL_CREATED), "size": 0,
                     "digest": self._digest(m), "details": self._model_details(m)} for m in self.models]
            exchange.send(200, _go_json({"models": tags}) + b"\n", JSON_GO)
        elif op == "ps":
            exchange.send(200, _go_json({"models": self._ollama_ps()}) + b"\n", JSON_GO)
        else:
            try:
                request = _go_decode(recorded.body, OLLAMA_REQUESTS[op]) or {}
            except _GoDecodeError as error:
                exchange.send_error(400, f"Invalid request: {error}")
                return
            model = request.get("name") or request.get("model") or ""
            if op == "show":
                found = self._find_model(model)
                if found is None:
                    exchange.send_error(404, "Model not found: " + _model_not_found(model))
                else:
                    exchange.send(200, _go_json({"details": self._model_details(found)}) + b"\n", JSON_GO)
            elif op == "chat":
                self._ollama_chat(exchange, request, model)
            elif op == "generate":
                self._ollama_generate(exchange, request, model)
            elif op == "pull":
                self._ollama_pull(exchange, model)
            else:
                self._ollama_delete(exchange, model)

    def _ollama_ps(self) -> list[dict[str, Any]]:
        """``/api/ps``: one entry per running runner, named by the model's tag; ``expires_at`` = last use
        + keep-alive while idle (Go's zero time in use, loading, or with keep-alive forever)."""
        models = []
        for entry, last_used in self._ps_rows():
            ref = entry["model_name"]
            found = self._find_model(ref)
            if found is None:  # DMR cannot read the model any more (deleted)
                models.append({"name": ref, "model": ref, "size": 0, "digest": ref, "expires_at": GO_ZERO_TIME})
                continue
            keep_alive = self._configs.get(normalize_model_name(found), {}).get("keep_alive", KEEP_ALIVE_DEFAULT)
            expires = GO_ZERO_TIME if last_used is None or keep_alive < 0 else _go_time(last_used + keep_alive)
            models.append({"name": found, "model": found, "size": 0, "digest": self._digest(found),
                           "expires_at": expires})
        return models

    def _ollama_configure(self, model: str, options: dict[str, Any] | None, think: Any, keep_alive: str) -> None:
        """DMR's ``configureModel``: ``options.num_ctx``, a boolean ``think`` and ``keep_alive`` (or a string
        ``options.keep_alive``) become the model's whole runner configuration (see ``_configure_runner``);
        failures are only logged by DMR, so ignored here."""
        options = options or {}
        if not keep_alive and isinstance(options.get("keep_alive"), str):
            keep_alive = options["keep_alive"]
        budget = (-1 if think else 0) if isinstance(think, bool) else None
        if options.get("num_ctx") is None and budget is None and not keep_alive:
            return
        config: dict[str, Any] = {}
        if options.get("num_ctx") is not None:
            config["context-size"] = _go_int32(options["num_ctx"])
        if keep_alive and _parse_keep_alive(keep_alive) is not None:
            config["keep_alive"] = _parse_keep_alive(keep_alive)
        if budget is not None:
            config["llamacpp"] = {"reasoning-budget": budget}
        self._configure_runner(model, config)

    def _ollama_infer(
        self, exchange: _Exchange, kind: str, model: str, stream: bool, openai: dict[str, Any],
        options: dict[str, Any] | None,
    ) -> None:
        """Send the chat completion DMR makes to the fake's own ``/engines/v1/chat/completions`` path
        (its checks, knobs and ``state``), its answer going through an ``_OllamaWriter``."""
        for name, target in OLLAMA_OPTIONS.items():
            if options and name in options:
                openai[target] = options[name]
        exchange.ollama = _OllamaWriter(self, exchange, kind, model, stream)
        self._check_inference(exchange, None, "chat/completions", _dumps(openai))

    def _ollama_chat(self, exchange: _Exchange, request: dict[str, Any], model: str) -> None:
        self._ollama_configure(model, request.get("options"), request.get("think"), request.get("keep_alive", ""))
        stream = request.get("stream") is not False  # absent or null: true
        openai: dict[str, Any] = {"model": model, "messages": _openai_messages(request.get("messages") or []),
                                  "stream": stream}
        if request.get("tools"):
            openai["tools"] = request["tools"]
        self._ollama_infer(exchange, "chat", model, stream, openai, request.get("options"))

    def _ollama_generate(self, exchange: _Exchange, request: dict[str, Any], model: str) -> None:
        """``/api/generate``: ``prompt`` as one user message; an empty prompt unloads the model (keep_alive
        absent or zero: 200 ``{}``, which Go sniffs as text/plain) or only configures it (200 ``{}`` JSON)."""
        prompt, keep_alive = request.get("prompt", ""), request.get("keep_alive", "")
        if not prompt and keep_alive in ("", "0", "0s", "0m"):
            self._unload([model])
            exchange.send(200, b"{}", TEXT_PLAIN)
            return
        self._ollama_configure(model, request.get("options"), request.get("think"), keep_alive)
        if not prompt:
            exchange.send(200, b"{}", JSON_GO)
            return
        stream = request.get("stream") is not False
        openai = {"model": model, "messages": _openai_messages([{"role": "user", "content": prompt}]),
                  "stream": stream}
        self._ollama_infer(exchange, "generate", model, stream, openai, request.get("options"))

    def _ollama_pull(self, exchange: _Exchange, model: str) -> None:
        """``/api/pull``: always a stream (``application/x-ndjson``); a model the fake has answers one
        ``success`` line (DMR's "Using cached model"), another is "downloaded" (a ``pulling <digest>``
        line at 0 and at 100 %, then ``success``) and joins ``models``; an invalid reference is a 500
        ``{"error": …}`` before any line."""
        exchange.request.setHeader(b"cache-control", b"no-cache")
        reference = _reference(model)
        if not _valid_reference(reference):
            message = (f"Failed to pull model: error while pulling model: reading model from registry: invalid "
                       f"model reference {_go_quote(reference)}: invalid reference {_go_quote(reference)}: "
                       "invalid reference format")
            exchange.start(500, JSON_GO)
            exchange.write(_go_json({"error": message}) + b"\n")
            exchange.finish()
            return
        exchange.run(self._ollama_pull_lines(exchange, model.strip()))

    async def _ollama_pull_lines(self, exchange: _Exchange, model: str) -> None:
        found = self._find_model(model)
        lines: list[dict[str, Any]] = []
        if found is None:
            digest = self._digest(model)
            status = f"pulling {digest[len('sha256:'):][:12]}"
            lines += [{"status": status, "digest": digest, "total": MODEL_BYTES},  # omitempty: no "completed": 0
                      {"status": status, "digest": digest, "total": MODEL_BYTES, "completed": MODEL_BYTES}]
        lines.append({"status": "success"})
        exchange.start(200, NDJSON)
        for index, line in enumerate(lines):
            if index:
                await exchange.sleep(self.chunk_delay)
            if line["status"] == "success" and found is None and self._find_model(model) is None:
                self.models.append(model)
            exchange.write(_go_json(line) + b"\n")
            if 0 < self.ollama_truncate_after <= index + 1:
                exchange.cut()
                return
        exchange.finish()

    def _ollama_delete(self, exchange: _Exchange, model: str) -> None:
        """``DELETE /api/delete``: unload, then delete the model from ``models`` (200 ``{}``); a model the
        fake does not have is DMR's 500."""
        self._unload([model])
        found = self._find_model(model)
        if found is None:
            exchange.send_error(500, "Failed to delete model: error while deleting model: model not found")
            return
        self.models.remove(found)
        exchange.send(200, b"{}", JSON_GO)

    # -- inference -----------------------------------------------------------

    def _check_inference(self, exchange: _Exchange, backend: str | None, endpoint: str, body: bytes) -> None:
        """DMR's pre-engine checks (section 3), then hand the request to the engine."""
        try:
            payload, runner = self._validate(backend, endpoint, body)
        except _DMRError as error:
            exchange.send_error(error.status, error.message)
        else:
            exchange.run(self._engine(exchange, endpoint, payload, runner, backend))

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
        return payload, (RUNNER_MODES.get(endpoint, "completion"), normalize_model_name(found))

    def _engine_failure(self) -> _Upstream | None:
        """The failure knobs, in order (``loading_503`` counts down), or None."""
        if self.load_failure:
            return _Upstream(500, LOAD_FAILURE_MESSAGE.encode() + b"\n", TEXT_PLAIN, plain=True)
        if self.loading_503 > 0:
            self.loading_503 -= 1
            return _Upstream(503, LOADING_503_BODY, JSON_LLAMA, server=True)
        if self.force_status is not None:
            status, body, content_type = self.force_status
            return _Upstream(status, body, content_type.encode("latin-1"))
        return None

    async def _engine(
        self, exchange: _Exchange, endpoint: str, payload: dict[str, Any], runner: Runner,
        backend: str | None = None,
    ) -> None:
        """The failure knobs, in order; otherwise load the model and generate."""
        failure = self._engine_failure()
        if failure is not None:
            failure.send(exchange)
        else:
            texts = _texts(payload, endpoint) if self._state is not None and endpoint in GENERATING_ENDPOINTS else None
            await self._on_runner(
                exchange, runner, backend, payload["model"], lambda: self._generate(exchange, endpoint, payload),
                endpoint=endpoint, prompt_texts=texts,
            )

    async def _on_runner(
        self, exchange: _Exchange, runner: Runner, backend: str | None, model_ref: str,
        work: Callable[[], Awaitable[None]], *, endpoint: str = "", prompt_texts: list[str] | None = None,
    ) -> None:
        """Load ``runner``, wait ``header_delay``, run ``work`` while the runner counts as in use.

        With a ``state``, it holds the model instead (``prompt_texts``, if any, are
        what ``_first_token`` charges the prefill for).
        """
        state = self._state
        if state is not None:
            lease = await state.acquire(runner[1], ref=model_ref, mode=runner[0], backend=backend or "llama.cpp",
                                        endpoint=endpoint)
            exchange.lease, exchange.prompt_texts = lease, prompt_texts
            try:
                await exchange.sleep(self.header_delay)
                await work()
            finally:
                lease.state.release(lease)
            return
        await self._load(exchange, runner, backend, model_ref)
        info = self._runners.get(runner)
        if info is not None:
            info.references += 1
        try:
            await exchange.sleep(self.header_delay)
            await work()
        finally:
            if info is not None:
                info.references -= 1
                info.last_used = self._reactor.seconds()

    async def _first_token(self, exchange: _Exchange, *, headers: bool = False) -> None:
        """With a state model: send the headers if ``headers`` (a stream's go out before the
        prefill), take a llama.cpp slot, then wait for the prefill (the time to first token)."""
        lease = exchange.lease
        if lease is None or exchange.prompt_texts is None:
            return
        if headers:
            exchange.write(b"")
        await lease.state.slot(lease)
        await lease.state.begin(lease, exchange.prompt_texts)
        lease.record.first_token = self._reactor.seconds()

    def _prompt_usage(self, exchange: _Exchange, texts: Sequence[str]) -> tuple[int, int, float | None]:
        """(prompt tokens, cached tokens, prefill ms) for usage and timings: the state's record once it
        prefilled, else the word count, nothing cached and no measured time."""
        lease = exchange.lease
        if lease is not None and exchange.prompt_texts is not None and lease.record.first_token is not None:
            record = lease.record
            return record.prompt_tokens, record.cached_tokens, record.ttft * 1000.0
        return _count_tokens(texts), 0, None

    def _overflow(self, exchange: _Exchange, endpoint: str, payload: dict[str, Any]) -> bytes | None:
        """llama.cpp's 400 body when the state's ``context`` is smaller than the prompt (or the marker's)."""
        texts = _texts(payload, endpoint)
        if any(OVERFLOW_MARKER in t for t in texts):
            return OVERFLOW_BODY
        state = self._state
        if state is None or state.context <= 0 or exchange.prompt_texts is None:
            return None
        tokens = len(state.prompt(exchange.prompt_texts))
        if tokens <= state.context:
            return None
        message = (f"request ({tokens} tokens) exceeds the available context size ({state.context} tokens), "
                   "try increasing it")
        return _dumps({"error": {"code": 400, "message": message, "type": "exceed_context_size_error",
                                 "n_prompt_tokens": tokens, "n_ctx": state.context}})

    def _answered(self, exchange: _Exchange, text: str) -> None:
        """With a state model: a complete answer's prompt and ``text`` enter the prefix cache."""
        lease = exchange.lease
        if lease is not None and exchange.prompt_texts is not None and not exchange.done:
            lease.state.remember(lease, text)

    async def _generate(self, exchange: _Exchange, endpoint: str, payload: dict[str, Any]) -> None:
        """The engine's answer: context overflow, embeddings, a stream or one body."""
        overflow = self._overflow(exchange, endpoint, payload) if endpoint in OVERFLOW_ENDPOINTS else None
        if overflow is not None:
            exchange.send(400, overflow, JSON_LLAMA, server=True)
        elif endpoint == "embeddings":
            self._embeddings(exchange, payload)
        elif endpoint in ("messages", "messages/count_tokens"):
            await self._anthropic(exchange, endpoint, payload)
        elif endpoint == "rerank":
            self._rerank(exchange, payload)
        elif endpoint == "score":
            self._score(exchange, payload)
        elif endpoint == "images/generations":
            self._images(exchange, payload)
        elif payload.get("stream") is True:
            await self._stream(exchange, endpoint, payload)
        elif endpoint == "chat/completions" and self.big_body > 0 and exchange.ollama is None:
            await self._first_token(exchange)
            exchange.start(200, b"application/octet-stream", length=self.big_body, server=True)
            _BigBodyProducer(self, exchange, self.big_body).start()
        else:
            await self._first_token(exchange)
            body = self._completion(endpoint, payload, self._prompt_usage(exchange, _texts(payload, endpoint)))
            self._answered(exchange, "".join(self.tokens))
            exchange.send(200, _dumps(body), JSON_LLAMA, server=True)

    async def _load(
        self, exchange: _Exchange, runner: Runner, backend: str | None = None, model_ref: str = ""
    ) -> None:
        """Wait for the runner's cold load (one shared load per runner)."""
        if runner not in self._runners:
            self._runners[runner] = _RunnerInfo(backend or "llama.cpp", model_ref or runner[1], self._reactor.seconds())
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

    def _completion(
        self, endpoint: str, payload: dict[str, Any], prompt: tuple[int, int, float | None]
    ) -> dict[str, Any]:
        """A non-streaming llama.cpp chat or text completion body (``prompt``: see ``_prompt_usage``)."""
        prompt_n, text = prompt[0], "".join(self.tokens)
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
            "usage": _usage(len(self.tokens), prompt_n, prompt[1] if prompt[2] is not None else None),
            "id": _completion_id(),
            "timings": _timings(prompt_n, len(self.tokens), prompt[1], prompt[2], self.chunk_delay),
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
        exchange.start(200, EVENT_STREAM, server=True)
        await self._first_token(exchange, headers=True)
        events = _stream_events(
            chat=endpoint == "chat/completions",
            tokens=tokens[:FAULT_AFTER_CONTENT_EVENTS] if fault else tokens,
            prompt=self._prompt_usage(exchange, _texts(payload, endpoint)),
            model=payload["model"],
            created=int(self._reactor.seconds()),
            include_usage=include_usage,
            complete=fault is None,
            interval=self.chunk_delay,
        )
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
            if fault is None:
                self._answered(exchange, "".join(tokens))
            exchange.write(b"data: " + (_dumps(MIDSTREAM_ERROR) if fault else b"[DONE]") + b"\n\n")
            exchange.finish()

    # -- Anthropic Messages ----------------------------------------------------

    def _route_anthropic(self, exchange: _Exchange, method: str, path: str, recorded: RecordedRequest) -> None:
        """DMR's ``/anthropic`` handler: its own checks, in Anthropic's error shape, then the scheduler's."""
        endpoint = ANTHROPIC_PATHS.get(path)
        if endpoint is None:
            exchange.send_error(404, "404 page not found")
        elif method != "POST":
            exchange.send_405(["POST"])
        elif len(recorded.body) > MAX_COMPAT_BODY:
            _anthropic_error(exchange, 413, "request_too_large", "Request body too large")
        else:
            model = _go_string_field(recorded.body, "model")  # json.Unmarshal into struct{Model string}
            if model is None:
                _anthropic_error(exchange, 400, "invalid_request_error", "Invalid JSON in request body")
            elif not model:
                _anthropic_error(exchange, 400, "invalid_request_error", "Missing required field: model")
            elif self._find_model(model) is None:
                _anthropic_error(exchange, 404, "not_found_error", f"Model not found: {model}")
            else:  # forwarded to /engines/v1/messages[/count_tokens] on the scheduler
                self._check_inference(exchange, None, endpoint, recorded.body)

    async def _anthropic(self, exchange: _Exchange, endpoint: str, payload: dict[str, Any]) -> None:
        """llama.cpp's native Anthropic answers: count_tokens, a message, or its stream."""
        input_tokens = _count_tokens(_texts(payload, endpoint))
        if endpoint == "messages/count_tokens":
            exchange.send(200, _dumps({"input_tokens": input_tokens}), JSON_LLAMA, server=True)
            return
        tokens, stop_reason = list(self.tokens), "end_turn"
        max_tokens = payload.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 < max_tokens < len(tokens):
            tokens, stop_reason = tokens[:max_tokens], "max_tokens"
        message_id = _random_id("msg_", string.ascii_letters + string.digits)
        if payload.get("stream") is not True:
            await self._first_token(exchange)
            body = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "".join(tokens)}],
                "model": payload["model"],
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": len(tokens)},
            }
            self._answered(exchange, "".join(tokens))
            exchange.send(200, _dumps(body), JSON_LLAMA, server=True)
            return
        fault = "truncate" if self.truncate_stream else "error" if self.midstream_error else None
        content = tokens[:FAULT_AFTER_CONTENT_EVENTS] if fault else tokens
        start = {
            "id": message_id, "type": "message", "role": "assistant", "content": [], "model": payload["model"],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        }
        events = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        ]
        if self.anthropic_ping:
            events.append(("ping", {"type": "ping"}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": token}}) for token in content]
        if fault is None:
            events += [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                   "usage": {"output_tokens": len(tokens)}}),
                ("message_stop", {"type": "message_stop"}),
            ]
        exchange.start(200, EVENT_STREAM, server=True)
        await self._first_token(exchange, headers=True)
        for index, (name, data) in enumerate(events):
            if index:
                await exchange.sleep(self.chunk_delay)
            exchange.write(_sse(name, data))
            if index == 0 and self.hold is not None:
                await exchange.wait(self.hold)
        if fault == "truncate":
            exchange.cut()
            return
        if fault == "error":
            await exchange.sleep(self.chunk_delay)
            exchange.write(_sse("error", ANTHROPIC_MIDSTREAM_ERROR))
        else:
            self._answered(exchange, "".join(tokens))
        exchange.finish()

    # -- rerank, score, images -------------------------------------------------------

    def _rerank(self, exchange: _Exchange, payload: dict[str, Any]) -> None:
        """llama.cpp's ``/rerank``: results by descending relevance, ``top_n`` of them."""
        query, documents = payload.get("query"), payload.get("documents")
        if not isinstance(query, str):
            _llama_error(exchange, 400, '"query" must be provided')
            return
        if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
            _llama_error(exchange, 400, '"documents" must be a non-empty string array')
            return
        scored = sorted(((i, _relevance(query, d)) for i, d in enumerate(documents)), key=lambda r: (-r[1], r[0]))
        top_n = payload.get("top_n")
        if isinstance(top_n, int) and not isinstance(top_n, bool) and top_n > 0:
            scored = scored[:top_n]
        tokens = sum(_count_tokens([query, d]) for d in documents)
        body = {
            "model": payload["model"],
            "object": "list",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": [{"index": i, "relevance_score": score} for i, score in scored],
        }
        exchange.send(200, _dumps(body), JSON_LLAMA, server=True)

    def _score(self, exchange: _Exchange, payload: dict[str, Any]) -> None:
        """vLLM's ``/score``: one score per (text_1, text_2) pair, 1:N or N:N."""
        left, right = _str_list(payload.get("text_1")), _str_list(payload.get("text_2"))
        if not left or not right or (len(left) != 1 and len(left) != len(right)):
            error = {"message": "text_1 and text_2 must be strings or lists of strings of matching length",
                     "type": "BadRequestError", "param": None, "code": 400}
            exchange.send(400, _dumps({"error": error}), JSON_GO, server=b"uvicorn")
            return
        pairs = list(zip(left * len(right), right)) if len(left) == 1 else list(zip(left, right))
        tokens = sum(_count_tokens([a, b]) for a, b in pairs)
        body = {
            "id": "score-" + uuid.uuid4().hex,
            "object": "list",
            "created": int(self._reactor.seconds()),
            "model": payload["model"],
            "data": [{"index": i, "object": "score", "score": _relevance(a, b)} for i, (a, b) in enumerate(pairs)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        }
        exchange.send(200, _dumps(body), JSON_GO, server=b"uvicorn")

    def _images(self, exchange: _Exchange, payload: dict[str, Any]) -> None:
        """DMR's diffusers server (FastAPI): ``n`` tiny PNGs as ``b64_json``."""
        prompt, n = payload.get("prompt"), payload.get("n", 1)
        if not isinstance(prompt, str):
            detail = [{"type": "missing" if prompt is None else "string_type", "loc": ["body", "prompt"],
                       "msg": "Field required" if prompt is None else "Input should be a valid string",
                       "input": prompt}]
            exchange.send(422, _dumps({"detail": detail}), JSON_GO, server=b"uvicorn")
        elif not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            detail = [{"type": "less_than_equal", "loc": ["body", "n"], "msg": "Input should be between 1 and 10",
                       "input": n}]
            exchange.send(422, _dumps({"detail": detail}), JSON_GO, server=b"uvicorn")
        elif payload.get("response_format") == "url":
            unsupported = "URL response format is not supported. Use 'b64_json' instead."
            exchange.send(400, _dumps({"detail": unsupported}), JSON_GO, server=b"uvicorn")
        else:
            data = [{"b64_json": TINY_PNG_B64, "url": None, "revised_prompt": None} for _ in range(n)]
            body = {"created": int(self._reactor.seconds()), "data": data}
            exchange.send(200, _dumps(body), JSON_GO, server=b"uvicorn")

    # -- Responses API -----------------------------------------------------------

    def _route_responses(
        self, exchange: _Exchange, method: str, target: _ResponsesTarget, recorded: RecordedRequest
    ) -> None:
        """DMR's Responses handler (a Go ServeMux of its own: 405 with Allow, or 404 page not found)."""
        if target.kind is None:
            exchange.send_error(404, "404 page not found")
            return
        allowed = RESPONSES_ALLOW[target.kind]
        if method not in allowed:
            exchange.send_405(allowed)
        elif target.kind == "create":
            self._responses_create(exchange, target.backend, recorded.body)
        elif method == "DELETE":  # Go's Store.Delete ignores the TTL
            if self.stored_responses.pop(target.response_id, None) is None:
                _responses_error(exchange, 404, "not_found", "Response not found")
            else:
                exchange.send_json({"id": target.response_id, "object": "response.deleted", "deleted": True})
        elif (stored := self._stored(target.response_id)) is None:
            _responses_error(exchange, 404, "not_found", "Response not found")
        elif target.kind == "one":
            exchange.send_json(stored.response)
        else:
            items = stored.input_items
            exchange.send_json({
                "object": "list",
                "data": items,
                "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None,
                "has_more": False,
            })

    def _stored(self, response_id: str) -> StoredResponse | None:
        """A stored response that has not expired (Go's ``Store.Get``)."""
        stored = self.stored_responses.get(response_id)
        if stored is None or self._reactor.seconds() > stored.expires_at:
            return None
        return stored

    def _store(self, plan: _ResponsesPlan, response: dict[str, Any]) -> None:
        if plan.store:
            expires = self._reactor.seconds() + self.response_ttl
            self.stored_responses[response["id"]] = StoredResponse(response, plan.input_items, plan.turn, expires)

    def _responses_create(self, exchange: _Exchange, backend: str | None, body: bytes) -> None:
        """``handleCreate``: its own checks (Responses error shape), then the chat completion."""
        if len(body) > MAX_COMPAT_BODY:
            _responses_error(exchange, 413, "request_too_large",
                             f"Request body too large (max {MAX_COMPAT_BODY} bytes)")
            return
        try:
            plan = self._responses_plan(body)
        except _CompatError as error:
            _responses_error(exchange, 400, "invalid_request", error.message)
        else:
            exchange.run(self._responses_run(exchange, backend, plan))

    def _responses_plan(self, body: bytes) -> _ResponsesPlan:
        """Decode and check a create body, resolve its chain; raise _CompatError like DMR."""
        payload = _decode_create_request(body)
        if not payload.get("model"):
            raise _CompatError("model is required")
        _check_unsupported_fields(payload)
        for tool in payload.get("tools") or []:
            if tool.get("type") != "function":
                raise _CompatError(f"tool type {_go_quote(str(tool.get('type') or ''))} is not supported by "
                                   "Docker Model Runner Responses compatibility layer")
        instructions = [payload["instructions"]] if payload.get("instructions") else []
        texts, history = list(instructions), []
        previous, turn = payload.get("previous_response_id") or "", 1
        if previous:
            if self._stored(previous) is None:
                raise _CompatError(f"previous_response_id {_go_quote(previous)} was not found")
            chain: list[StoredResponse] = []
            link: str = previous
            while link and (stored := self._stored(link)) is not None and stored not in chain:
                chain.append(stored)
                link = stored.response.get("previous_response_id") or ""
            turn += len(chain)
            for stored in reversed(chain):  # DMR replays the earlier outputs, oldest first
                texts += _output_texts(stored.response)
                history += _item_texts(stored.input_items) + _output_texts(stored.response)
        items = _parse_responses_input(payload)
        current = _item_texts(items)
        return _ResponsesPlan(payload, payload.get("store") is not False, payload.get("stream") is True,
                              texts + current, items, turn, instructions + history + current)

    def _response_object(
        self, plan: _ResponsesPlan, response_id: str, created: int, status: str, *,
        output: list[dict[str, Any]] | None = None, output_text: str = "", usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None, incomplete: dict[str, Any] | None = None, finish_reason: str = "",
    ) -> dict[str, Any]:
        """A response object in DMR's field order, plus what the openai SDK's ``Response`` requires."""
        payload = plan.payload
        obj: dict[str, Any] = {
            "id": response_id, "object": "response", "created_at": created, "model": payload["model"],
            "status": status, "output": output or [],
        }
        if output_text:
            obj["output_text"] = output_text
        obj["error"] = error
        obj["incomplete_details"] = incomplete
        if finish_reason:
            obj["finish_reason"] = finish_reason
        parallel = payload.get("parallel_tool_calls")
        obj.update({
            "instructions": payload.get("instructions") or None,
            "metadata": payload.get("metadata") or {},
            "parallel_tool_calls": parallel if isinstance(parallel, bool) else True,
            "temperature": payload.get("temperature"),
            "tool_choice": payload.get("tool_choice") or "auto",
            "tools": payload.get("tools") or [],
            "top_p": payload.get("top_p"),
            "max_output_tokens": payload.get("max_output_tokens"),
            "store": plan.store,
            "text": payload.get("text") or {"format": {"type": "text"}},
            "truncation": payload.get("truncation") or "disabled",
            "previous_response_id": payload.get("previous_response_id") or None,
            "reasoning": None,
            "usage": usage,
            "user": payload.get("user") or None,
            "reasoning_effort": payload.get("reasoning_effort") or None,
        })
        return obj

    async def _responses_run(self, exchange: _Exchange, backend: str | None, plan: _ResponsesPlan) -> None:
        """The chat completion DMR sends to the scheduler, and its answer made a response."""
        model = plan.payload["model"]
        response_id, created = _random_id("resp_"), int(self._reactor.seconds())
        found = self._find_model(model)
        upstream: _Upstream | None
        if backend is not None and backend not in KNOWN_BACKENDS:
            upstream = _Upstream(404, b"backend not found\n", TEXT_PLAIN, plain=True)
        elif found is None:
            upstream = _Upstream(404, _model_not_found(model).encode() + b"\n", TEXT_PLAIN, plain=True)
        else:
            upstream = self._engine_failure()
        if upstream is not None or found is None:
            self._responses_failed(exchange, plan, response_id, created, upstream)
            return
        runner = ("completion", normalize_model_name(found))
        await self._on_runner(exchange, runner, backend, model,
                              lambda: self._responses_generate(exchange, plan, response_id, created),
                              endpoint="responses", prompt_texts=plan.cache_texts if self._state is not None else None)

    def _responses_failed(
        self, exchange: _Exchange, plan: _ResponsesPlan, response_id: str, created: int, upstream: _Upstream | None
    ) -> None:
        """How DMR answers when the chat completion did not succeed (it stores the failure too)."""
        assert upstream is not None
        if upstream.status == 200:  # force_status with 200: DMR parses the body as a chat completion
            self._responses_from_body(exchange, plan, response_id, created, upstream)
            return
        if not plan.stream:
            message = upstream.body.decode("utf-8", "replace")
            failed = self._response_object(plan, response_id, created, "failed",
                                           error={"code": "upstream_error", "message": message})
            self._store(plan, failed)
            exchange.send_json(failed, upstream.status)
            return
        # StreamingResponseWriter.WriteHeader(non-200) writes two events first, so Go sends
        # 200 with the headers the upstream had set (http.Error's text/plain, or llama.cpp's).
        failed = self._response_object(plan, response_id, created, "failed")
        if upstream.plain:
            exchange.request.setHeader(b"x-content-type-options", b"nosniff")
        exchange.start(200, upstream.content_type, server=upstream.server)
        error = {"code": "upstream_error", "message": f"Upstream service returned status code: {upstream.status}"}
        exchange.write(_sse("error", {"type": "error", "sequence_number": 1, "error": error}))
        exchange.write(_sse("response.failed", {"type": "response.failed", "sequence_number": 2, "response": failed}))
        self._store(plan, failed)
        exchange.finish()

    def _responses_from_body(
        self, exchange: _Exchange, plan: _ResponsesPlan, response_id: str, created: int, upstream: _Upstream
    ) -> None:
        """A 200 ``force_status`` body read as DMR would read a chat completion."""
        if plan.stream:  # the body has no SSE events DMR could translate, and no [DONE]
            exchange.request.setHeader(b"cache-control", b"no-cache")
            exchange.start(200, EVENT_STREAM, server=upstream.server)
            started = self._response_object(plan, response_id, created, "in_progress")
            exchange.write(_sse("response.created", {"type": "response.created", "sequence_number": 1,
                                                     "response": started}))
            exchange.write(_sse("response.in_progress", {"type": "response.in_progress", "sequence_number": 2,
                                                         "response": started}))
            exchange.finish()
            return
        try:
            chat = json.loads(upstream.body)
            text = chat["choices"][0]["message"]["content"] if chat.get("choices") else ""
            usage = chat.get("usage")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            failed = self._response_object(plan, response_id, created, "failed",
                                           error={"code": "parse_error", "message": "Failed to parse upstream response"})
            self._store(plan, failed)
            exchange.send_json(failed, 500)
            return
        output = [_message_item(_random_id("msg_"), text, "completed")] if isinstance(text, str) and text else []
        usage_obj = _responses_usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)) \
            if isinstance(usage, dict) else None
        final = self._response_object(plan, response_id, created, "completed", output=output,
                                      output_text=text if output else "", usage=usage_obj)
        self._store(plan, final)
        exchange.send_json(final)

    async def _responses_generate(
        self, exchange: _Exchange, plan: _ResponsesPlan, response_id: str, created: int
    ) -> None:
        """The engine's part: overflow, or ``tokens`` + the turn marker, whole or streamed."""
        if any(OVERFLOW_MARKER in text for text in plan.prompt_texts):
            overflow = _Upstream(400, OVERFLOW_BODY, JSON_LLAMA, server=True)
            self._responses_failed(exchange, plan, response_id, created, overflow)
            return
        tokens = [*self.tokens, f" [turn {plan.turn}]"]
        limit = plan.payload.get("max_output_tokens")
        truncated = isinstance(limit, int) and 0 < limit < len(tokens)
        if truncated:
            tokens = tokens[:limit]
        usage = _responses_usage(_count_tokens(plan.prompt_texts), len(tokens))
        if plan.stream:
            await self._responses_stream(exchange, plan, response_id, created, tokens, usage, truncated)
            return
        await self._first_token(exchange)
        text = "".join(tokens)
        final = self._response_object(plan, response_id, created, "completed", output_text=text, usage=usage,
                                      output=[_message_item(_random_id("msg_"), text, "completed")])
        self._answered(exchange, text)
        self._store(plan, final)
        exchange.send_json(final)

    async def _responses_stream(
        self, exchange: _Exchange, plan: _ResponsesPlan, response_id: str, created: int,
        tokens: list[str], usage: dict[str, Any], truncated: bool,
    ) -> None:
        """DMR's StreamingResponseWriter over the fake's chat stream, tick for tick.

        Each llama.cpp event is one tick (``chunk_delay`` apart, ``hold`` after the
        first): the role chunk brings created + in_progress, the first token also the
        item and part, each token a delta, ``[DONE]`` the closing events.
        """
        fault = "truncate" if self.truncate_stream else "error" if self.midstream_error else None
        content = tokens[:FAULT_AFTER_CONTENT_EVENTS] if fault else tokens
        sequence = itertools.count(1)
        item_id = _random_id("msg_")
        text = "".join(tokens)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def event(kind: str, **fields: Any) -> bytes:
            return _sse(kind, {"type": kind, "sequence_number": next(sequence), **fields})

        started = self._response_object(plan, response_id, created, "in_progress")
        ticks = [[event("response.created", response=started), event("response.in_progress", response=started)]]
        for index, token in enumerate(content):
            tick = []
            if index == 0:
                tick.append(event("response.output_item.added", output_index=0,
                                  item=_message_item(item_id, "", "in_progress")))
                tick.append(event("response.content_part.added", **where, part=_output_text("")))
            tick.append(event("response.output_text.delta", **where, delta=token, logprobs=[]))
            ticks.append(tick)
        final = None
        if fault is None:
            ticks.append([])  # the finish chunk: nothing to translate
            item = _message_item(item_id, text, "completed")
            final = self._response_object(
                plan, response_id, created, "completed", output=[item] if text else [], output_text=text,
                usage=usage, incomplete={"reason": "max_tokens"} if truncated else None,
                finish_reason="length" if truncated else "stop",
            )
            closing = []
            if text:
                closing += [
                    event("response.output_text.done", **where, text=text, logprobs=[], part=_output_text(text)),
                    event("response.content_part.done", **where, part=_output_text(text)),
                    event("response.output_item.done", output_index=0, item=item),
                ]
            ticks.append([*closing, event("response.completed", response=final)])
        exchange.request.setHeader(b"cache-control", b"no-cache")
        exchange.start(200, EVENT_STREAM, server=True)
        await self._first_token(exchange, headers=True)
        for index, tick in enumerate(ticks):
            if index:
                await exchange.sleep(self.chunk_delay)
            for data in tick:
                exchange.write(data)
            if index == 0 and self.hold is not None:
                await exchange.wait(self.hold)
        if fault == "truncate":
            exchange.cut()
            return
        if fault == "error":  # llama.cpp's error event: DMR translates nothing, the stream just ends
            await exchange.sleep(self.chunk_delay)
        elif final is not None and not exchange.done:
            self._store(plan, final)
            self._answered(exchange, text)
        exchange.finish()


# -- DMR's Ollama layer and Go's encoding/json, as the fake needs them -------------------------------------------


def _go_json(obj: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON as Go's ``json.Marshal`` writes it: ``<``, ``>``, ``&``, U+2028 and U+2029 escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text.encode("utf-8")


_HTML_SIGNATURES = (b"<!DOCTYPE HTML", b"<HTML", b"<HEAD", b"<SCRIPT", b"<IFRAME", b"<H1", b"<DIV", b"<FONT",
                    b"<TABLE", b"<A", b"<STYLE", b"<TITLE", b"<B", b"<BODY", b"<BR", b"<P", b"<!--")
_BINARY_BYTES = frozenset(range(0x00, 0x09)) | {0x0B} | frozenset(range(0x0E, 0x1B)) | frozenset(range(0x1C, 0x20))


def _go_sniff(body: bytes) -> bytes | None:
    """The Content-Type Go's server picks for a body written without one (``http.DetectContentType``,
    its text, HTML and XML cases); None for an empty body (Go then sends no Content-Type)."""
    if not body:
        return None
    head = body[:512].lstrip(b"\t\n\x0c\r ")
    upper = head.upper()
    for signature in _HTML_SIGNATURES:
        if upper.startswith(signature) and len(head) > len(signature) and head[len(signature)] in b" >":
            return b"text/html; charset=utf-8"
    if head.startswith(b"<?xml"):
        return b"text/xml; charset=utf-8"
    if any(byte in _BINARY_BYTES for byte in body[:512]):
        return b"application/octet-stream"
    return TEXT_PLAIN


def _go_html_escape(data: bytes) -> bytes:
    """Go's ``html.EscapeString``."""
    for char, escape in ((b"&", b"&amp;"), (b"'", b"&#39;"), (b"<", b"&lt;"), (b">", b"&gt;"), (b'"', b"&#34;")):
        data = data.replace(char, escape)
    return data


def _go_char(char: str) -> str:
    """Go's ``quoteChar``: how its JSON syntax errors quote the offending byte."""
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    escapes = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f", "\\": "\\\\"}
    if char in escapes:
        return f"'{escapes[char]}'"
    if 0x20 <= ord(char) < 0x7F:
        return f"'{char}'"
    return "'\\x%02x'" % char.encode("utf-8")[0]


class _GoDecodeError(Exception):
    """What Go's JSON decoding reports (DMR prefixes it, e.g. ``Invalid request: ``)."""


_GoType = Any
"""A Go type for ``_go_decode``: ``"string"``, ``"bool"``, ``"int"``, ``"any"``, ``"keepalive"`` (Ollama's
``OllamaKeepAlive``), ``("slice", go name, element)``, ``("map", go name)`` or ``("struct", go name, {json
name: type})``."""

_OLLAMA_FUNCTION_CALL: _GoType = ("struct", "ollama.FunctionCall", {"index": "int", "name": "string",
                                                                     "arguments": "any"})
_OLLAMA_TOOL_CALLS: _GoType = ("slice", "[]ollama.ToolCall", ("struct", "ollama.ToolCall", {
    "id": "string", "type": "string", "function": _OLLAMA_FUNCTION_CALL}))
_OLLAMA_MESSAGES: _GoType = ("slice", "[]ollama.Message", ("struct", "ollama.Message", {
    "role": "string", "content": "string", "images": ("slice", "[]string", "string"),
    "tool_calls": _OLLAMA_TOOL_CALLS, "tool_call_id": "string", "thinking": "string"}))
_OLLAMA_TOOLS: _GoType = ("slice", "[]ollama.Tool", ("struct", "ollama.Tool", {
    "type": "string", "function": ("struct", "ollama.ToolFunction", {
        "name": "string", "description": "string", "parameters": ("map", "map[string]interface {}")})}))
_GO_MAP: _GoType = ("map", "map[string]interface {}")
OLLAMA_REQUESTS: dict[str, _GoType] = {
    "chat": ("struct", "ollama.ChatRequest", {
        "name": "string", "model": "string", "messages": _OLLAMA_MESSAGES, "tools": _OLLAMA_TOOLS, "stream": "bool",
        "think": "any", "keep_alive": "keepalive", "options": _GO_MAP}),
    "generate": ("struct", "ollama.GenerateRequest", {
        "name": "string", "model": "string", "prompt": "string", "stream": "bool", "think": "any",
        "keep_alive": "keepalive", "options": _GO_MAP}),
    "show": ("struct", "ollama.ShowRequest", {"name": "string", "model": "string", "verbose": "bool"}),
    "pull": ("struct", "ollama.PullRequest", {"name": "string", "model": "string", "insecure": "bool",
                                              "stream": "bool"}),
    "delete": ("struct", "ollama.DeleteRequest", {"name": "string", "model": "string"}),
}
"""DMR's Ollama request types (``pkg/ollama/api.go``): fields not listed are ignored, like Go does."""
_ENGINE_MESSAGE: _GoType = ("struct", "struct", {"content": "string", "reasoning_content": "string",
                                                 "tool_calls": _OLLAMA_TOOL_CALLS})
_ENGINE_ANSWER: _GoType = ("struct", "ollama.openAIChatResponse", {
    "choices": ("slice", "[]struct", ("struct", "struct", {"message": _ENGINE_MESSAGE}))})
_ENGINE_CHUNK: _GoType = ("struct", "ollama.openAIChatStreamChunk", {
    "choices": ("slice", "[]struct", ("struct", "struct", {"delta": _ENGINE_MESSAGE}))})
_ENGINE_ERROR: _GoType = ("struct", "ollama.openAIErrorResponse", {"error": ("struct", "struct", {
    "message": "string", "type": "string", "code": "any"})})
_UNLOAD_REQUEST: _GoType = ("struct", "scheduling.UnloadRequest", {
    "all": "bool", "backend": "string", "models": ("slice", "[]string", "string")})
_CONFIGURE_REQUEST: _GoType = ("struct", "scheduling.ConfigureRequest", {
    "model": "string", "mode": "string", "raw-runtime-flags": "string", "context-size": "int",
    "runtime-flags": ("slice", "[]string", "string"), "speculative": _GO_MAP, "keep_alive": "any", "vllm": _GO_MAP,
    "llamacpp": ("struct", "inference.LlamaCppConfig", {"reasoning-budget": "int"})})
_MODEL_CREATE_REQUEST: _GoType = ("struct", "models.ModelCreateRequest", {"from": "string", "bearer-token": "string"})


def _go_decode(body: bytes, go_type: _GoType, *, whole: bool = False) -> Any:
    """Decode ``body`` into ``go_type`` like Go: ``json.NewDecoder(r.Body).Decode`` (the first JSON value,
    anything after it ignored) or, with ``whole``, ``json.Unmarshal`` (nothing may follow).

    Returns the value with struct fields under their JSON names (matched case-insensitively, like Go;
    unknown ones dropped, nulls left out); raises ``_GoDecodeError`` with Go's message (syntax errors, the
    first type mismatch in document order, ``OllamaKeepAlive``'s own error).
    """
    text = body.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise _GoDecodeError("unexpected end of JSON input" if whole else "EOF")
    try:
        value, end = json.JSONDecoder(parse_constant=_reject_constant).raw_decode(text, start)
    except json.JSONDecodeError as error:
        raise _GoDecodeError(_go_syntax_error(text, error, whole)) from None
    except ValueError:  # NaN, Infinity (Go has no such literals)
        raise _GoDecodeError(_go_constant_error(text)) from None
    if whole and text[end:].strip(" \t\r\n"):
        rest = end + len(text[end:]) - len(text[end:].lstrip(" \t\r\n"))
        raise _GoDecodeError(f"invalid character {_go_char(text[rest])} after top-level value")
    root = go_type[1].rpartition(".")[2] if isinstance(go_type, tuple) else ""
    return _go_value(value, go_type, root, [])


def _go_syntax_error(text: str, error: json.JSONDecodeError, whole: bool) -> str:
    """Go's message for the syntax error Python's decoder found (``encoding/json`` of Go 1.27)."""
    pos, msg = error.pos, error.msg
    eof = "unexpected end of JSON input" if whole else "unexpected EOF"
    if pos >= len(text) or msg.startswith("Unterminated string"):
        return eof
    char = text[pos]
    if msg.startswith("Invalid control character"):
        return f"invalid character {_go_char(char)} in string"
    if msg.startswith("Invalid \\escape") or msg.startswith("Invalid \\u"):
        return f"invalid escape sequence `{text[pos:pos + 2]}` in string"
    if msg.startswith("Expecting property name"):
        return f"invalid character {_go_char(char)} looking for beginning of object key string"
    if msg.startswith("Expecting ':'"):
        return f"invalid character {_go_char(char)} after object key"
    if msg.startswith("Expecting ','"):
        where = "object key:value pair" if _go_container_at(text, pos) == "{" else "array element"
        return f"invalid character {_go_char(char)} after {where}"
    if char in "tfn":
        literal = {"t": "true", "f": "false", "n": "null"}[char]
        for index, expected in enumerate(literal):
            if pos + index >= len(text):
                return eof
            if text[pos + index] != expected:
                return f"invalid character {_go_char(text[pos + index])} in literal {literal} (expecting '{expected}')"
    if char == "-":
        if pos + 1 >= len(text):
            return eof
        return f"invalid character {_go_char(text[pos + 1])} in numeric literal"
    return f"invalid character {_go_char(char)} looking for beginning of value"


def _outside_strings(text: str) -> Iterator[tuple[int, str]]:
    """(position, character) of every character of a JSON text outside its strings (quotes included in neither)."""
    in_string = escaped = False
    for pos, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        else:
            yield pos, char


def _go_constant_error(text: str) -> str:
    """Go's error at the first ``NaN`` / ``Infinity`` / ``-Infinity`` outside a string."""
    for pos, char in _outside_strings(text):
        if char == "-" and text[pos + 1:pos + 2] == "I":
            return "invalid character 'I' in numeric literal"
        elif char in "NI":
            return f"invalid character '{char}' looking for beginning of value"
    return "invalid character 'N' looking for beginning of value"


def _go_container_at(text: str, pos: int) -> str:
    """The innermost ``{`` or ``[`` open at ``pos`` of a JSON text (strings skipped)."""
    stack: list[str] = []
    for _, char in _outside_strings(text[:pos]):
        if char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def _go_type_error(value: Any, go_name: str, root: str, path: list[str | int]) -> _GoDecodeError:
    kind = _go_kind(value)
    if go_name == "int" and isinstance(value, float):
        kind += " " + json.dumps(value)
    if not path:
        return _GoDecodeError(f"json: cannot unmarshal {kind} into Go value of type {go_name}")
    where = root + "." + ".".join(str(part) for part in path)
    if isinstance(path[-1], int):
        return _GoDecodeError(f"json: cannot unmarshal {kind} into {where} of type {go_name}")
    return _GoDecodeError(f"json: cannot unmarshal {kind} into Go struct field {where} of type {go_name}")


def _go_value(value: Any, go_type: _GoType, root: str, path: list[str | int]) -> Any:
    """``value`` checked against ``go_type`` (see ``_go_decode``)."""
    if value is None or go_type == "any":
        return value
    if go_type == "keepalive":  # OllamaKeepAlive.UnmarshalJSON: a string, or seconds
        if isinstance(value, str):
            return value
        if _is_number(value):
            return "-1" if value < 0 else "0" if value == 0 else _go_duration(float(value))
        raise _GoDecodeError(f"keep_alive must be a string or number, got {_go_json(value).decode()}")
    if isinstance(go_type, str):
        valid = {"string": isinstance(value, str), "bool": isinstance(value, bool), "int": _is_int(value)}[go_type]
        if not valid:
            raise _go_type_error(value, go_type, root, path)
        return value
    kind, go_name = go_type[0], go_type[1]
    if kind == "slice":
        if not isinstance(value, list):
            raise _go_type_error(value, go_name, root, path)
        return [_go_value(item, go_type[2], root, [*path, index]) for index, item in enumerate(value)]
    if not isinstance(value, dict):
        raise _go_type_error(value, go_name, root, path)
    if kind == "map":
        return value
    fields: dict[str, _GoType] = go_type[2]
    folded = {name.lower(): name for name in fields}
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = key if key in fields else folded.get(key.lower())
        if name is None:
            continue
        decoded = _go_value(item, fields[name], root, [*path, name])
        if decoded is None:
            out.pop(name, None)
        else:
            out[name] = decoded
    return out


_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_go_duration(text: str) -> float | None:
    """Go's ``time.ParseDuration`` in seconds, or None when Go would refuse it."""
    sign = -1.0 if text.startswith("-") else 1.0
    rest = text[1:] if text[:1] in ("-", "+") else text
    if rest == "0":
        return 0.0
    if not rest:
        return None
    total, pos = 0.0, 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        if match is None:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def _parse_keep_alive(text: str) -> float | None:
    """DMR's ``inference.ParseKeepAlive`` in seconds (negative: forever), or None if invalid."""
    if text == "-1":
        return -1.0
    seconds = _parse_go_duration(text)
    if seconds is None:
        return None
    return -1.0 if seconds < 0 else seconds


def _go_duration(seconds: float) -> str:
    """Go's ``time.Duration.String()`` (``5m0s``, ``1.5s``, ``500ms``, ``1h0m0s``)."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign, nanos = ("-" if nanos < 0 else ""), abs(nanos)

    def fraction(value: int, size: int) -> str:
        whole, part = divmod(value, size)
        digits = str(part).rjust(len(str(size)) - 1, "0").rstrip("0") if part else ""
        return f"{whole}.{digits}" if digits else str(whole)

    if nanos < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if nanos >= size:
                return sign + fraction(nanos, size) + unit
    hours, rest = divmod(nanos, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    secs = fraction(rest, 10**9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return sign + secs


def _keep_alive_json(seconds: float) -> str:
    """How DMR's ``KeepAlive`` marshals: ``"-1"`` for forever, else the duration."""
    return "-1" if seconds < 0 else _go_duration(seconds)


def _go_int32(value: Any) -> int:
    """DMR's ``convertToInt32`` of ``options.num_ctx`` (a number, or a string starting with one; else 0)."""
    if _is_number(value):
        return int(value)
    if isinstance(value, str):
        match = re.match(r"\s*([+-]?\d+)", value)
        return int(match.group(1)) if match else 0
    return 0


def _data_uri(image: str) -> str:
    """DMR's ``ensureDataURIPrefix``: raw base64 images become data URIs (MIME guessed from the prefix)."""
    image = image.strip()
    if image.startswith(("data:", "http://", "https://")):
        return image
    mime = "image/png" if image.startswith("iVBOR") else "image/gif" if image.startswith("R0lG") else "image/jpeg"
    return f"data:{mime};base64,{image}"


def _openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DMR's ``convertMessages``: Ollama chat messages as OpenAI ones (images as ``image_url`` parts,
    tool-call arguments as JSON strings)."""
    out = []
    for message in messages:
        message = message or {}  # a null message: Go's zero Message
        converted: dict[str, Any] = {"role": message.get("role", "")}
        content, images = message.get("content", ""), message.get("images") or []
        if images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
            parts += [{"type": "image_url", "image_url": {"url": _data_uri(image or "")}} for image in images]
            converted["content"] = parts
        else:
            converted["content"] = content
        calls = []
        for call in message.get("tool_calls") or []:
            call = call or {}
            function = dict(call.get("function") or {})
            if isinstance(function.get("arguments"), dict):
                function["arguments"] = _go_json(function["arguments"], sort_keys=True).decode()
            calls.append({"id": call.get("id", ""), "type": call.get("type") or "function",
                          "function": {"name": function.get("name", ""), "arguments": function.get("arguments")}})
        if calls:
            converted["tool_calls"] = calls
        if message.get("tool_call_id"):
            converted["tool_call_id"] = message["tool_call_id"]
        out.append(converted)
    return out


def _ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DMR's ``convertToolCallsToOllamaFormat``: no ``type``, ``index`` = position, JSON-object arguments parsed."""
    out = []
    for index, call in enumerate(calls):
        call = call or {}
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                arguments = parsed
        out.append({"id": call.get("id", ""),
                    "function": {"index": index, "name": function.get("name", ""), "arguments": arguments}})
    return out


def _engine_error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-shaped error body (``json.Unmarshal`` must succeed), else ""."""
    try:
        decoded = _go_decode(body, _ENGINE_ERROR, whole=True)
    except _GoDecodeError:
        return ""
    error = decoded.get("error") if isinstance(decoded, dict) else None
    return str(error.get("message") or "") if isinstance(error, dict) else ""


_REFERENCE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(rf"(?:{_REFERENCE_COMPONENT}(?::[0-9]+)?/)?{_REFERENCE_COMPONENT}(?:/{_REFERENCE_COMPONENT})*"
                        r":[\w][\w.-]{0,127}")


def _reference(model: str) -> str:
    """The reference DMR's registry client would pull for ``model`` ("" stays "")."""
    return normalize_model_name(model) if model.strip() else ""


def _valid_reference(reference: str) -> bool:
    """Whether a normalised reference is a valid OCI reference (name lower-case, ``:tag``)."""
    return _REFERENCE.fullmatch(reference) is not None


class _OllamaWriter:
    """DMR's Ollama answer writers (``pkg/ollama``) between the fake's engine and the client.

    The engine answers the chat completion DMR made of an ``/api/chat`` or ``/api/generate``
    request exactly as it answers ``/engines/v1/chat/completions``; this writer turns that into
    what DMR sends:

    * not streaming (DMR's ``responseRecorder``): the whole answer is collected, then a 200
      becomes one Ollama object (+ newline, ``application/json``), a body that does not parse
      ``500 Failed to parse response``, and an error keeps its status with ``{"error": message}``
      if the engine sent an OpenAI error, else its raw body, Content-Type sniffed by Go (so
      ``text/plain; charset=utf-8``, none when empty), without the engine's other headers;
    * streaming (``streamingChatResponseWriter`` / ``streamingGenerateResponseWriter``): a 200
      gets ``Content-Type: application/json`` (the engine's Server header kept, plus llama.cpp's
      ``X-Accel-Buffering: no`` on an event stream) and one Ollama object + ``\\n`` per ``data:``
      line, ``[DONE]`` giving the final ``done: true`` line; a non-200 keeps its status and headers
      but no byte of the body: DMR's own plain-text errors (``http.Error``, no length) end as an
      empty chunked body, an engine's answer keeps its Content-Length, so the connection closes
      short of it (what Go does), as it does for a 200 that declared a length.

    ``FakeDMR.ollama_truncate_after`` cuts the stream after that many lines.
    """

    def __init__(self, fake: FakeDMR, exchange: _Exchange, kind: str, model: str, stream: bool) -> None:
        self.fake = fake
        self.exchange = exchange
        self.kind = kind  # "chat" or "generate"
        self.model = model  # echoed as sent
        self.stream = stream
        self.status = 200
        self.length: int | None = None
        self.body = bytearray()  # not streaming: the engine's answer
        self.pending = b""  # streaming: an incomplete line
        self.sent = 0  # body bytes written to the client
        self.lines = 0
        self.over = False  # cut: nothing more goes out

    def start(self, status: int, content_type: bytes | None, length: int | None, server: bool | bytes) -> None:
        request = self.exchange.request
        self.status, self.length = status, length
        plain = request.responseHeaders.hasHeader(b"x-content-type-options")  # a Go http.Error
        if not self.stream:  # the recorder's headers never reach the client
            request.responseHeaders.removeHeader(b"x-content-type-options")
            return
        if status == 200:
            if content_type == EVENT_STREAM:
                request.setHeader(b"x-accel-buffering", b"no")
            self.exchange._start(200, JSON_GO, length=length, server=server)
        else:
            self.length = None if plain else length
            self.exchange._start(status, content_type, length=self.length, server=server)

    def write(self, data: bytes) -> None:
        if self.over:
            return
        if not self.stream:
            self.body += data
            return
        if self.status != 200 or not data:
            self.exchange._write(b"")  # DMR flushes: the headers go out
            return
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            out = self._translate(line.strip())
            if out is None:
                continue
            self.exchange._write(out)
            self.sent += len(out)
            self.lines += 1
            if 0 < self.fake.ollama_truncate_after <= self.lines:
                self.cut()
                return

    def finish(self) -> None:
        if self.over:
            return
        if not self.stream:
            self._answer()
        elif self.length is not None and self.sent < self.length:
            self.cut()  # Go closes a connection whose handler wrote less than its Content-Length
        else:
            self.exchange._finish()

    def cut(self) -> None:
        self.over = True
        self.exchange._cut()

    def _now(self) -> str:
        return _go_time(self.fake._reactor.seconds())

    def _translate(self, line: bytes) -> bytes | None:
        """One engine SSE line as DMR's streaming writer turns it into an Ollama line (or None)."""
        if not line.startswith(b"data: "):
            return None
        data = line[len(b"data: "):]
        obj: dict[str, Any] = {"model": self.model, "created_at": self._now()}
        if data == b"[DONE]":
            if self.kind == "chat":
                obj["message"] = {"role": "", "content": ""}
            obj["done"] = True
            return _go_json(obj) + b"\n"
        try:
            chunk = _go_decode(data, _ENGINE_CHUNK, whole=True) or {}
        except _GoDecodeError:
            return None  # DMR logs "Failed to parse OpenAI chat stream chunk" and skips it
        choices = chunk.get("choices") or []
        delta = (choices[0] or {}).get("delta") or {} if choices else {}
        content, thinking = delta.get("content", ""), delta.get("reasoning_content", "")
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if delta.get("tool_calls"):
                message["tool_calls"] = _ollama_tool_calls(delta["tool_calls"])
            if thinking:
                message["thinking"] = thinking
            obj["message"] = message
        else:
            if content:
                obj["response"] = content
            if thinking:
                obj["thinking"] = thinking
        obj["done"] = False
        return _go_json(obj) + b"\n"

    def _answer(self) -> None:
        """DMR's ``convertChatResponse`` / ``convertGenerateResponse`` of the recorded answer."""
        exchange, body = self.exchange, bytes(self.body)
        if self.status != 200:
            message = _engine_error_message(body)
            out = _go_json({"error": message}) + b"\n" if message else body
            exchange._start(self.status, _go_sniff(out), length=len(out))
        else:
            try:
                answer = _go_decode(body, _ENGINE_ANSWER, whole=True) or {}
            except _GoDecodeError:
                exchange.request.setHeader(b"x-content-type-options", b"nosniff")
                out = b"Failed to parse response\n"
                exchange._start(500, TEXT_PLAIN, length=len(out))
                exchange._write(out)
                exchange._finish()
                return
            choices = answer.get("choices") or []
            said = (choices[0] or {}).get("message") or {} if choices else None
            obj: dict[str, Any] = {"model": self.model, "created_at": self._now()}
            if self.kind == "chat":
                reply: dict[str, Any] = {"role": "", "content": ""}
                if said is not None:
                    reply = {"role": "assistant", "content": said.get("content", "")}
                    if said.get("tool_calls"):
                        reply["tool_calls"] = _ollama_tool_calls(said["tool_calls"])
                    if said.get("reasoning_content"):
                        reply["thinking"] = said["reasoning_content"]
                obj["message"] = reply
            else:
                if said is not None and said.get("content"):
                    obj["response"] = said["content"]
                if said is not None and said.get("reasoning_content"):
                    obj["thinking"] = said["reasoning_content"]
            obj["done"] = True
            out = _go_json(obj) + b"\n"
            exchange._start(200, JSON_GO, length=len(out))
        exchange._write(out)
        exchange._finish()


@dataclass
class _Upstream:
    """An answer the engine side gave instead of generating (what DMR's proxy relays)."""

    status: int
    body: bytes
    content_type: bytes
    server: bool = False  # llama.cpp's Server header
    plain: bool = False  # a Go http.Error (adds X-Content-Type-Options: nosniff)

    def send(self, exchange: _Exchange) -> None:
        if self.plain:
            exchange.request.setHeader(b"x-content-type-options", b"nosniff")
        exchange.send(self.status, self.body, self.content_type, server=self.server)


class _DMRError(Exception):
    """A plain-text error DMR answers before the engine sees the request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def _go_string_field(body: bytes, name: str) -> str | None:
    """``name`` of a JSON object body as Go's ``json.Unmarshal`` into a struct would read it.

    ``null`` and a missing or null field read as ``""``; None means Unmarshal fails
    (malformed JSON, not an object, or a non-string field).
    """
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except ValueError:
        return None
    if payload is None:
        return ""
    if not isinstance(payload, dict) or not isinstance(payload.get(name, ""), (str, type(None))):
        return None
    return payload.get(name) or ""


def _anthropic_error(exchange: _Exchange, status: int, kind: str, message: str) -> None:
    """DMR's ``writeAnthropicError``: Go JSON ``{"type":"error","error":{"type","message"}}``."""
    exchange.send_json({"type": "error", "error": {"type": kind, "message": message}}, status)


def _llama_error(exchange: _Exchange, status: int, message: str, kind: str = "invalid_request_error") -> None:
    """llama.cpp's JSON error ``{"error":{"code","message","type"}}``."""
    exchange.send(status, _dumps({"error": {"code": status, "message": message, "type": kind}}), JSON_LLAMA,
                  server=True)


class _CompatError(Exception):
    """A 400 ``invalid_request`` the Responses handler answers before any chat completion."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class _ResponsesPlan:
    """A checked create request: what DMR would turn into one chat completion."""

    payload: dict[str, Any]
    store: bool
    stream: bool
    prompt_texts: list[str]  # instructions, earlier outputs of the chain, this input
    input_items: list[dict[str, Any]] = field(default_factory=list)
    turn: int = 1
    cache_texts: list[str] = field(default_factory=list)  # instructions, the chain's inputs and outputs, this input


def _responses_error(exchange: _Exchange, status: int, code: str, message: str) -> None:
    """The Responses handler's ``sendError``: ``{"error":{"code","message"}}`` (no ``type``)."""
    exchange.send_json({"error": {"code": code, "message": message}}, status)


def _go_kind(value: Any) -> str:
    """How Go's JSON errors name a JSON value's kind."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    kinds: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return kinds.get(type(value), "null")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_CREATE_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{name: ("string", lambda v: isinstance(v, str)) for name in (
        "model", "instructions", "previous_response_id", "truncation", "service_tier", "safety_identifier",
        "reasoning_effort", "user")},
    **{name: ("bool", lambda v: isinstance(v, bool)) for name in ("store", "stream", "background",
                                                                  "parallel_tool_calls")},
    "max_output_tokens": ("int", _is_int),
    "top_logprobs": ("int", _is_int),
    "temperature": ("float64", _is_number),
    "top_p": ("float64", _is_number),
    "include": ("[]string", lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v)),
    "tools": ("[]responses.Tool", lambda v: isinstance(v, list) and all(isinstance(i, dict) for i in v)),
    "metadata": ("map[string]string", lambda v: isinstance(v, dict) and all(isinstance(i, str) for i in v.values())),
    "text": ("responses.ResponseTextConfig", lambda v: isinstance(v, dict)),
}
"""Typed fields of DMR's ``CreateRequest`` (null is fine for each) and their Go types."""


def _decode_create_request(body: bytes) -> dict[str, Any]:
    """``json.Unmarshal`` into DMR's ``CreateRequest``, with Go-like error messages."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        if error.pos >= len(error.doc.rstrip()):
            detail = "unexpected end of JSON input"
        elif error.msg == "Extra data":
            detail = f"invalid character '{error.doc[error.pos]}' after top-level value"
        else:
            detail = f"invalid character '{error.doc[error.pos]}' looking for beginning of value"
        raise _CompatError("Invalid JSON: " + detail) from None
    except ValueError as error:  # NaN / Infinity, or bytes that are not UTF-8
        constant = str(error).rpartition(" ")[2] if "JSON constant" in str(error) else "\ufffd"
        raise _CompatError(f"Invalid JSON: invalid character '{constant[:1]}' looking for beginning of value") from None
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise _CompatError(f"Invalid JSON: json: cannot unmarshal {_go_kind(payload)} into Go value of type "
                           "responses.CreateRequest")
    for name, (go_type, valid) in _CREATE_FIELDS.items():
        value = payload.get(name)
        if value is not None and not valid(value):
            kind = _go_kind(value)
            if go_type == "int" and isinstance(value, float):
                kind += " " + json.dumps(value)
            raise _CompatError(f"Invalid JSON: json: cannot unmarshal {kind} into Go struct field "
                               f"CreateRequest.{name} of type {go_type}")
    return payload


def _check_unsupported_fields(payload: dict[str, Any]) -> None:
    """DMR's ``validateUnsupportedRequestFields``."""
    suffix = "is not supported by Docker Model Runner Responses compatibility layer"
    for name in ("include",):
        if payload.get(name):
            raise _CompatError(f"{name} {suffix}")
    for name in ("stream_options", "top_logprobs"):
        if payload.get(name) is not None:
            raise _CompatError(f"{name} {suffix}")
    truncation = payload.get("truncation") or ""
    if truncation not in ("", "disabled"):
        raise _CompatError(f"truncation value {_go_quote(truncation)} {suffix}")
    if payload.get("background") is True:
        raise _CompatError("background responses are not supported by Docker Model Runner Responses "
                           "compatibility layer")
    if payload.get("conversation") is not None:
        raise _CompatError(f"conversation {suffix}; use previous_response_id instead")
    if payload.get("prompt") is not None:
        raise _CompatError(f"prompt {suffix}")
    for name in ("service_tier", "safety_identifier"):
        if payload.get(name):
            raise _CompatError(f"{name} {suffix}")


def _parse_responses_input(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """DMR's ``parseInput`` / ``convertInputItems``, giving the items ``input_items`` lists."""
    if "input" not in payload:
        return []
    value = payload["input"]
    if value is None or isinstance(value, str):  # Go reads null into a string as ""
        return [_input_message("user", [_input_text(value or "")])]
    if not isinstance(value, list):
        raise _CompatError("failed to parse input: input must be a string or array of items: json: cannot "
                           f"unmarshal {_go_kind(value)} into Go value of type []responses.InputItem")
    items = []
    for raw in value:
        if raw is None:
            continue  # a zero InputItem: no role, no content
        if not isinstance(raw, dict):
            raise _CompatError("failed to parse input: input must be a string or array of items: json: cannot "
                               f"unmarshal {_go_kind(raw)} into Go value of type responses.InputItem")
        if raw.get("type") == "function_call_output" or raw.get("call_id"):
            items.append({"id": raw.get("id") or _random_id("fco_"), "type": "function_call_output",
                          "call_id": raw.get("call_id") or "", "output": raw.get("output") or "",
                          "status": "completed"})
        elif raw.get("role") or "content" in raw:
            role = raw.get("role") or "user"
            parts = _parse_content(raw["content"], role) if "content" in raw else []
            items.append(_input_message(role, parts, raw.get("id")))
    return items


def _parse_content(content: Any, role: str) -> list[dict[str, Any]]:
    """DMR's ``parseContent``: a string, or ``input_text`` / ``text`` / image parts."""
    if content is None or isinstance(content, str):
        return [_input_text(content or "", role)]
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        kind = _go_kind(content if not isinstance(content, list) else next(p for p in content if not isinstance(p, dict)))
        target = "[]responses.InputContentPart" if not isinstance(content, list) else "responses.InputContentPart"
        raise _CompatError("failed to parse input: content must be string or array: json: cannot unmarshal "
                           f"{kind} into Go value of type {target}")
    parts = []
    for part in content:
        if part.get("type") in ("input_text", "text", "output_text"):
            parts.append(_input_text(part.get("text") if isinstance(part.get("text"), str) else "", role))
        elif part.get("type") in ("input_image", "image_url"):
            parts.append({"type": "input_image", "image_url": part.get("image_url"), "detail": "auto"})
    return parts


def _input_text(text: str, role: str = "user") -> dict[str, Any]:
    if role == "assistant":
        return _output_text(text)
    return {"type": "input_text", "text": text}


def _input_message(role: str, content: list[dict[str, Any]], item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or _random_id("msg_"), "type": "message", "role": role, "status": "completed",
            "content": content}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant output message item (DMR's field order)."""
    return {"id": item_id, "type": "message", "role": "assistant", "content": [_output_text(text)], "status": status}


def _item_texts(items: list[dict[str, Any]]) -> list[str]:
    """The texts of input items: their content parts' texts, a function call's output."""
    texts: list[str] = []
    for item in items:
        texts += [part["text"] for part in item.get("content", []) if isinstance(part.get("text"), str)]
        if isinstance(item.get("output"), str):
            texts.append(item["output"])
    return texts


def _output_texts(response: dict[str, Any]) -> list[str]:
    """The assistant texts of a stored response (what DMR replays as history)."""
    return ["".join(part.get("text", "") for part in item.get("content", []) if part.get("type") == "output_text")
            for item in response.get("output", []) if item.get("type") == "message"]


def _responses_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}


def _reject_constant(name: str) -> Any:
    """Reject NaN and Infinity like Go's JSON decoder."""
    raise ValueError(f"invalid JSON constant {name}")


def _usage(completion: int, prompt: int, cached: int | None = None) -> dict[str, Any]:
    """OpenAI usage; with ``cached`` (a state's answer) llama.cpp's ``prompt_tokens_details`` too."""
    usage: dict[str, Any] = {"completion_tokens": completion, "prompt_tokens": prompt,
                             "total_tokens": completion + prompt}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _stream_events(
    *,
    chat: bool,
    tokens: Sequence[str],
    prompt: tuple[int, int, float | None],
    model: str,
    created: int,
    include_usage: bool,
    complete: bool,
    interval: float = 0.0,
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

    prompt_n, cache_n, prompt_ms = prompt
    usage = _usage(len(tokens), prompt_n, cache_n if prompt_ms is not None else None)
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
        events[-1]["timings"] = _timings(prompt_n, len(tokens), cache_n, prompt_ms, interval)
    return events


# -- standalone fakes for benchmarks: python tests/fakedmr.py serve --port P [...] ------------------------------

ANSWER_WORDS = (" sun", " model", " code", " and", " llama", " world", " runner", " ok", " a", " stream",
                " hello", " test", " blue", " tiny", " proxy", " cat")
"""Answer tokens of ``serve``: words like the real ``ai/small`` generates (about 5 characters each)."""
SERVE_PRESETS: dict[str, dict[str, Any]] = {
    "real": {**BackendState.REAL_ENGINE, "tokens": 24, "token_interval": 0.005},
    "gpukv": {**BackendState.GPU_KV, "tokens": 16, "token_interval": 0.004},
    "none": {"cold_load": 0.0, "tokens": 16, "token_interval": 0.004},  # BackendState's defaults
}
"""``serve --preset``: BackendState keyword arguments, plus the answer's length and token interval."""


class _ServedFake(FakeDMR):
    """A FakeDMR run by ``serve``: keeps no request recordings, and answers ``GET /fake/stats``
    (``?records=1`` adds every request's ``StateRecord``) and ``POST /fake/reset`` (state and counters)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inference = 0
        self.max_active = 0

    def _record(self, request: Request) -> RecordedRequest:
        recorded = super()._record(request)
        self.requests.clear()  # nobody reads them back; a long benchmark must not keep every prompt
        return recorded

    def _route(self, request: Request) -> None:
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        if path in ("/fake/stats", "/fake/reset"):
            body: dict[str, Any]
            if path == "/fake/reset" and method == "POST":
                self.inference = self.max_active = 0
                if self._state is not None:
                    self._state.reset()
                body = {"reset": True}
            elif path == "/fake/stats" and method in ("GET", "HEAD"):
                body = self.stats(records=b"records=1" in request.uri)
            else:
                request.setResponseCode(405)
                body = {"error": "method not allowed"}
            data = _dumps(body) + b"\n"
            request.setHeader(b"content-type", JSON_GO)
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data)
            request.finish()
            return
        if _is_inference(method, request.uri.decode("latin-1")):
            self.inference += 1
            self.max_active = max(self.max_active, self.active + 1)
        super()._route(request)

    def stats(self, *, records: bool = False) -> dict[str, Any]:
        """The counters ``GET /fake/stats`` shows."""
        state = self._state
        out: dict[str, Any] = {"port": self.port, "active": self.active, "max_active": self.max_active}
        if state is not None:
            out.update(state.stats())
            out["engine_requests"] = out.pop("requests")
            if records:
                out["records"] = [vars(record) for record in state.records]
        out["requests"] = self.inference
        return out


def _serve_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(prog="fakedmr.py", description="Fake DMRs in their own process.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve fake DMRs (one per --port, one BackendState each, one Machine for all) until SIGTERM",
        description="Serve one FakeDMR with a BackendState per --port on 127.0.0.1; print 'READY port ...' once "
                    "all listen; GET /fake/stats gives the counters (?records=1: every request), POST /fake/reset "
                    "empties caches and counters. Knobs left out come from --preset (see BackendState).")
    serve.add_argument("--port", type=int, action="append", required=True, help="a port to serve (0: any free one)")
    serve.add_argument("--models", default="ai/small", help="comma-separated model ids (default ai/small)")
    serve.add_argument("--preset", choices=sorted(SERVE_PRESETS), default="none",
                       help="real: BackendState.real_engine(); gpukv: BackendState.gpu_kv(); none: the defaults")
    add = serve.add_argument
    add("--resident-capacity", type=int)
    add("--cold-load", type=float, help="seconds a model load takes")
    add("--slots", type=int, help="llama.cpp slots per model (0: unlimited)")
    add("--prefill-parallel", type=int, help="prefills at once per endpoint (0: unlimited)")
    add("--batch", action=argparse.BooleanOptionalAction, default=None, help="prefills run in batches")
    add("--batch-window", type=float, help="seconds an idle engine gathers prefills into its next batch")
    add("--base", type=float, help="seconds of every prefill")
    add("--per-token", type=float, help="seconds per uncached token")
    add("--per-token-ctx", type=float, help="seconds per uncached token per token of context before it")
    add("--slot-switch", type=float, help="seconds more for a prefill with under 10%% of its prompt cached")
    add("--contention", type=float, help="extra work share per other prefill running on the endpoint")
    add("--machine-contention", type=float, help="extra work share per prefill running on another port")
    add("--cache-tokens", type=int, help="tokens the prefix cache holds")
    add("--cache-prompts", type=int, help="prompts the prefix cache holds (0: unbounded)")
    add("--share-busy", action=argparse.BooleanOptionalAction, default=None,
        help="a running request's cached prefix is usable by others")
    add("--share-computed", action=argparse.BooleanOptionalAction, default=None,
        help="a prompt is shared once prefilled, and a queued prefill matches when it starts")
    add("--recompute-answer", action=argparse.BooleanOptionalAction, default=None,
        help="cache the prompt only, not the answer")
    add("--tokenizer", choices=("words", "chars"))
    add("--message-tokens", type=int, help="template tokens around each message")
    add("--context", type=int, help="most prompt tokens (0: unlimited)")
    add("--tokens", type=int, help="tokens of every answer")
    add("--token-interval", type=float, help="seconds between a stream's events (the fake's chunk_delay)")
    add("--health-route", action=argparse.BooleanOptionalAction, default=True,
        help="serve GET /engines/health (default on)")
    return parser


def serve(argv: Sequence[str]) -> int:
    """``python tests/fakedmr.py serve --port P [--port P2 ...] [knobs]`` (``argv``: from "serve" on)."""
    from twisted.internet import reactor

    args = _serve_parser().parse_args(argv)
    knobs = dict(SERVE_PRESETS[args.preset])
    names = ("resident_capacity", "cold_load", "slots", "prefill_parallel", "batch", "base", "per_token",
             "per_token_ctx", "contention", "machine_contention", "cache_tokens", "cache_prompts", "share_busy",
             "recompute_answer", "tokenizer", "message_tokens", "context", "slot_switch", "batch_window", "tokens",
             "token_interval", "share_computed")
    for name in names:
        value = getattr(args, name)
        if value is not None:
            knobs[name] = value
    answer_tokens, interval = int(knobs.pop("tokens")), float(knobs.pop("token_interval"))
    machine = Machine()
    models = [m for m in args.models.split(",") if m]
    fakes: list[_ServedFake] = []
    for index in range(len(args.port)):
        fake = _ServedFake(models, name=f"fake-{index}", reactor=reactor)
        fake.state = BackendState(machine=machine, **knobs)
        fake.tokens = [ANSWER_WORDS[i % len(ANSWER_WORDS)] for i in range(answer_tokens)]
        fake.chunk_delay = interval
        fake.health_route = args.health_route
        fakes.append(fake)
    failed: list[str] = []

    async def start() -> None:
        try:
            for fake, port in zip(fakes, args.port):
                await fake.start(port)
        except Exception as error:  # a busy port
            failed.append(str(error))
            reactor.stop()
            return
        print("READY " + " ".join(str(fake.port) for fake in fakes), flush=True)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()))
    reactor.run()  # SIGTERM and SIGINT stop it
    if failed:
        print(f"fakedmr serve: {failed[0]}", file=__import__("sys").stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(serve(sys.argv[1:] or ["--help"]))
